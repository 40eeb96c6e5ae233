#!/usr/bin/env bash
# Packaged experiments on the GPU machine (repository + .carry: wheels in .carry/whl, tokenizers and the offline zoo
# in .carry/kvhome; no hub):
#   bash scripts/experiments/gpu.sh SPEC [SPEC...]
# runs `kvdistill experiment SPEC --out $RUNS/SPEC` for every SPEC at once (they share the GPU; each spec's
# `concurrent` decides its own runs at once), each under a timeout of $LIMIT seconds (default 570), and copies what
# comes back to $OUT/SPEC/ (depth 2): results.json, results.md, curves.json (the held-out curves and per-run steps,
# FLOPs and times, compact) and run.log (the tail of the log). A spec that ran out of time resumes where it
# stopped when the same command runs again on the same machine ($RUNS kept; default /tmp/kvdistill-runs).
# Environment: OUT (default out/experiments), RUNS, LIMIT, EXTRA (added to every command, e.g. "--seeds 3").
set -u
OUT=${OUT:-out/experiments}
RUNS=${RUNS:-/tmp/kvdistill-runs}
LIMIT=${LIMIT:-570}
[ "$#" -ge 1 ] || { echo "usage: bash scripts/experiments/gpu.sh SPEC [SPEC...]" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .carry/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src KVDISTILL_HOME=$PWD/.carry/kvhome HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 KVDISTILL_LOG=${KVDISTILL_LOG:-INFO} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
mkdir -p "$OUT" "$RUNS"
start=$(date +%s)
pids=()
for spec in "$@"; do
  name=$(basename "${spec%.yaml}")
  mkdir -p "$OUT/$name"
  ( timeout "$LIMIT" python3 -m kvdistill.cli experiment "$spec" --out "$RUNS/$name" ${EXTRA:-} \
      > "$RUNS/$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - start )) s" >> "$RUNS/$name.log" ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for spec in "$@"; do
  name=$(basename "${spec%.yaml}")
  dir="$RUNS/$name"
  { grep -E "kvdistill\.experiments|concurrent auto|Error|error" "$RUNS/$name.log" | grep -v "Loading weights" | tail -40
    echo "-- tail"; grep -v "Loading weights" "$RUNS/$name.log" | tail -30; } > "$OUT/$name/run.log"
  for f in results.json results.md; do [ -f "$dir/$f" ] && cp "$dir/$f" "$OUT/$name/"; done
  if [ -f "$dir/results.json" ]; then
    python3 - "$dir/results.json" "$OUT/$name/curves.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
keep = {k: r.get(k) for k in ("spec", "seeds", "steps", "runs", "curves", "extraction", "train_records",
                              "teacher_train_records", "concurrent", "flops_per_token", "student_params")}
json.dump(keep, open(sys.argv[2], "w"), separators=(",", ":"))
EOF
  else  # no results yet: what finished so far, to see how far it got
    ls "$dir/runs"/*/seed-*/eval.json 2>/dev/null | wc -l | xargs echo "runs scored:" >> "$OUT/$name/run.log"
  fi
  echo "== $name: $(tail -1 "$RUNS/$name.log")"
done
