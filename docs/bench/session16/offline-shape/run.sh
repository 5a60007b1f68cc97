#!/usr/bin/env bash
# (session 16 experiment; writes /tmp/s16/off*.json, copied here)
# two offline engines at once, one thread each, 32 requests and 16 seqs each (the dp-2 shape
# without HTTP), then one two-threaded engine on 64 requests, 32 seqs; twice
cd /work/main
for i in 1 2; do
  for h in a b; do
    RAYLM_NUM_THREADS=1 .venv/bin/raylm bench throughput --backend raylm --num-prompts 32 --max-num-seqs 16 \
      --seed $([ $h = a ] && echo 11 || echo 12) --output-json /tmp/s16/off2-$i$h.json --disable-tqdm > /dev/null 2>&1 &
  done
  wait
  .venv/bin/raylm bench throughput --backend raylm --num-prompts 64 --max-num-seqs 32 --seed 11 \
      --output-json /tmp/s16/off1-$i.json --disable-tqdm > /dev/null 2>&1
  python3 - $i <<'PY'
import json,sys
i=sys.argv[1]
r=[json.load(open(f'/tmp/s16/off2-{i}{h}.json'))['results']['raylm'] for h in 'ab']
one=json.load(open(f'/tmp/s16/off1-{i}.json'))['results']['raylm']
tot=sum(x['output_tokens'] for x in r); el=max(x['elapsed_s'] for x in r)
print(f"round {i}: two 1-thread engines {tot/el:.1f} tok/s (each {[round(x['output_tok_s'],1) for x in r]}), one 2-thread engine {one['output_tok_s']:.1f}; ratio {tot/el/one['output_tok_s']:.2f}")
PY
done
