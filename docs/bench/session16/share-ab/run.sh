#!/usr/bin/env bash
# (session 16 experiment; writes /tmp/s16/ab-*.json; the serve JSONs are summarized in summary.json)
# A/B: served c32 at dp 2 with and without share-cores, fresh server each, same seed; engine
# CPU per output token from /proc
source /work/main/scripts/bench_common.sh
cd /work/main
PORT=8011
run() {  # TAG FLAGS...
  local tag=$1; shift
  (exec $RAYLM serve --port $PORT --max-model-len 2048 "$@" > /tmp/s16/ab-$tag.log 2>&1) &
  local server=$!
  wait_ready $PORT 300
  .venv/bin/python scripts/cpu_by_process.py --json /tmp/s16/ab-$tag-cpu.json -- $RAYLM bench serve \
    --base-url http://127.0.0.1:$PORT --num-prompts 64 --max-concurrency 32 --seed ${SEED:-5} --disable-tqdm \
    --output-json /tmp/s16/ab-$tag.json > /dev/null
  python3 - $tag <<'PY'
import json,sys
t=sys.argv[1]; d=json.load(open(f'/tmp/s16/ab-{t}.json'))['results']; c=json.load(open(f'/tmp/s16/ab-{t}-cpu.json'))['processes']
eng=sum(p['cpu_s'] for p in c if 'LLMServer' in p['process']); rest=sum(p['cpu_s'] for p in c if 'LLMServer' not in p['process'])
print(f"{t}: {d['output_throughput']:.1f} tok/s, duration {d['duration_s']:.1f} s, engines {eng:.1f} CPU-s = {1000*eng/d['total_output_tokens']:.2f} ms/token, rest {rest:.1f}")
PY
  kill -TERM $server; wait $server || true
  .venv/bin/ray stop --force >/dev/null 2>&1 || true
}
SEED=6 run share3; SEED=6 run noshare3 --no-share-cores
SEED=7 run noshare4 --no-share-cores; SEED=7 run share4
SEED=8 run share5; SEED=8 run noshare5 --no-share-cores
