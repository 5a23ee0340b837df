#!/usr/bin/env bash
# Restart the service's instances one at a time, so the TLS proxy in front always has one that answers:
#   deploy/rollingRestart.sh <port> [<port>...]        (run by deploy/activate.sh when POWERON_INSTANCES is set)
# For each port: `sudo systemctl restart poweron-llm@<port>.service` (SIGTERM: the instance stops accepting
# connections at once, so the proxy sends new requests to the other one, and lets its running streams finish for
# [server] graceful_shutdown_seconds), then wait until the unit is active and http://127.0.0.1:<port>/health/readiness
# answers 200 before the next one is touched. Exits 1 at the first instance that does not become ready in time
# (POWERON_READY_TIMEOUT seconds, default 180); the instances not yet restarted keep serving. Between two instances
# it waits POWERON_SETTLE_SECONDS (default 12), so a gateway that cooled the returned instance down after its refusals
# (LiteLLM: cooldown_time 10 s from the last refusal, docu/integration.md) takes it back before the next
# instance stops. The TLS proxy as documented (nginx, Caddy) marks no instance down and needs no pause.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: deploy/rollingRestart.sh <port> [<port>...]" >&2; exit 2; }
readyTimeout=${POWERON_READY_TIMEOUT:-180}
pollSeconds=${POWERON_READY_POLL:-1}
settleSeconds=${POWERON_SETTLE_SECONDS:-12}

log() { printf 'deploy: %s\n' "$*" >&2; }

instanceReady() {
  systemctl is-active --quiet "poweron-llm@$1.service" \
    && curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:$1/health/readiness"
}

first=1
for port in "$@"; do
  [ "$first" = 1 ] || sleep "$settleSeconds"
  first=0
  log "restarting poweron-llm@$port (the other instances serve meanwhile; its streams drain)"
  sudo systemctl restart "poweron-llm@$port.service"
  deadline=$((SECONDS + readyTimeout))
  until instanceReady "$port"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "poweron-llm@$port did not become ready within ${readyTimeout} s"
      exit 1
    fi
    sleep "$pollSeconds"
  done
  log "poweron-llm@$port is ready"
done
