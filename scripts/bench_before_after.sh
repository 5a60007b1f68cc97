#!/usr/bin/env bash
# Same-run before/after comparison of commits: offline throughput, single-stream latency and
# HTTP serving (dp 2, concurrency 32), with raylm imported from a worktree of each commit
# (the same .venv). Run on an otherwise idle machine; commits run in the order given.
# Usage: scripts/bench_before_after.sh OUTDIR DTYPE COMMIT [COMMIT ...]
source "$(dirname "$0")/bench_common.sh"
OUT=$(realpath -m "$1"); DTYPE=$2; shift 2
PY=$PWD/.venv/bin/python
PORT=8012
mkdir -p "$OUT"
for REF in "$@"; do
  WT=/tmp/raylm-bench-$REF
  [ -d "$WT" ] || git worktree add -q --detach "$WT" "$REF"
  # the installed layout: kernels/ and deployments/ live under the raylm package
  ln -sfn ../kernels "$WT/raylm/kernels"; ln -sfn ../deployments "$WT/raylm/deployments"
  # from inside the worktree: `python -m` puts the current directory first on sys.path
  export PYTHONPATH=$WT  # also reaches Ray's workers (the raylet inherits it)
  pushd "$WT" >/dev/null
  $PY -c "import raylm.engine.core as c; print('$REF:', c.__file__)"
  $PY -m raylm.cli bench throughput --dtype "$DTYPE" --backend raylm --num-prompts 100 --disable-tqdm \
    --output-json "$OUT/throughput-$REF.json"
  $PY -m raylm.cli bench latency --dtype "$DTYPE" --input-len 128 --output-len 64 --iters 5 \
    --output-json "$OUT/latency-$REF.json"
  $PY -m raylm.cli serve --dtype "$DTYPE" --dp 2 --port $PORT --max-model-len 2048 --num-cpus-per-replica 1 &
  SERVER=$!
  wait_ready $PORT
  $PY -m raylm.cli bench serve --base-url http://127.0.0.1:$PORT --num-prompts 100 --max-concurrency 32 \
    --output-json "$OUT/serve-dp2-c32-$REF.json" --disable-tqdm
  kill -TERM $SERVER; wait $SERVER || true
  popd >/dev/null
  unset PYTHONPATH
done
