#!/usr/bin/env bash
# Issue 16's figures, before/after in one run (alternating, from git worktrees of each
# commit, the same .venv), with the llama.cpp peer and this machine's limits measured in
# the same run. Run on an otherwise idle machine, after ../shared/peers/build_llama_cpp.sh.
# Every raylm run uses the default settings (dtype included). Offline throughput last: raylm
# at both commits, HF static batching once (with AFTER).
# Usage: scripts/bench_cpu_fast_path.sh OUTDIR BEFORE AFTER
set -u
OUT=$(realpath -m "$1"); BEFORE=$2; AFTER=$3
PY=$PWD/.venv/bin/python
PEER=${LLAMA_PEER:-$HOME/.cache/llama-peer}
mkdir -p "$OUT"
source "$(dirname "$0")/bench_worktrees.sh"
bench_worktrees $BEFORE $AFTER
run() {  # REF NAME ARGS...: one raylm bench from REF's worktree
  local REF=$1 NAME=$2; shift 2
  (cd /tmp/raylm-bench-$REF && PYTHONPATH=/tmp/raylm-bench-$REF $PY -m raylm.cli bench "$@" \
     --output-json "$OUT/$NAME-$REF.json" 2>&1 | tail -1 | sed "s/^/$NAME $REF: /")
}
$PY -m raylm.cli bench kernels --dtype bfloat16 --output-json "$OUT/kernels-bf16.json" > "$OUT/kernels-bf16.txt"; head -1 "$OUT/kernels-bf16.txt"
$PY -m raylm.cli bench kernels --dtype float32 --output-json "$OUT/kernels-fp32.json" > "$OUT/kernels-fp32.txt"; head -1 "$OUT/kernels-fp32.txt"
for ROUND in 1 2; do
  for REF in $BEFORE $AFTER; do
    run $REF latency-r$ROUND latency --input-len 128 --output-len 128 --iters 5
    run $REF step-r$ROUND step --batch-size 1 32 64 --input-len 256 --steps 20
    run $REF prefill-r$ROUND latency --input-len 512 --output-len 1 --iters 5
  done
  LD_LIBRARY_PATH=$PEER/bin $PEER/bin/llama-bench -m $PEER/smollm2-bf16.gguf -t 2 -p 512 -n 128 -r 3 -o json \
    > "$OUT/llama-bench-r$ROUND.json" 2>/dev/null && echo "llama-bench r$ROUND done"
done
run $BEFORE throughput throughput --num-prompts 200 --backend raylm --disable-tqdm
run $AFTER throughput throughput --num-prompts 200 --backend both --disable-tqdm
