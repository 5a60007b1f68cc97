# Sourced by the scripts/bench_*.sh benchmarks: strict mode, the raylm CLI, Ray without
# token auth on this machine, and wait_ready PORT [SECONDS, default 180] (block until `raylm serve` answers /health,
# which it does only once an engine replica does; /v1/models answers before that).
set -euo pipefail
RAYLM=.venv/bin/raylm
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

wait_ready() {
  for _ in $(seq 1 "${2:-180}"); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "server on port $1 did not come up" >&2; return 1
}

# a script that stops early (a server that never came up) leaves no server behind
trap 'jobs -p | xargs -r kill -TERM 2>/dev/null || true' EXIT
