#!/usr/bin/env bash
# The GPU check: the CUDA tests and the GPU benches in one command, on a machine with an NVIDIA GPU.
#
#   bench/gpu_check.sh --prepare      where the registries are reachable: put what a bare GPU machine lacks
#                                     into .whl/ (Python wheels), .deb/ (wrk) and .data/ (Fashion-MNIST)
#   bench/gpu_check.sh [OUT]          on the GPU machine: the tests and benches, results and summary in OUT
#                                     (default gpu-check/), within GPU_CHECK_BUDGET_S (480 s): each step
#                                     has a time limit, and serving layouts that would not fit are skipped
#   PYTHON=.venv/bin/python GPU_CHECK_DEVICE=cpu bench/gpu_check.sh /tmp/dry
#                                     the same steps on the CPU, to try the script itself
#
# For a short window: GPU_CHECK_TESTS, a pytest -k expression, runs only those CUDA tests, and
# GPU_CHECK_LAYOUTS, names from bench/gpu_serving.py's LAYOUTS separated by ';', only those layouts, in that order.
#
# A GPU machine often has torch, torchvision, numpy, Pillow, httpx and pytest, but not the service's web
# stack. The wheels are installed into /tmp/site, and Debian's wrk is unpacked into /tmp/wrk, never into /.
set -uo pipefail
cd "$(dirname "$0")/.."

# The web stack at the versions this project is tested with, for the GPU machine's Python (3.12 by default),
# uvicorn[standard]'s parser and loop included (httptools, uvloop): without them uvicorn falls back to h11
# and asyncio's loop, and the check would measure a slower server than the one users run. What these need
# (starlette, pydantic, anyio, ...) comes with them.
WEB_STACK=(fastapi fastapi-offline pydantic-settings python-dotenv python-multipart python-json-logger
           uvicorn httptools uvloop)
WRK_PACKAGES=(wrk libluajit-5.1-2 libluajit-5.1-common)
FASHION_MNIST=/usr/share/datasets/fashion-mnist

if [ "${1:-}" = "--prepare" ]; then
    set -e
    python=${PYTHON:-.venv/bin/python}
    mkdir -p .deb .data/fashion-mnist
    # With their dependencies, each at the version installed here, since the GPU machine's own copies of those
    # may be older than the web stack needs: pydantic 2.14 needs typing-extensions 4.16, and beside 4.12 its
    # import failed (`cannot import name 'Sentinel'`). The wheels go first on that machine's path. Emptied
    # first, so that no older version of a wheel is installed beside the newer.
    rm -rf .whl && mkdir .whl
    tested=$(mktemp)
    "$python" -m pip freeze --exclude-editable > "$tested"
    "$python" -m pip download -q --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --constraint "$tested" -d .whl "${WEB_STACK[@]}"
    rm "$tested"
    (cd .deb && apt-get download "${WRK_PACKAGES[@]}")
    cp "$FASHION_MNIST"/*.gz .data/fashion-mnist/
    exclude=$(git rev-parse --git-path info/exclude)  # kept out of git, carried to the GPU machine as they are
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || printf '/.whl/\n/.deb/\n/.data/\n' >> "$exclude"
    du -sh .whl .deb .data
    exit 0
fi

out=${1:-gpu-check}  # eight files at most, the summary included, for machines that return no more
device=${GPU_CHECK_DEVICE:-cuda}
precisions=$([ "$device" = cuda ] && echo "fp32 bf16" || echo fp32)
mkdir -p "$out"
started=$(date +%s)
deadline=$(( started + ${GPU_CHECK_BUDGET_S:-480} ))
source bench/gpu_env.sh

# A step that hangs (a test, a server that never answers) ends at its limit, and the check goes on: the
# machine may be lent for one window, and what ran must still come back with a summary.
within() {  # within SECONDS COMMAND...: at most SECONDS, and never past the deadline
    local limit=$(( $1 < deadline - $(date +%s) ? $1 : deadline - $(date +%s) ))
    shift
    if [ "$limit" -le 0 ]; then echo "skipped, out of time: $*"; return 124; fi
    timeout --kill-after=10 "$limit" "$@"
}

{
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$python" -c "from bench.gpu_serving import uvicorn_picks; print('uvicorn runs', uvicorn_picks())"
    # What the CPU does at one connection, where every request waits on wake-ups of idle cores: its model,
    # whether two of the cores share one physical core, its clock governor and its idle states.
    lscpu | grep -E "^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|CPU max MHz|CPU min MHz):" || true
    echo "cpufreq governor: $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo none)"
    echo "idle states: $(cat /sys/devices/system/cpu/cpu0/cpuidle/state*/name 2>/dev/null | tr '\n' ' ')"
    nvidia-smi || true
    # The versions the check ran with, the carried wheels' among the machine's own, and whether the service
    # imports with them at all: where it does not, every step fails alike, and this says why once.
    "$python" -c "import importlib.metadata as m; print('packages:', *(f'{n} {m.version(n)}' for n in \
        ('numpy', 'pillow', 'typing-extensions', 'anyio', 'pydantic', 'fastapi', 'uvicorn')))"
    "$python" -c "import app.main" && echo "the service imports"
} > "$out/machine.txt" 2>&1

within 300 "$python" -m pytest tests/test_cuda.py -p no:cacheprovider -v -rs ${GPU_CHECK_TESTS:+-k "$GPU_CHECK_TESTS"} 2>&1 \
    | tee "$out/tests.log"
tests_status=${PIPESTATUS[0]}
for precision in $precisions; do
    within 60 "$python" -m bench.model_speed --device "$device" --precision "$precision" --seconds 2 \
        --output "$out/model_speed_${device}_$precision.json" 2>&1 | tee -a "$out/benches.log"
done
within 75 "$python" -m bench.model_process_speed --device "$device" --front-ends 4 --window 128 --seconds 5 \
    --output "$out/model_process_speed_$device.json" 2>&1 | tee -a "$out/benches.log"
layouts=()
if [ -n "${GPU_CHECK_LAYOUTS:-}" ]; then IFS=';' read -ra layouts <<< "$GPU_CHECK_LAYOUTS"; fi
# 30 s of the budget are left for the model's ceiling after the layouts and for the summary.
within 600 "$python" -m bench.gpu_serving --device "$device" --deadline $(( deadline - 30 )) \
    ${layouts[@]:+--layouts "${layouts[@]}"} \
    --output "$out/gpu_serving.json" 2>&1 | tee -a "$out/benches.log"

{
    echo "# GPU check, $(date -u +%FT%TZ), $(( $(date +%s) - started )) s"
    shown=20  # machine.txt's lines down to the GPU's name in nvidia-smi's table; of the rest, the versions
    head -n "$shown" "$out/machine.txt"
    tail -n +$(( shown + 1 )) "$out/machine.txt" | grep -E "^(packages:|the service imports|[A-Za-z]*Error)"
    echo
    echo "tests/test_cuda.py: exit status $tests_status; $(tail -n 1 "$out/tests.log")"
    echo
    grep -E "^(batch|served batch|round trip|process round trip|default|workers|model process|-> | +(workers|model process|default)|  \"(requests_per_s|model_process_cpu)|    \"event loop)" \
        "$out/benches.log"
} > "$out/summary.md"
cat "$out/summary.md"
exit "$tests_status"
