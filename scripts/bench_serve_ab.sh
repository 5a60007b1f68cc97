#!/usr/bin/env bash
# The serving path before/after two commits, alternating, from the git worktrees that
# scripts/bench_cpu_fast_path.sh makes: raylm serve --dp 1 loaded at concurrency 32 and 1,
# then the references with AFTER's code (offline LLM at 32 sequences, the in-process
# AsyncEngine at concurrency 1). Usage: scripts/bench_serve_ab.sh OUTDIR BEFORE AFTER
source "$(dirname "$0")/bench_common.sh"
OUT=$(realpath -m "$1"); BEFORE=$2; AFTER=$3
PY=$PWD/.venv/bin/python; PORT=8012; N32=${N32:-64}; N1=${N1:-8}
mkdir -p "$OUT"
source "$(dirname "$0")/bench_worktrees.sh"
bench_worktrees $BEFORE $AFTER
cli() { (cd /tmp/raylm-bench-$1 && shift && PYTHONPATH=. $PY -m raylm.cli "$@"); }
# run with &: the background subshell execs the CLI, so $! is the server itself
serve_from() { cd /tmp/raylm-bench-$1 && shift && PYTHONPATH=. exec $PY -m raylm.cli serve "$@"; }
port_free() {  # wait (at most 120 s) until nothing answers on the port: the next server's own
  for _ in $(seq 1 120); do curl -s "http://127.0.0.1:$1/health" >/dev/null 2>&1 || return 0; sleep 1; done
  echo "port $1 still answers" >&2; return 1
}
port_free $PORT
for ROUND in ${ROUNDS:-1}; do
  for REF in $BEFORE $AFTER; do
    serve_from $REF --dp 1 --port $PORT --max-model-len 2048 > "$OUT/server-$REF-r$ROUND.log" 2>&1 &
    SERVER=$!
    wait_ready $PORT
    for C in 32 1; do
      N=$([ $C = 1 ] && echo $N1 || echo $N32)
      cli $REF bench serve --base-url http://127.0.0.1:$PORT --num-prompts $N --max-concurrency $C \
        --output-json "$OUT/serve-c$C-$REF-r$ROUND.json" --disable-tqdm | tail -3
    done
    ps -eo ni,comm,args | grep -E "LLMServer|ServeReplica" | grep -v grep | cut -c1-80 \
      > "$OUT/nice-$REF-r$ROUND.txt" || true
    kill -TERM $SERVER; wait $SERVER || true
    port_free $PORT
  done
done
cli $AFTER bench throughput --backend raylm --num-prompts $N32 --max-num-seqs 32 \
  --output-json "$OUT/offline-c32-$AFTER.json" --disable-tqdm | tail -2
cli $AFTER bench serve --backend inprocess --max-model-len 2048 --num-prompts $N1 --max-concurrency 1 \
  --output-json "$OUT/inprocess-c1-$AFTER.json" --disable-tqdm | tail -3
