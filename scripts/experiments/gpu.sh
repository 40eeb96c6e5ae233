#!/usr/bin/env bash
# Packaged experiments on the GPU machine (repository + .carry, built by scripts/carry.sh: wheels in .carry/whl,
# tokenizers in .carry/kvhome.tar.xz; no hub):
#   bash scripts/experiments/gpu.sh SPEC[:ARGS] [SPEC[:ARGS]...]
# runs `kvdistill experiment SPEC --out $RUNS/SPEC ARGS` for every SPEC at once (they share the GPU; the memory gate
# keeps their runs from taking the same free memory), each under a timeout of $LIMIT seconds (default 570), e.g.
#   bash scripts/experiments/gpu.sh "kava:--seeds 3 --only E4_long --only nocot_long" distill-small
# and packs what comes back into $OUT/SPEC.tgz (one file a spec): results.json and results.md, run.log (the runner's
# phases, errors, the log's tail and the end of every failed run's log; for a spec refused before it wrote
# anything, that alone), spec.yaml, per run config.yaml, summary.json, eval.json and metrics.jsonl (the held-out
# curves of runs that have not finished too), teacher.json and the caches' cost records: what
# `kvdistill experiment SPEC --out DIR --report` reads to write the results of the runs scored so far. The packs
# are also refreshed every $PACK_EVERY seconds (default 60) while the specs run, each replaced whole, so a call
# cut off before the end (its device time spent, its own limit) still brings back what was scored and the curves
# so far. A spec that ran out of time resumes where it stopped when the same command runs again on the same
# machine ($RUNS kept; default /tmp/kvdistill-runs).
# Environment: OUT (default out/experiments), RUNS, LIMIT, PACK_EVERY, EXTRA (added to every command, e.g.
# "--seeds 3").
set -u
OUT=${OUT:-out/experiments}
RUNS=${RUNS:-/tmp/kvdistill-runs}
LIMIT=${LIMIT:-570}
PACK_EVERY=${PACK_EVERY:-60}
[ "$#" -ge 1 ] || { echo "usage: bash scripts/experiments/gpu.sh SPEC[:ARGS] [SPEC[:ARGS]...]" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/whl/*.whl >/dev/null 2>&1
if [ ! -d .carry/kvhome ] && [ -f .carry/kvhome.tar.xz ]; then tar xJf .carry/kvhome.tar.xz -C .carry; fi
export PYTHONPATH=/tmp/site:$PWD/src KVDISTILL_HOME=$PWD/.carry/kvhome HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 KVDISTILL_LOG=${KVDISTILL_LOG:-INFO} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
mkdir -p "$OUT" "$RUNS"
OUTABS=$(cd "$OUT" && pwd)
start=$(date +%s)

pack() {  # pack NAME: $RUNS/NAME.summary.log and $OUTABS/NAME.tgz, each written beside and renamed into place
  local name=$1 dir="$RUNS/$1" sum="$RUNS/$1.summary.log" list
  { grep -E "kvdistill\.experiments|concurrent auto|Error|error" "$RUNS/$name.log" | grep -v "Loading weights" | tail -40
    echo "-- tail"; grep -v "Loading weights" "$RUNS/$name.log" | tail -30
    echo "runs scored: $(ls "$dir"/runs/*/seed-*/eval.json 2>/dev/null | wc -l)"
    for runlog in "$dir"/runs/*/seed-*.log "$dir"/teachers/*.log; do  # the end of every run that failed
      [ -f "$runlog" ] && grep -qE "Traceback|Error" "$runlog" || continue
      echo "-- ${runlog#"$dir"/}"; grep -v "Loading weights" "$runlog" | tail -15
    done; } > "$sum.tmp" 2>/dev/null
  mv "$sum.tmp" "$sum"
  if [ -d "$dir" ]; then
    cp "$sum" "$dir/run.log"
    list=$(mktemp)
    ( cd "$dir" && find . -maxdepth 1 \( -name results.json -o -name results.md -o -name run.log \
        -o -name spec.yaml -o -name .kvdistill-run \) -print > "$list"
      find runs teachers caches -maxdepth 3 \( -name config.yaml -o -name summary.json -o -name eval.json \
        -o -name metrics.jsonl -o -name teacher.json -o -name "*.json" -path "caches/*" \) -print 2>/dev/null \
        >> "$list"
      tar czf "$OUTABS/.$name.tgz.tmp" -T "$list" 2>/dev/null )
    rm -f "$list"
  else  # refused before it wrote anything (a spec or data error): its log alone, as run.log
    tar czf "$OUTABS/.$name.tgz.tmp" -C "$RUNS" --transform "s|.*|run.log|" "$name.summary.log"
  fi
  mv "$OUTABS/.$name.tgz.tmp" "$OUTABS/$name.tgz"
}

names=()
pids=()
for arg in "$@"; do
  spec=${arg%%:*}; args=""; [ "$arg" != "$spec" ] && args=${arg#*:}
  name=$(basename "${spec%.yaml}")
  names+=("$name")
  # shellcheck disable=SC2086  # ARGS and EXTRA are word lists
  ( timeout "$LIMIT" python3 -m kvdistill.cli experiment "$spec" --out "$RUNS/$name" $args ${EXTRA:-} \
      >> "$RUNS/$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - start )) s" >> "$RUNS/$name.log" ) &
  pids+=($!)
done
rm -f "$RUNS/.packer-stop"
( while :; do  # refresh the packs until the specs end (checked every second)
    for _ in $(seq "$PACK_EVERY"); do [ -e "$RUNS/.packer-stop" ] && exit 0; sleep 1; done
    for name in "${names[@]}"; do pack "$name"; done
  done ) &
packer=$!
for pid in "${pids[@]}"; do wait "$pid"; done
touch "$RUNS/.packer-stop"; wait "$packer"
for name in "${names[@]}"; do
  pack "$name"
  echo "== $name: $(tail -1 "$RUNS/$name.log")"
  tail -25 "$RUNS/$name.summary.log"
done
