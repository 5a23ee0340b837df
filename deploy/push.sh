#!/usr/bin/env bash
# Ship one revision of this repository to the server and activate it there, over SSH.
#   deploy/push.sh <user@host> <revision>
# The revision is unpacked into $POWERON_ROOT/releases/<revision> (git archive, so only tracked files travel),
# then deploy/activate.sh of that release installs, restarts, waits for readiness and rolls back on failure.
set -euo pipefail
target=${1:?usage: deploy/push.sh <user@host> <revision>}
revision=$(git rev-parse --verify "${2:?usage: deploy/push.sh <user@host> <revision>}^{commit}")
root=${POWERON_ROOT:-/opt/poweron-llm}
sshKey=${POWERON_SSH_KEY:-$HOME/.ssh/id_deploy}
ssh=(ssh -i "$sshKey" -o BatchMode=yes -o StrictHostKeyChecking=yes "$target")
release="$root/releases/$revision"

echo "shipping $revision to $target:$release"
git archive --format=tar "$revision" | "${ssh[@]}" \
  "set -e; rm -rf '$release.tmp'; mkdir -p '$release.tmp'; tar -x -C '$release.tmp'; rm -rf '$release'; mv '$release.tmp' '$release'"
"${ssh[@]}" "POWERON_ROOT='$root' '$release/deploy/activate.sh' '$revision'"
