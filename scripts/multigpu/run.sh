#!/usr/bin/env bash
# Every multi-GPU run of issue 16 as one command: DDP throughput and weights (torchrun and accelerate launch),
# sharded extraction + merge, a killed rank + resume, on 1..N processes; JSON into OUTDIR.
#
#   bash scripts/multigpu/run.sh N OUTDIR [--cpu] [bench_ddp.py flags]
#
#   N=4 on a 4-GPU machine: processes 1,2,4 (NCCL), real preset   -> OUTDIR/ddp.json, work files in OUTDIR/work
#   N=2 --cpu on any machine: processes 1,2 (gloo), tiny preset
#   --distributed fsdp [--cpu-offload]: every launch shards the student (train.distributed fsdp, FSDP2) instead
#   of replicating it (ddp, the default); e.g. the scaling run under FSDP on 8 GPUs:
#       bash scripts/multigpu/run.sh 8 out/fsdp --distributed fsdp
# From the repository root. Uses .venv/bin/python when there is one, else python3; where pydantic is missing
# and .carry/whl exists (the lent GPU machines), installs those wheels into /tmp/site first.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash scripts/multigpu/run.sh N OUTDIR [--cpu] [bench_ddp.py flags]" >&2
    exit 2
fi
N=$1; OUTDIR=$2; shift 2
case "$N" in ''|*[!0-9]*) echo "run.sh: N must be a number of GPUs (processes with --cpu), got '$N'" >&2; exit 2;; esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

# NVLink multicast off in every launch on the shared machines
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

PY=python3
[ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python
if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if [ -d .carry/whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .carry/whl/*.whl >/dev/null
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "run.sh: pydantic is not installed and there is no .carry/whl to install it from" >&2
        exit 1
    fi
fi
"$PY" -c "import kvdistill" 2>/dev/null || export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
[ ! -d .carry/kvhome ] && [ -f .carry/kvhome.tar.xz ] && tar xJf .carry/kvhome.tar.xz -C .carry  # scripts/carry.sh
[ -z "${KVDISTILL_HOME:-}" ] && [ -d .carry/kvhome ] && export KVDISTILL_HOME=$ROOT/.carry/kvhome

CPU=0
for a in "$@"; do [ "$a" = "--cpu" ] && CPU=1; done
if [ "$CPU" = 1 ]; then
    NPROCS=$(seq -s, 1 "$N")
else
    GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    if [ "${GPUS:-0}" -lt "$N" ]; then
        echo "run.sh: $N GPUs asked for, ${GPUS:-0} visible (pass --cpu for gloo on CPU)" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
    NPROCS=1; p=2
    while [ "$p" -le "$N" ]; do NPROCS=$NPROCS,$p; p=$((p * 2)); done
    [ "$N" -gt 1 ] && [ "${NPROCS##*,}" != "$N" ] && NPROCS=$NPROCS,$N
fi
PHASES=train,extract,kill
[ "$N" -lt 2 ] && PHASES=train,extract   # a killed rank needs a second process
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd benchmarks
exec "$PY" bench_ddp.py --out "$OUTDIR/work" --json "$OUTDIR/ddp.json" --nprocs "$NPROCS" --phases "$PHASES" "$@"
