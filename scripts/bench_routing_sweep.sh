#!/usr/bin/env bash
# Routing policies on a simulated app (issue 19): `raylm serve --executor sim` with DP
# engine replicas, each policy in turn, the prefix-sharing workload at several request
# rates, then `raylm bench plot`. Usage: scripts/bench_routing_sweep.sh OUT_DIR
#
# Time is dilated: the device is the h100 preset slowed 10x (bandwidth, FLOPs and the
# 1 ms step cost), so the engines' real CPU work per step (scheduling, detokenizing, on
# these 2 cores) stays small beside a simulated step. Read latencies /10 and rates x10 as
# H100 figures. A simulated replica runs no model: it reserves a quarter CPU, so DP of them
# fit on this machine (at the default, one CPU each, only 2 of 4 were placed). The KV pool is cut to NUM_BLOCKS per replica so that every shared prompt
# does not fit everywhere (the regime prefix-aware routing is for).
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR}
DP=${DP:-4}; RATES=${RATES:-"2 4 6"}; N=${N:-120}; PORT=${PORT:-8200}
NUM_BLOCKS=${NUM_BLOCKS:-640}; PREFIXES=${PREFIXES:-16}; POLICIES=${POLICIES:-"least_loaded power_of_two round_robin prefix_aware"}
DEVICE=${DEVICE:-h100x0.1:268:59.34:80:10}; SIM_MODEL=${SIM_MODEL:-llama-3-8b}
RAYLM=${RAYLM:-.venv/bin/raylm}
source "$(dirname "$0")/sim_server.sh"
mkdir -p "$OUT"
for policy in $POLICIES; do
  start_sim_server "$OUT/serve_$policy.log" "$DP" --sim-device "$DEVICE" --sim-model "$SIM_MODEL" --dp "$DP" \
    --num-cpus-per-replica 0.25 --routing-policy "$policy" --num-blocks "$NUM_BLOCKS" --max-model-len 4096
  seed=0
  for rate in $RATES; do
    seed=$((seed + 1))  # each rate its own prompts: none may hit what an earlier rate cached
    timeout 900 "$RAYLM" bench serve --base-url "http://127.0.0.1:$PORT" --model smollm2-135m-instruct \
      --prefix-sharing --num-prefixes "$PREFIXES" --prefix-len 1024 --suffix-len 32 --output-median 64 \
      --num-prompts "$N" --request-rate "$rate" --seed "$seed" --label "$policy" --goodput ttft:5000 tpot:500 \
      --disable-tqdm --output-json "$OUT/${policy}_r${rate}.json" | tail -n 25 > "$OUT/${policy}_r${rate}.txt"
  done
  stop_sim_server
done
"$RAYLM" bench plot "$OUT"/*.json --out "$OUT/plots" \
  --title "dp $DP, simulated Llama-3-8B on H100 (time x10), $PREFIXES shared prompts"
