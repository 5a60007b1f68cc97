#!/usr/bin/env bash
# usage: cpuab.sh OUT ROUNDS label=DIR ...   (DIR: a source tree; the server runs from it)
cd /work/main; source scripts/bench_common.sh
OUT=$1; ROUNDS=$2; shift 2; mkdir -p $OUT
for R in $(seq 1 $ROUNDS); do for V in "$@"; do
  L=${V%%=*}; DIR=${V#*=}
  (cd $DIR && exec env PYTHONPATH=$DIR /work/main/.venv/bin/raylm serve --dp 2 --port 8011 --max-model-len 2048 > $OUT/server-$L-r$R.log 2>&1) &
  SERVER=$!; wait_ready 8011 300
  .venv/bin/python scripts/cpu_by_process.py --json $OUT/cpu-$L-r$R.json -- $RAYLM bench serve \
    --base-url http://127.0.0.1:8011 --num-prompts 64 --max-concurrency 32 --seed $R --disable-tqdm \
    --output-json $OUT/serve-$L-r$R.json > $OUT/cpu-$L-r$R.txt
  echo "$L r$R $(grep 'output tok/s' $OUT/cpu-$L-r$R.txt)"; grep -E "wall|Ingress|LLMServer|Coordinator|Controller" $OUT/cpu-$L-r$R.txt
  kill -TERM $SERVER; wait $SERVER || true; .venv/bin/ray stop --force >/dev/null 2>&1 || true
done; done
