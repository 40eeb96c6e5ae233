#!/usr/bin/env bash
# The H200 benchmark runs of BENCHMARKS.md, on a machine with the repository, .carry (wheels, zoo tokenizers) and
# no hub: `bash benchmarks/h200.sh WHAT...` with WHAT real:N (N runs of the real preset, the first profiled),
# large:N (the GPU-filling preset, 5 repeats each), large16:N (it at batch 16, 3 repeats), extract:N (bench_extract);
# JSON and the log go to $OUT (default benchmarks/results). $BENCH_ARGS is added to every bench_train_step call
# (e.g. "--overlap" or "--compile"), $TAG to the result names.
set -u
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src KVDISTILL_HOME=$PWD/.carry/kvhome HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
TAG=${TAG:-}
for what in "$@"; do
  preset=${what%%:*}; n=${what##*:}; name=$preset
  if [ "$preset" = extract ]; then
    for i in $(seq 1 "$n"); do
      timeout 300 python3 benchmarks/bench_extract.py --device cuda --out "$OUT/extract_h200${TAG}_run$i.json" 2>&1 \
        | grep -v "Loading weights" | tail -8
    done
    continue
  fi
  extra=""; prof_first=1
  [ "$preset" = large ] && extra="--repeats 5 --warmup 2"
  [ "$preset" = large16 ] && preset=large && extra="--batch 16 --repeats 3 --warmup 1" && prof_first=0
  for i in $(seq 1 "$n"); do
    prof=""
    [ "$i" = 1 ] && [ $prof_first = 1 ] && prof="--profile"
    start=$(date +%s)
    timeout 300 python3 benchmarks/bench_train_step.py --device cuda --preset "$preset" $extra $prof ${BENCH_ARGS:-} \
      --out "$OUT/train_step_h200_${name}${TAG}_run$i.json" 2>&1 | grep -v "Loading weights" | tail -6
    echo "== $name run $i: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
  done
done
