# Sourced by the routing benchmark scripts: start a simulated `raylm serve` app in the
# background and wait for every engine, and stop it the way an operator would.
#   start_sim_server LOG ENGINES ARGS...   sets $server (its pid); exits 1 if engines are missing
#   stop_sim_server

start_sim_server() {
  local log=$1 engines=$2
  shift 2
  "$RAYLM" serve --model smollm2-135m-instruct --executor sim --port "$PORT" "$@" > "$log" 2>&1 &
  server=$!
  # every engine up (the app answers /health with some replicas still pending)
  local i up
  for i in $(seq 1 150); do
    up=$(curl -sf -m 5 "http://127.0.0.1:$PORT/metrics" | grep -c '^raylm:engine_info{' || true)
    [ "$up" = "$engines" ] && return 0
    sleep 2
  done
  echo "only $up of $engines engines came up" >&2
  kill -KILL "$server"
  exit 1
}

stop_sim_server() {
  kill -TERM "$server"  # raylm serve drains on SIGTERM
  for _ in $(seq 1 60); do kill -0 "$server" 2> /dev/null || break; sleep 1; done
  kill -KILL "$server" 2> /dev/null || true
  wait "$server" || true
}
