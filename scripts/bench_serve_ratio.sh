#!/usr/bin/env bash
# HTTP vs offline throughput at concurrency 32 (issue 17), in rounds: this machine drifts
# 10-15% within minutes, so a single offline run minutes away from a single served one
# moves the ratio by as much. Each round r draws its own 64 workload-A requests (seed r)
# and runs them offline (`raylm bench throughput`), then through a fresh `raylm serve`
# (`raylm bench serve --max-concurrency 32`, EOS ignored by both), back to back with
# nothing else running; a fresh server per round, so no prompt is in its prefix cache.
# A DPS entry may carry server env settings to compare (DP:NAME=VALUE[,NAME=VALUE]); the
# variants take turns within each round, labelled dp<DP>v<index> (listed in variants.txt).
# SANDWICH=1 runs the offline reference again after each server: the ratio is then taken
# against the mean of the two (the machine's speed moves by up to 15% in two minutes).
# ARGS="--flag ..." in a variant adds those `raylm serve` flags (space-separated).
# SRC=COMMIT in a variant serves that commit (a worktree, scripts/bench_worktrees.sh); the
# offline reference always runs this checkout. Each server's processes' CPU over its run goes
# to cpu-<label>-rR.json (scripts/cpu_by_process.py): the summary splits the ratio into the
# engines' share of the machine and their CPU per token against the offline engine's.
# Usage: ROUNDS=3 DPS="1 2" scripts/bench_serve_ratio.sh OUTDIR
#        ROUNDS=5 DPS="2 2:RAY_SERVE_FOO=1" scripts/bench_serve_ratio.sh OUTDIR
#        ROUNDS=5 DPS="2 2:SRC=abc1234" scripts/bench_serve_ratio.sh OUTDIR
#        ROUNDS=5 DPS="2 2:ARGS=--no-include-dashboard" scripts/bench_serve_ratio.sh OUTDIR
#        (then: python scripts/serve_ratio_summary.py OUTDIR)
source "$(dirname "$0")/bench_common.sh"
source "$(dirname "$0")/bench_worktrees.sh"
OUT=$(realpath -m "${1:-docs/bench/serve-ratio}")
PORT=8011; N32=${N32:-64}
mkdir -p "$OUT"
: > "$OUT/variants.txt"
offline() {  # offline NAME R: the offline reference of round R into NAME-<label>-rR.json
  $RAYLM bench throughput --backend raylm --num-prompts $N32 --max-num-seqs 32 --seed $2 \
    --output-json "$OUT/$1-$L-r$2.json" --disable-tqdm | tail -1
}
for R in $(seq 1 "${ROUNDS:-3}"); do
  I=0
  for V in ${DPS:-1 2}; do
    I=$((I + 1)); DP=${V%%:*}; ENVS=(); L=dp$DP
    if [[ $V == *:* ]]; then
      IFS=, read -ra ENVS <<< "${V#*:}"; L=dp${DP}v$I
      [[ $R == 1 ]] && echo "$L: ${V#*:}" >> "$OUT/variants.txt"
    fi
    DIR=$PWD; ARGS=()
    for E in "${ENVS[@]}"; do  # Ray's workers import from the server's directory first
      [[ $E == SRC=* ]] && bench_worktrees "${E#SRC=}" && DIR=/tmp/raylm-bench-${E#SRC=}
      [[ $E == ARGS=* ]] && read -ra ARGS <<< "${E#ARGS=}"
    done
    offline offline $R
    (cd "$DIR" && exec env "${ENVS[@]}" PYTHONPATH="$DIR" "$OLDPWD/$RAYLM" serve --dp $DP \
      --port $PORT --max-model-len 2048 "${ARGS[@]}" > "$OUT/server-$L-r$R.log" 2>&1) &
    SERVER=$!
    wait_ready $PORT 300
    .venv/bin/python scripts/cpu_by_process.py --json "$OUT/cpu-$L-r$R.json" -- \
      $RAYLM bench serve --base-url http://127.0.0.1:$PORT --num-prompts $N32 --max-concurrency 32 \
      --seed $R --disable-tqdm --output-json "$OUT/serve-$L-r$R.json" | grep -E "output tok/s"
    kill -TERM $SERVER; wait $SERVER || true
    .venv/bin/ray stop --force >/dev/null 2>&1 || true
    if [[ -n ${SANDWICH:-} ]]; then offline offline-after $R; fi
  done
done
