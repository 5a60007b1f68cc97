#!/usr/bin/env bash
# Serving benchmarks (issue 17), all in one run on an otherwise idle machine:
#   references without HTTP/Serve: the offline LLM on the 64 concurrency-32 requests (first,
#     and again right before each server: this machine drifts 10-15% within minutes), and the
#     in-process AsyncEngine on the 8 concurrency-1 requests (same client, same timing);
#   raylm serve at dp 1 and dp 2 (a fresh server each; HTTP from the ingress replica, the
#     default), and dp 1 through Serve's HTTP proxy (`--proxy`, tagged dp1p): concurrency 32,
#     then 1, and the whole app's PSS idle and under load (the server and every descendant);
#   llama.cpp's llama-server (2 threads, -np 32 --no-kv-unified -cb), restarted before each
#     run (its prompt cache would make a repeat of the same prompts look faster).
# The concurrency-1 requests use seed 1, so they never hit a prefix cached by the c32 run;
# against a server they alternate, request by request, with an in-process engine in the
# client (`--alternate-inprocess`), so the added TTFT is a paired difference.
# Usage: scripts/bench_serve.sh OUTDIR   (then: python scripts/serve_summary.py OUTDIR)
source "$(dirname "$0")/bench_common.sh"
OUT=$(realpath -m "${1:-docs/bench/serve}")
PORT=8011; PEER_PORT=8013; N32=${N32:-64}; N1=${N1:-8}
PEER=${PEER:-$HOME/.cache/llama-peer}
HF=${RAYLM_CACHE_DIR:-$HOME/.cache/raylm}/models/smollm2-135m-instruct
mkdir -p "$OUT"
c32=(--num-prompts $N32 --max-concurrency 32 --disable-tqdm)
c1=(--num-prompts $N1 --max-concurrency 1 --seed 1 --disable-tqdm)
c1p=("${c1[@]}" --alternate-inprocess --max-model-len 2048)

offline() {  # the offline reference (c32: first; dp1, dp2, llama: right before that server)
  $RAYLM bench throughput --backend raylm --num-prompts $N32 --max-num-seqs 32 \
    --output-json "$OUT/offline-$1.json" --disable-tqdm | tail -1
}

offline c32
$RAYLM bench serve --backend inprocess --max-model-len 2048 "${c1[@]}" \
  --output-json "$OUT/inprocess-c1.json" | grep -E "TTFT|TPOT"

for DP in ${DPS:-1 2 1p}; do
  FLAGS=(--dp ${DP%p}); [ "$DP" = "${DP%p}" ] || FLAGS+=(--proxy)
  offline dp$DP
  # run with &: the subshell execs the server, so $! is raylm serve itself (kill reaches it)
  (exec $RAYLM serve "${FLAGS[@]}" --port $PORT --max-model-len 2048 > "$OUT/server-dp$DP.log" 2>&1) &
  SERVER=$!
  wait_ready $PORT 300
  $RAYLM bench memory --pid $SERVER > "$OUT/memory-idle-dp$DP.json"
  ( sleep 20; $RAYLM bench memory --pid $SERVER > "$OUT/memory-load-dp$DP.json" ) &
  MEM=$!
  $RAYLM bench serve --base-url http://127.0.0.1:$PORT "${c32[@]}" \
    --output-json "$OUT/serve-dp$DP-c32.json" | grep -E "output tok/s|TTFT"
  wait $MEM || true
  $RAYLM bench serve --base-url http://127.0.0.1:$PORT "${c1p[@]}" \
    --output-json "$OUT/serve-dp$DP-c1.json" | grep -E "TTFT|TPOT|added"
  kill -TERM $SERVER; wait $SERVER || true
  .venv/bin/ray stop --force >/dev/null 2>&1 || true  # nothing of this app may load the next
done

if [ -x "$PEER/bin/llama-server" ]; then
  offline llama
  for C in 32 1; do
    LD_LIBRARY_PATH=$PEER/bin "$PEER/bin/llama-server" -m "$PEER/smollm2-bf16.gguf" -t 2 -tb 2 \
      -np 32 -c 32768 --no-kv-unified -cb --host 127.0.0.1 --port $PEER_PORT \
      > "$OUT/llama-server-c$C.log" 2>&1 &
    PEER_PID=$!
    wait_ready $PEER_PORT 120
    ARGS=c$C[@]; [ $C = 1 ] && ARGS=c1p[@]
    ( sleep 20; $RAYLM bench memory --pid $PEER_PID > "$OUT/memory-load-llama-c$C.json" ) &
    MEM=$!
    # --model: the HF dir (the in-process engine's weights when alternating; llama-server
    # serves its one model whatever the body names)
    $RAYLM bench serve --base-url http://127.0.0.1:$PEER_PORT --model "$HF" \
      "${!ARGS}" --output-json "$OUT/llama-server-c$C.json" | grep -E "output tok/s|TTFT|added"
    wait $MEM || true
    kill $PEER_PID; wait $PEER_PID || true
  done
else
  echo "no llama-server at $PEER (../shared/peers/build_llama_cpp.sh builds it): peer skipped"
fi
