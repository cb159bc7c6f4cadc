#!/usr/bin/env bash
# Every GPU figure still to be taken, in one call on a lent GPU machine (H100/H200: torch 2.11,
# triton 3.6, no network; nothing to install: the package runs from src/). Each step has a
# time limit of its own, so one that hangs does not lose the others; logs go to $OUT.
#
#   bash benchmarks/gpu_session.sh                 # on the GPU machine, under 10 minutes
#   QUICK=1 bash benchmarks/gpu_session.sh         # a smoke test of the script on a CPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it, log to $OUT/NAME.txt, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
    tail -n 40 "$OUT/$name.txt"
}

if [ -n "${QUICK:-}" ]; then  # the same steps, small, on the CPU
    step tests 300 "$PY" -m pytest tests/test_fusion.py -q -x -p no:cacheprovider
    step targets 300 "$PY" benchmarks/gpu_targets.py --device cpu --dtype float32 \
        --batch-size 4 --quick
    step training 300 "$PY" benchmarks/gpu_training.py --device cpu --quick --detail
    exit 0
fi
step machine 30 bash -c "nvidia-smi -L; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
# the kernels against F.conv2d on the GPU itself (CI runs them under the interpreter)
step tests 150 "$PY" -m pytest tests/test_fusion.py tests/test_kernels.py -q -n 8 \
    -p no:cacheprovider
# compile is left out (minutes of compiling per model; its figures are in the issue), and the
# paper's tables run on cuDNN alone: every new shape costs the Triton autotuner seconds
step targets 330 "$PY" benchmarks/gpu_targets.py --paths fold triton dispatch fused cudagraph \
    --table-paths fold
step training 90 "$PY" benchmarks/gpu_training.py --steps eager eager+dispatch --skip-layers
