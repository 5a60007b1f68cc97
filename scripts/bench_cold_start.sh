#!/usr/bin/env bash
# Cold and warm start of an offline engine (LLM() + one greedy token), before/after, from
# the git worktrees scripts/bench_cpu_fast_path.sh made. Cold: an empty cache dir but for
# the converted model (symlinked), so the C kernels build and the GEMM probe runs; warm: the
# same dir again. Usage: scripts/bench_cold_start.sh BEFORE AFTER
set -u
PY=$PWD/.venv/bin/python
CODE='import time; t=time.perf_counter()
from raylm import LLM, SamplingParams
llm = LLM(max_model_len=512)
llm.generate(["Hi"], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
print(f"{time.perf_counter() - t:.2f}")'
for ROUND in 1 2; do
  for REF in "$@"; do
    DIR=$(mktemp -d); ln -s "${RAYLM_CACHE_DIR:-$HOME/.cache/raylm}/models" "$DIR/models"
    for KIND in cold warm; do
      S=$(cd /tmp/raylm-bench-$REF && RAYLM_CACHE_DIR=$DIR PYTHONPATH=. $PY -c "$CODE" 2>/dev/null | tail -1)
      echo "round $ROUND $REF $KIND ${S}s"
    done
    rm -rf "$DIR"
  done
done
