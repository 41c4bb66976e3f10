# Sourced by the GPU scripts: the web stack, wrk and Fashion-MNIST from what `bench/gpu_check.sh --prepare`
# put beside the repository, for a GPU machine that has torch but not the rest. Nothing goes into /.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python=${PYTHON:-python3}  # the GPU machine's python3 holds torch
if [ -d .whl ] && ! "$python" -c "import fastapi, multipart, pydantic_settings, uvicorn" 2>/dev/null; then  # lacks the web stack
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -d .deb ]; then
    for package in .deb/*.deb; do dpkg -x "$package" /tmp/wrk; done
    export PATH=/tmp/wrk/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/wrk/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi
# Without Debian's package, the loader reads the files where torchvision would have downloaded them.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d .data/fashion-mnist ]; then
    mkdir -p data/FashionMNIST/raw
    for file in .data/fashion-mnist/*.gz; do gunzip -c "$file" > "data/FashionMNIST/raw/$(basename "$file" .gz)"; done
fi
