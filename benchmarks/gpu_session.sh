#!/usr/bin/env bash
# The GPU session, in two runs of at most 5 minutes each on a lent GPU machine (H100/H200:
# torch 2.11, triton 3.6, no network; nothing to install: the package runs from src/). Each
# step has a time limit of its own, sized by the kernel variants it compiles
# (`python benchmarks/gpu_plan.py` counts them on a CPU), so one that hangs does not lose the
# others; logs, the tests' JUnit XML and a summary of the steps go to $OUT.
#
#   bash benchmarks/gpu_session.sh 1      # first run: correctness on the GPU, bench, training
#   bash benchmarks/gpu_session.sh 2      # second run: the targets tables
#   QUICK=1 bash benchmarks/gpu_session.sh 1   # a smoke test of the script on a CPU
#
# Run 1 (limits add up to 270 s): the gpu_quick test subset (every kernel and code path,
# small shapes, the first configuration only: DEEPROOTS_AUTOTUNE=first), the bench of nin
# and nin-root-8 in the kernel paths, 50 training steps with the default grouped-conv setting.
# Run 2 (limits add up to 280 s): benchmarks/gpu_targets.py for nin-root-8 and
# resnet50-root-64, and benchmarks/gpu_training.py with the first configuration of each kernel.
set -u
cd "$(dirname "$0")/.."
RUN=${1:-1}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it, log to $OUT/NAME.txt, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    # SIGINT first (pytest then prints its failures and writes its XML), KILL 10 s later
    timeout -s INT -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== run $RUN $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" \
        | tee -a "$OUT/steps.txt"
    tail -n 30 "$OUT/$name.txt"
}

if [ -n "${QUICK:-}" ]; then  # the same steps, small, on the CPU
    step tests 300 "$PY" -m pytest -m gpu_quick tests/test_fusion.py -q -p no:cacheprovider \
        --junitxml "$OUT/tests.xml"
    step targets 300 "$PY" benchmarks/gpu_targets.py --device cpu --dtype float32 \
        --batch-size 4 --quick
    step training 300 "$PY" benchmarks/gpu_training.py --device cpu --quick --detail
    exit 0
fi
if [ "$RUN" = 1 ]; then
    step machine 20 bash -c "nvidia-smi -L; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
    # every kernel and code path against F.conv2d on the GPU itself (CI runs every shape
    # under the interpreter); one configuration per variant
    DEEPROOTS_AUTOTUNE=first step tests 90 "$PY" -m pytest -m gpu_quick -q -n 8 \
        -p no:cacheprovider --junitxml "$OUT/tests.xml"
    step bench 85 "$PY" -m deeproots bench nin nin-root-8 --device cuda --dtype bfloat16 \
        --batch-size 256 --path fold dispatch fused cudagraph --repeats 10
    step train 75 "$PY" -m deeproots train nin-root-8 --data fashion-mnist \
        --data-dir data/fashion-mnist --device cuda --epochs 1 --limit-train-batches 50 \
        --limit-eval-batches 5 --out "$OUT/train" --no-progress --log-every 10
else
    # googlenet-root-16 left out: its 17 per-group widths alone are 34 more kernel variants
    step targets 190 "$PY" benchmarks/gpu_targets.py --paths fold dispatch fused cudagraph \
        --models nin-root-8 resnet50-root-64 --table-paths fold
    # the first configuration of each Triton kernel against cuDNN (61 variants otherwise)
    DEEPROOTS_AUTOTUNE=first step training 90 "$PY" benchmarks/gpu_training.py \
        --steps eager eager+dispatch --skip-layers
fi
