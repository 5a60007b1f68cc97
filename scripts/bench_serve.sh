#!/usr/bin/env bash
# Serving benchmarks for the README / issue notes: raylm serve at dp 1 and 2, loaded by
# raylm bench serve at concurrency 1 and 32, plus the offline throughput on the same
# workload (for the HTTP/offline ratio) and the whole app's PSS at idle, under load and after.
# Usage: scripts/bench_serve.sh [dtype] [outdir]     (run on an otherwise idle machine)
source "$(dirname "$0")/bench_common.sh"
DTYPE=${1:-bfloat16}
OUT=${2:-docs/bench}
MODEL=smollm2-135m-instruct
PORT=8011
N32=${N32:-100}
N1=${N1:-12}
mkdir -p "$OUT"

# references, without HTTP/Serve/Ray: the same workload through an in-process AsyncEngine at
# the same concurrency (same client-side timing), and the offline LLM API's throughput
if [ -z "${SKIP_OFFLINE:-}" ]; then
  for C in 1 32; do
    N=$([ $C = 1 ] && echo $N1 || echo $N32)
    $RAYLM bench serve --backend inprocess --model $MODEL --dtype $DTYPE --max-model-len 2048 --num-prompts $N \
      --max-concurrency $C --output-json "$OUT/inprocess-c$C-$DTYPE.json" --disable-tqdm
  done
  $RAYLM bench throughput --model $MODEL --dtype $DTYPE --backend raylm --num-prompts $N32 --max-num-seqs 32 \
    --output-json "$OUT/offline-$DTYPE-n$N32-c32.json" --disable-tqdm
fi

CORES=${CORES:-$(nproc)}
for DP in ${DPS:-1 2}; do
  # each replica gets CORES/DP CPUs: Ray sets OMP_NUM_THREADS to that, so torch in a dp=1
  # replica uses every core, as the offline reference does
  CPUS=$(python3 -c "print($CORES / $DP)")
  $RAYLM serve --model $MODEL --dtype $DTYPE --dp $DP --port $PORT --max-model-len 2048 \
    --num-cpus-per-replica $CPUS &
  SERVER=$!
  wait_ready $PORT
  $RAYLM bench memory --pid $SERVER > "$OUT/memory-idle-dp$DP-$DTYPE.json"
  $RAYLM bench serve --base-url http://127.0.0.1:$PORT --model $MODEL --num-prompts $N1 \
    --max-concurrency 1 --output-json "$OUT/serve-dp$DP-c1-$DTYPE.json" --disable-tqdm
  ( sleep 20; $RAYLM bench memory --pid $SERVER > "$OUT/memory-load-dp$DP-$DTYPE.json" ) &
  $RAYLM bench serve --base-url http://127.0.0.1:$PORT --model $MODEL --num-prompts $N32 \
    --max-concurrency 32 --output-json "$OUT/serve-dp$DP-c32-$DTYPE.json" --disable-tqdm
  wait %2 2>/dev/null || true
  $RAYLM bench memory --pid $SERVER > "$OUT/memory-after-dp$DP-$DTYPE.json"
  kill -TERM $SERVER; wait $SERVER || true
  sleep 3
done
