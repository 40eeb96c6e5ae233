#!/usr/bin/env bash
# Build .carry/, what a GPU machine without kvdistill's dependencies or the model hub needs beside the repository
# (the lent GPU machines: torch, transformers and accelerate installed; no pydantic, gguf, datasets):
#   .carry/whl/             wheels for Python 3.12 / manylinux x86_64 of the packages that image lacks
#   .carry/kvhome.tar.xz    the offline zoo's tokenizers (no weights; the experiments train their models from
#                           configs) and the generated data files of $KVDISTILL_HOME/data (GSM-Symbolic problems:
#                           the GPU image has no reasoning_gym), unpacked by scripts/experiments/gpu.sh into
#                           .carry/kvhome
#
#   bash scripts/carry.sh              # pydantic (+ its needs), gguf; every zoo tokenizer      about 8 MB
#   bash scripts/carry.sh --datasets   # also datasets, dill, multiprocess, pyarrow (55 MB):    data files
#                                      # (JSON lines, CSV, parquet) read through `datasets`; the benchmarks
#                                      # bench_fsdp_offload and bench_ddp need them, the arithmetic specs do not
#   bash scripts/carry.sh --no-gemma   # leave out the Gemma tokenizer (the largest, 33 MB unpacked)
#   bash scripts/carry.sh --spec specialists   # first generate every data file that spec's runs read
#                                      # (`kvdistill experiment SPEC --plan`; repeatable): 13.7 MB of
#                                      # GSM-Symbolic problems for specialists, about 1 MB compressed
#
# Run from the repository root after scripts/setup.sh (the zoo must be fetched); .carry is added to
# .git/info/exclude. A call carries it with `carry: [".carry"]`; the whole tree must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS=0; GEMMA=1; SPECS=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --datasets) DATASETS=1 ;;
    --no-gemma) GEMMA=0 ;;
    --spec) [ "$#" -ge 2 ] || { echo "carry.sh: --spec needs a spec name or YAML path" >&2; exit 2; }
            SPECS+=("$2"); shift ;;
    *) echo "carry.sh: unknown option '$1' (known: --datasets, --no-gemma, --spec SPEC)" >&2; exit 2 ;;
  esac
  shift
done
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
grep -qx "/.carry/" .git/info/exclude 2>/dev/null || echo "/.carry/" >> .git/info/exclude
rm -rf .carry/whl && mkdir -p .carry/whl
pkgs=(pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf)
[ "$DATASETS" = 1 ] && pkgs+=(datasets dill multiprocess "pyarrow>=24")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .carry/whl "${pkgs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
home=$("$PY" -c "from kvdistill.models import zoo; print(zoo.home())")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for name in gpt2-tokenizer llama2-tokenizer smollm2-135m gemma3-270m; do
  [ "$name" = gemma3-270m ] && [ "$GEMMA" = 0 ] && continue
  src="$home/zoo/$name"
  [ -f "$src/kvdistill_zoo.json" ] || { echo "carry.sh: $src is missing: run bash scripts/setup.sh" >&2; exit 1; }
  mkdir -p "$stage/kvhome/zoo/$name"
  find "$src" -maxdepth 1 -type f ! -name "*.safetensors" -exec cp {} "$stage/kvhome/zoo/$name/" \;
done
for spec in "${SPECS[@]}"; do  # generates what its runs read into $home/data; writes nothing else
  "$PY" -m kvdistill.cli experiment "$spec" --out "$stage/plan" --plan | tail -1
done
if compgen -G "$home/data/*.jsonl" > /dev/null; then
  mkdir -p "$stage/kvhome/data" && cp "$home"/data/*.jsonl "$stage/kvhome/data/"
fi
tar cJf .carry/kvhome.tar.xz -C "$stage" kvhome
rm -rf .carry/kvhome
du -sh .carry/whl .carry/kvhome.tar.xz
