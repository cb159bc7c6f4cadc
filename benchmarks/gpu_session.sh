#!/usr/bin/env bash
# The GPU session: ONE call of at most 8 minutes on a lent GPU machine (H100/H200: torch 2.11,
# triton 3.6, pytest-xdist, pytest-timeout; no package registry, no data; nothing to install:
# the package runs from src/). Its data are made on the machine (synthetic Fashion-MNIST-format
# files, written by the tests' own helper), so nothing needs carrying:
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)      # the device tool
#   QUICK=1 bash benchmarks/gpu_session.sh                             # rehearsal on a CPU
#
# The steps, in order of what they tell per second; each has a time limit of its own (SIGINT,
# then KILL 10 s later) sized by the kernel variants it compiles (`python
# benchmarks/gpu_plan.py` counts them and prints these limits):
#   machine   nvidia-smi, torch, triton                                              10 s
#   tests     pytest -m gpu_quick on the GPU, CUDA_LAUNCH_BLOCKING=1, 60 s a test,  131 s
#             JUnit XML, one configuration a kernel (DEEPROOTS_AUTOTUNE=first)
#   check     every Triton kernel against cuDNN on the real shapes of nin-root-8      62 s
#             and resnet50-root-64 (forward, both gradients, the fused blocks; max
#             error per layer), benchmarks/gpu_check.py
#   train     deeproots train nin and nin-root-8, native and dispatch, 40 steps     117 s
#             each on the synthetic data (img/s, the dispatch's choices and notes)
#   bench     deeproots bench nin nin-root-8, bf16, batch 256: fold, dispatch,    20+3x33 s
#             fused, cudagraph, each path its own process and limit
#   targets   gpu_targets.py --tables-only: resnet50-root-64's per-layer and fused   47 s
#             tables, row by row
# Everything goes into one archive, $OUT/session.tar.gz (each step's log, the tests' XML, the
# run folders' summaries and records), rewritten after every step, and one line per step in
# $OUT/summary.txt, so that a step (or the call) killed at its limit still leaves what the
# steps before it measured: two files back of the 8 the device tool returns.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
QUICK=${QUICK:-}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/deeproots-gpu.XXXXXX")
SUMMARY="$OUT/summary.txt"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STARTED=$SECONDS
: > "$SUMMARY"

archive() {  # the work folder as one archive in $OUT, replaced whole (never half written)
    # (the checkpoints left out: weights of a few training steps, megabytes each)
    tar -czf "$OUT/session.tmp" --exclude='*.pt' -C "$WORK" . 2>/dev/null && \
        mv "$OUT/session.tmp" "$OUT/session.tar.gz"
}

step() {  # step NAME SECONDS COMMAND...: run it, log to NAME.txt, say how it ended, archive
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout -s INT -k 10 "$limit" "$@" > "$WORK/$name.txt" 2>&1
    local rc=$?
    local last
    last=$(grep -v '^\s*$' "$WORK/$name.txt" | tail -n 1 | cut -c1-160)
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s): $last" \
        | tee -a "$SUMMARY"
    archive
}

if [ -n "$QUICK" ]; then  # every step, small, under Triton's interpreter on the CPU
    export TRITON_INTERPRET=1
    DEVICE=cpu DTYPE=float32 BATCH=2 SIZE=8 N_TRAIN=256 N_TEST=64 STEPS=4
    PATHS="fold dispatch fused" GROUPED="native triton"
    MACHINE="$PY -c 'import platform, torch, triton; print(platform.processor() or platform.machine(), torch.__version__, triton.__version__, \"(interpreter)\")'"
    TESTS=(-m gpu_quick tests/test_fusion.py tests/test_gpu_safety.py)
    CHECK=(--device cpu --quick)
    TARGETS=(--device cpu --dtype float32 --batch-size 2 --tables-only --models nin-root-8
             --repeats 2)
    LIMITS="300 300 300 240 120"  # the interpreter: minutes where a GPU takes seconds
else
    DEVICE=cuda DTYPE=bfloat16 BATCH=256 SIZE=28 N_TRAIN=12800 N_TEST=2560 STEPS=40
    PATHS="fold dispatch fused cudagraph" GROUPED="native dispatch"
    MACHINE="nvidia-smi -L; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
    TESTS=(-m gpu_quick -n 8 --timeout 60)
    CHECK=()
    TARGETS=(--tables-only --models resnet50-root-64 --repeats 10)
    LIMITS="131 62 117 33 47"  # python benchmarks/gpu_plan.py: "limits for gpu_session.sh"
fi
# (each may be set from outside: L_TESTS=200 bash benchmarks/gpu_session.sh, say)
read -r d_tests d_check d_train d_bench d_targets <<< "$LIMITS"
L_TESTS=${L_TESTS:-$d_tests} L_CHECK=${L_CHECK:-$d_check} L_TRAIN=${L_TRAIN:-$d_train}
L_BENCH=${L_BENCH:-$d_bench} L_TARGETS=${L_TARGETS:-$d_targets}

step machine 10 bash -c "$MACHINE"
# every kernel and code path against F.conv2d on the device itself, small shapes; an
# asynchronous fault (an illegal address) is reported where it happens
CUDA_LAUNCH_BLOCKING=1 DEEPROOTS_AUTOTUNE=first step tests "$L_TESTS" "$PY" -m pytest \
    "${TESTS[@]}" -q -p no:cacheprovider --junitxml "$WORK/tests.xml"
DEEPROOTS_AUTOTUNE=first step check "$L_CHECK" "$PY" benchmarks/gpu_check.py "${CHECK[@]}"

# the training data, made here: Fashion-MNIST's own file format, a learnable rule
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from helpers import write_fashion_mnist; \
write_fashion_mnist(Path('$WORK/data'), n_train=$N_TRAIN, n_test=$N_TEST, size=$SIZE)"
for model in nin nin-root-8; do
    for how in $GROUPED; do
        # the dispatch compiles and measures nin-root-8's Triton kernels: half the limit
        limit=$((L_TRAIN / 6))
        if [ "$how" != native ] && [ "$model" != nin ]; then limit=$((L_TRAIN / 2)); fi
        step "train-$model-$how" "$limit" "$PY" -m deeproots train "$model" \
            --data fashion-mnist --data-dir "$WORK/data" --device "$DEVICE" --epochs 1 \
            --batch-size "$BATCH" --limit-train-batches "$STEPS" --grouped-conv "$how" \
            --out "$WORK/runs/$model-$how" --no-progress --log-every 10 --allocator system
    done
done
for path in $PATHS; do
    limit=$L_BENCH; [ "$path" = fold ] && [ "$L_BENCH" -gt 20 ] && limit=20
    step "bench-$path" "$limit" "$PY" -m deeproots bench nin nin-root-8 --device "$DEVICE" \
        --dtype "$DTYPE" --batch-size "$BATCH" --path "$path" --allocator system \
        $( [ -n "$QUICK" ] && echo --input-size 8 --repeats 1 --warmup 0 || echo --repeats 10 )
done
step targets "$L_TARGETS" "$PY" benchmarks/gpu_targets.py "${TARGETS[@]}"
rm -rf "$WORK/data"  # made here, made again: not worth carrying back
archive
echo "session: $((SECONDS - STARTED)) s; $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$SUMMARY"
