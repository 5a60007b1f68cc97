#!/usr/bin/env bash
# Routing policies on a simulated fleet (issue 19): ENGINES simulated engines (PER in each
# Serve replica process, each its own DP rank), every policy in turn, on the Azure
# conversation trace and on the prefix-sharing workload, each at LOADS x the fleet's
# capacity (`raylm bench sim-capacity`: one engine's saturated throughput on the same
# requests, measured on the simulator, times ENGINES), then `raylm bench plot`.
# Usage: scripts/bench_routing_fleet.sh OUT_DIR   (ENGINES=64 PER=8 LOADS="0.8" by default)
#
# Time is dilated DILATION times (default 100 x ENGINES / 64): the device is the h100 preset
# at 1/DILATION of its bandwidth, FLOPs and step cost, so the fleet's real CPU work (the engine
# loops, the router, the ingress and the load generator, all on these 2 cores) stays small
# beside a simulated step, and the same per simulated second at every fleet size. Read
# latencies /DILATION and rates xDILATION as H100 figures. An engine decodes at most MAX_SEQS sequences (the
# queueing regime routing decides); its KV pool is NUM_BLOCKS blocks (10k tokens), so not
# every shared prompt fits everywhere.
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR}
ENGINES=${ENGINES:-64}; PER=${PER:-8}; LOADS=${LOADS:-0.8}; N=${N:-600}; PORT=${PORT:-8200}
MAX_SEQS=${MAX_SEQS:-8}; NUM_BLOCKS=${NUM_BLOCKS:-640}; PREFIXES=${PREFIXES:-32}; PREFIX_OUT=${PREFIX_OUT:-64}
TRACE_OUT=${TRACE_OUT:-64}  # the trace's outputs are clipped to this many tokens
POLICIES=${POLICIES:-"least_loaded power_of_two round_robin prefix_aware"}
WORKLOADS=${WORKLOADS:-"trace prefix"}
DILATION=${DILATION:-$(python3 -c "print(100 * $ENGINES / 64)")}
DEVICE=${DEVICE:-$(python3 -c "d = $DILATION; print(f'h100x{1 / d:g}:{2680 / d:g}:{593.4 / d:g}:80:{d:g}')")}
SIM_MODEL=${SIM_MODEL:-llama-3-8b}
TRACE=${TRACE:-../shared/traces/azure_llm_2023_conv.csv}
# 200 ms / 15 ms on the H100 time scale
GOODPUT=${GOODPUT:-$(python3 -c "d = $DILATION; print(f'ttft:{200 * d:g} tpot:{15 * d:g}')")}
EXTRA=${EXTRA:-}  # more `raylm serve` flags, e.g. "--prefix-max-imbalance 2"
RAYLM=${RAYLM:-.venv/bin/raylm}
source "$(dirname "$0")/sim_server.sh"
declare -A WORK=(
  [trace]="--trace $TRACE --max-prompt-len 2048 --max-output-len $TRACE_OUT"
  [prefix]="--prefix-sharing --num-prefixes $PREFIXES --prefix-len 1024 --suffix-len 32 --output-median $PREFIX_OUT"
)
mkdir -p "$OUT"
# Each load draws its own prompts (seed 1, 2, ...: the same lengths and arrivals, other
# tokens): a later load on the same server must not hit the prefix cache an earlier one
# filled (round robin would send each repeated prompt back to the engine that holds it).
declare -A SEED
i=0; for load in $LOADS; do i=$((i + 1)); SEED[$load]=$i; done
# the request rate (trace: the time scale) for each workload and load, from the roofline
declare -A RATE
for w in $WORKLOADS; do
  for load in $LOADS; do
    cap=$("$RAYLM" bench sim-capacity --sim-device "$DEVICE" --sim-model "$SIM_MODEL" --engines "$ENGINES" \
          --max-num-seqs "$MAX_SEQS" --num-blocks "$NUM_BLOCKS" --load "$load" --num-prompts "$N" --seed "${SEED[$load]}" ${WORK[$w]} \
          | tail -n 1)
    echo "$cap" > "$OUT/capacity_${w}_l${load}.json"
    if [ "$w" = trace ]; then
      RATE[$w,$load]="--trace-time-scale $(python3 -c "import json,sys; print(json.loads(sys.argv[1])['trace_time_scale'])" "$cap")"
    else
      RATE[$w,$load]="--request-rate $(python3 -c "import json,sys; print(json.loads(sys.argv[1])['request_rate'])" "$cap")"
    fi
  done
done
for policy in $POLICIES; do
  start_sim_server "$OUT/serve_$policy.log" "$ENGINES" --sim-device "$DEVICE" --sim-model "$SIM_MODEL" \
    --dp $((ENGINES / PER)) --engines-per-replica "$PER" --num-cpus-per-replica "$(python3 -c "print(2 / ($ENGINES / $PER))")" \
    --routing-policy "$policy" --num-blocks "$NUM_BLOCKS" --max-num-seqs "$MAX_SEQS" --max-model-len 4096 $EXTRA
  for w in $WORKLOADS; do
    mkdir -p "$OUT/$w"
    for load in $LOADS; do
      timeout 1200 "$RAYLM" bench serve --base-url "http://127.0.0.1:$PORT" --model smollm2-135m-instruct \
        ${WORK[$w]} ${RATE[$w,$load]} --num-prompts "$N" --seed "${SEED[$load]}" --label "$policy" --goodput $GOODPUT \
        --sample-queues 2 --disable-tqdm --output-json "$OUT/$w/${policy}_l${load}.json" \
        | tail -n 25 > "$OUT/$w/${policy}_l${load}.txt"
    done
  done
  stop_sim_server
done
for w in $WORKLOADS; do
  "$RAYLM" bench plot "$OUT/$w"/*.json --out "$OUT/$w/plots" \
    --title "$ENGINES simulated engines, Llama-3-8B on H100 (time x$DILATION), $w"
done
