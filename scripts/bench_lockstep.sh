#!/usr/bin/env bash
# The cost of lockstep (expert parallelism across DP replicas, issue 5): a random-weight
# Qwen3-MoE (scripts/make_bench_model.py --moe) served with --dp 2 --enable-expert-parallel,
# loaded by raylm bench serve twice: spread over both replicas by the router, then all
# pinned to replica 0 (X-data-parallel-rank: 0) while replica 1 runs dummy steps. The
# lockstep gauges from /metrics before and after each run give the dummy steps and their
# own work (collective waits excluded). The reference: the same load on one replica that
# holds every expert (--dp 1, no lockstep) with the same CPU share as each replica above.
# Usage: scripts/bench_lockstep.sh [outdir]     (run on an otherwise idle machine)
source "$(dirname "$0")/bench_common.sh"
OUT=${1:-docs/bench}
MODEL=${MODEL:-/tmp/qwen3-moe-bench}
PORT=8012
N=${N:-64}
C=${C:-16}
mkdir -p "$OUT"
[ -f "$MODEL/config.json" ] || .venv/bin/python scripts/make_bench_model.py "$MODEL" --moe

$RAYLM serve --model "$MODEL" --dtype float32 --dp 2 --enable-expert-parallel --port $PORT --max-model-len 1024 \
  --num-cpus-per-replica 1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER || true' EXIT
wait_ready $PORT 300

lockstep() { curl -s "http://127.0.0.1:$PORT/metrics" | grep '^raylm:dp_' > "$1"; }
# warm both replicas up (no warmup request runs in lockstep mode)
$RAYLM bench serve --base-url http://127.0.0.1:$PORT --model "$MODEL" --tokenizer "$MODEL" --num-prompts 8 \
  --max-concurrency 8 --disable-tqdm > /dev/null
for RUN in spread rank0; do
  EXTRA=$([ $RUN = rank0 ] && echo "--data-parallel-rank 0" || true)
  lockstep "$OUT/lockstep-$RUN-before.prom"
  $RAYLM bench serve --base-url http://127.0.0.1:$PORT --model "$MODEL" --tokenizer "$MODEL" --num-prompts $N \
    --max-concurrency $C $EXTRA --output-json "$OUT/lockstep-$RUN.json" --disable-tqdm
  sleep 2
  lockstep "$OUT/lockstep-$RUN-after.prom"
done
kill -TERM $SERVER; wait $SERVER || true
sleep 3

$RAYLM serve --model "$MODEL" --dtype float32 --dp 1 --port $PORT --max-model-len 1024 --num-cpus-per-replica 1 &
SERVER=$!
wait_ready $PORT 300
$RAYLM bench serve --base-url http://127.0.0.1:$PORT --model "$MODEL" --tokenizer "$MODEL" --num-prompts $N \
  --max-concurrency $C --output-json "$OUT/lockstep-dp1.json" --disable-tqdm
