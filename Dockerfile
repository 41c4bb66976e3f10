# The service: vit-serve on Debian 12 and its Python 3.11, as a non-root user. Built with BuildKit:
#   docker build -t vit-serving:cpu .                                              CPU wheels of torch
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#                --build-arg TORCH_VARIANT=cuda -t vit-serving:cuda .              CUDA (docker-compose.gpu.yml)
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .           behind a TLS-inspecting proxy
FROM debian:bookworm-slim

# MPLCONFIGDIR: Matplotlib's cache, in the temporary directory that the server needs writable anyway. Run as a user
# with no home that it may write to (OpenShift's random uid, Kubernetes' runAsUser, a read-only root file system),
# every process printed two lines of complaint at start and built its cache afresh in a folder of its own.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /srv

# The layers go from what changes least to what changes most, so that a rebuild after a code change reuses
# Debian's packages, torch and the dependencies, and adds only the project itself. The build arguments are
# declared here, not above: every RUN after an ARG depends on its value, and Debian's layer should not.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCH_VARIANT=cpu
# The torchvision release made for TORCH_VERSION (each torch release has its own), for what vit-train and
# vit-evaluate read it for: downloading a dataset, --augment, --mixup, --cutmix and the teachers. Serving never
# imports it. Empty leaves it out.
ARG TORCHVISION_VERSION=0.29.1

# pip trusts the CA bundle of the secret `ca` when one is given (a proxy that re-signs TLS); a secret is
# mounted for one step only and never lands in a layer. torch comes from TORCH_INDEX_URL without its
# dependencies, so that the next step finds it satisfied and takes only the small dependencies from PyPI, never
# PyPI's default (CUDA) torch for a CPU image; the build stops if the torch it got is not the TORCH_VARIANT build.
# torchvision comes with it from the same index: PyPI's is built against PyPI's torch, and beside a CPU torch
# its import fails (`operator torchvision::nms does not exist`), as it does beside another torch release.
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-deps --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" \
    ${TORCHVISION_VERSION:+"torchvision==$TORCHVISION_VERSION"}

COPY pyproject.toml ./
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*project['dependencies'], *project['optional-dependencies']['grpc'], sep='\n')" \
    > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md ./
COPY model ./model
COPY app ./app
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-deps . \
 && rm -rf /srv/* \
 && python -c "import sys, torch; built = 'cuda' if torch.version.cuda else 'cpu'; \
sys.exit(None if built == '$TORCH_VARIANT' else f'torch {torch.__version__} is a {built} build, not $TORCH_VARIANT')" \
 && if [ -n "$TORCHVISION_VERSION" ] && ! failed=$(python -c "import torchvision" 2>&1); then \
        echo "torchvision $TORCHVISION_VERSION does not import beside torch $TORCH_VERSION" \
            "($(echo "$failed" | tail -n 1)): TORCHVISION_VERSION must be the release made for TORCH_VERSION" >&2; \
        exit 1; \
    fi

# By number: Kubernetes' runAsNonRoot (which the restricted Pod Security Standard asks for) verifies the image's
# user before it starts the container, and refused a name: "image has non-numeric user (vit), cannot verify
# user is non-root".
RUN useradd --create-home --uid 10001 --user-group vit
USER 10001:10001

# gRPC beside HTTP, on Triton's ports: the Open Inference Protocol over gRPC (VIT_GRPC_PORT) on 8001.
ENV VIT_GRPC_PORT=8001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=4s --start-period=60s --retries=3 \
    CMD ["python", "-m", "app.healthcheck"]
# vit-serve: uvicorn on 0.0.0.0:8000 with VIT_WORKERS processes (default: one per CPU of the container's
# quota, at most 4, on the CPU; on CUDA one model process, fed by one front end per CPU but one). The
# shipped checkpoint is installed with the package; serve your own with
# -v ./my-weights:/srv/weights:ro -e VIT_CHECKPOINT=/srv/weights/model.safetensors.
CMD ["vit-serve"]
