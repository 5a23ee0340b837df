#!/usr/bin/env bash
# Activate a release on the server (run by deploy/push.sh as the deploy account):
#   deploy/activate.sh <revision>
# 1. install the release's requirements.txt (at the exact versions of its constraints.txt) into the shared venv
#    $POWERON_ROOT/venv,
# 2. point $POWERON_ROOT/current at releases/<revision> (atomic symlink switch),
# 3. restart the units (sudo systemctl restart; see the sudoers line in docu/setupserver.md; POWERON_UNITS
#    overrides the list, e.g. without poweron-whisper.service where speech to text is not installed); with
#    POWERON_INSTANCES="8000 8001" (two instances, docu/setupserver.md "Two instances") the units are restarted
#    first and then the instances poweron-llm@<port> one at a time by deploy/rollingRestart.sh, each waited for
#    before the next, so the proxy always has one that answers (zero-downtime deploy),
# 4. wait until the units are active and /health/readiness answers 200,
# 5. if any step fails: activate the previous release the same way, wait for it, and exit 1.
# Server-local settings (POWERON_UNITS, POWERON_INSTANCES, POWERON_READINESS_URL, POWERON_READY_TIMEOUT, POWERON_KEEP_RELEASES) may be
# kept in $POWERON_ROOT/deploy.env.
set -euo pipefail
revision=${1:?usage: deploy/activate.sh <revision>}
root=${POWERON_ROOT:-/opt/poweron-llm}
if [ -f "$root/deploy.env" ]; then
  # shellcheck source=/dev/null
  . "$root/deploy.env"
fi
readinessUrl=${POWERON_READINESS_URL:-http://127.0.0.1:8000/health/readiness}
readyTimeout=${POWERON_READY_TIMEOUT:-180}
keepReleases=${POWERON_KEEP_RELEASES:-5}
read -ra instances <<< "${POWERON_INSTANCES:-}"
if [ ${#instances[@]} -gt 0 ]; then
  read -ra units <<< "${POWERON_UNITS-poweron-whisper.service}"
else
  read -ra units <<< "${POWERON_UNITS:-poweron-llm.service poweron-whisper.service}"
fi

log() { printf 'deploy: %s\n' "$*" >&2; }

activate() {
  local release=$1 constraints=()
  log "activating $release"
  if [ -f "$root/releases/$release/constraints.txt" ]; then  # the exact versions the release was tested with
    constraints=(-c "$root/releases/$release/constraints.txt")
  fi
  "$root/venv/bin/pip" install --quiet --disable-pip-version-check "${constraints[@]}" \
    -r "$root/releases/$release/requirements.txt" \
    && ln -sfn "releases/$release" "$root/current.new" \
    && mv -T "$root/current.new" "$root/current" \
    && restartUnits
}

restartUnits() {
  if [ ${#units[@]} -gt 0 ]; then
    sudo systemctl restart "${units[@]}" || return 1
  fi
  if [ ${#instances[@]} -gt 0 ]; then
    POWERON_READY_TIMEOUT=$readyTimeout "$root/current/deploy/rollingRestart.sh" "${instances[@]}"
  fi
}

unitsActive() {
  [ ${#units[@]} -eq 0 ] || systemctl is-active --quiet "${units[@]}"
}

waitReady() {
  local deadline=$((SECONDS + readyTimeout))
  until unitsActive && curl -fsS -o /dev/null --max-time 5 "$readinessUrl"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      return 1
    fi
    sleep 2
  done
}

pruneReleases() {
  local current
  current=$(readlink "$root/current")
  ls -1dt "$root"/releases/*/ 2>/dev/null | tail -n +$((keepReleases + 1)) | while read -r old; do
    [ "releases/$(basename "$old")" = "$current" ] || rm -rf "$old"
  done
}

# One deployment at a time (two quick pushes to main start two workflow runs).
exec 9>"$root/.deploy.lock"
flock 9

[ -d "$root/releases/$revision" ] || { log "no release $root/releases/$revision"; exit 1; }
previous=$(readlink "$root/current" 2>/dev/null || true)
previous=${previous#releases/}

if activate "$revision" && waitReady; then
  log "$revision is live and ready"
  pruneReleases
  exit 0
fi

log "$revision did not become ready within ${readyTimeout} s (journalctl -u poweron-llm -u poweron-whisper tells why)"
if [ -z "$previous" ] || [ "$previous" = "$revision" ]; then
  log "no previous release to roll back to"
  exit 1
fi
if activate "$previous" && waitReady; then
  log "rolled back to $previous, which is ready"
else
  log "rolled back to $previous, but it is not ready either: check Ollama and the journal"
fi
exit 1
