# CPU image by default. For CUDA: --build-arg TORCH_VARIANT=cu130 (docker-compose.gpu.yml does this).
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv

# torch first, from PyTorch's own index, so that the project install below finds it satisfied
# and does not pull the default (CUDA) wheels from PyPI into a CPU image.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && python -c "import sys, torch; cpu = '${TORCH_VARIANT}' == 'cpu'; \
sys.exit(0 if cpu == (torch.version.cuda is None) else f'torch {torch.__version__} does not match TORCH_VARIANT=${TORCH_VARIANT}')"

COPY pyproject.toml README.md ./
COPY model ./model
COPY app ./app
RUN pip install .

# Baked-in weights; mount a folder over /srv/weights (or point VIT_CHECKPOINT elsewhere) to serve your own.
COPY weights ./weights
ENV VIT_CHECKPOINT=/srv/weights/vit-tiny-fashion-mnist.safetensors

RUN useradd --create-home --uid 10001 vit
USER vit

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4).status != 200)"]
# vit-serve: uvicorn on 0.0.0.0:8000 with VIT_WORKERS processes (default: one per CPU of the container's
# quota, at most 4, on the CPU; one on CUDA).
CMD ["vit-serve"]
