#!/usr/bin/env bash
# The GPU training check: training-step speed beside timm at the recipe's batch, then the model card's
# recipe runs side by side for a window of machine time, packed to come back in few files.
#
#   bench/gpu_train.sh OUT [RUNS] [WINDOW]   on the GPU machine (after `bench/gpu_check.sh --prepare` here);
#                                            RUNS: names from bench/recipe_runs.py, WINDOW: seconds (420)
#   PYTHON=.venv/bin/python GPU_CHECK_DEVICE=cpu bench/gpu_train.sh /tmp/dry tiny-base-30 60
#                                            the same steps on the CPU, to try the script itself
#
# On CUDA the runs replay their steps from CUDA graphs (vit-train --cuda-graphs), unless the graphed speed
# bench fails first: then they run without, and the output says so. A run that does not finish inside the
# window leaves its state in OUT/<run>/; bench/recipe_runs.py says how the next window resumes it.
#
# For a short window, GPU_TRAIN_SPEED=0 skips the speed benches (about a minute and a half of compiling
# and timing) and gives the runs --cuda-graphs at once: tests/test_cuda.py checks the graphed step.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-train}
runs=${2:-tiny-base-30,tiny-trivialaugment-30,tiny-mix-30,tiny-repeated-30,small-base-30,small-full-250}
window=${3:-420}
device=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$out"
started=$(date +%s)
source bench/gpu_env.sh

speed() {  # model batch [flags...]: one line of bench/train_speed.py, its JSON in OUT named after the flags
    local suffix="" flag
    for flag in "${@:3}"; do suffix+="_${flag#--}"; done
    "$python" -m bench.train_speed --device "$device" --model "$1" --batch-size "$2" "${@:3}" --rounds 5 \
        --output "$out/train_speed_${device}_$1_$2${suffix//-/_}.json" 2>&1 | grep -v Warning
    return "${PIPESTATUS[0]}"
}
extra=${GPU_TRAIN_EXTRA:-}
if [ "${GPU_TRAIN_SPEED:-1}" = 0 ]; then
    [ "$device" = cuda ] && extra="--cuda-graphs $extra"
elif [ "$device" = cuda ]; then
    # The recipe's batch, 512: eager, then graphed, then graphed as the runs go (compiled kernels captured).
    speed small 512
    speed small 512 --cuda-graphs
    if speed small 512 --compile --cuda-graphs; then
        extra="--cuda-graphs $extra"
    else
        echo "gpu_train: the compiled, graphed step failed (above); the recipe runs go without --cuda-graphs"
    fi
else
    speed tiny 128
fi
# Several runs share the machine's cores: each gets two threads and two compile workers.
OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=2 "$python" -m bench.recipe_runs --runs "$runs" --window "$window" \
    --device "$device" --root runs/recipes --pack "$out" ${extra:+--extra "$extra"}
status=$?
echo "gpu_train: $(( $(date +%s) - started )) s"
exit "$status"
