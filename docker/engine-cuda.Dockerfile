# syntax=docker/dockerfile:1
#
# The engine image, CUDA variant: loraplex[engine,gpu] (torch's CUDA build + Triton) on an nvidia/cuda runtime
# base. Run it with an NVIDIA device reserved (compose profile `gpu`, or `docker run --gpus 1`).
#
#   docker build -f docker/engine-cuda.Dockerfile -t loraplex-engine-cuda .
#   docker build -f docker/engine-cuda.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# TORCH_INDEX_URL picks the CUDA build of torch: PyPI's default Linux wheel is a CUDA build that carries its own
# CUDA libraries as pip packages, so the host needs only a driver new enough for it; a PyTorch index such as
# .../whl/cu128 pins one CUDA version (it must offer TORCH_VERSION). Triton compiles its kernel launchers at run
# time and needs a C compiler and Python headers, hence gcc and python3-dev in the runtime stage.

# NVIDIA's CUDA runtime image on Docker Hub, pinned to an exact CUDA release and Ubuntu version.
ARG CUDA_IMAGE=docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- build: a virtual environment holding torch (CUDA) + loraplex[engine,gpu] ----------------------------
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/loraplex \
 && /opt/loraplex/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY registry/ registry/
COPY kernels/ kernels/
COPY engine/ engine/
COPY services/ services/
RUN /opt/loraplex/bin/pip install ".[engine,gpu]" \
 && /opt/loraplex/bin/pip check \
 && /opt/loraplex/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is None)" \
 && /opt/loraplex/bin/loraplex engine serve --help >/dev/null

# ---- runtime: same base (same Python), the venv, a compiler for Triton, a non-root user -----------------
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loraplex \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/loraplex --no-create-home \
        --shell /usr/sbin/nologin loraplex \
 && mkdir -p /var/lib/loraplex /models \
 && chown -R 10001:10001 /var/lib/loraplex
COPY --from=build /opt/loraplex /opt/loraplex
COPY docker/healthcheck.py /opt/loraplex/healthcheck.py
ENV PATH=/opt/loraplex/bin:$PATH \
    HOME=/var/lib/loraplex \
    TRITON_CACHE_DIR=/var/lib/loraplex/.triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LORAPLEX_LISTEN=0.0.0.0:50051 \
    LORAPLEX_DEVICE=cuda
WORKDIR /var/lib/loraplex
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/loraplex/healthcheck.py", "127.0.0.1:50051"]
ENTRYPOINT ["loraplex"]
CMD ["engine", "serve"]
