# syntax=docker/dockerfile:1
#
# The engine image, CPU variant: loraplex[engine] with torch's CPU wheel.
# torch is installed first from the PyTorch CPU index: PyPI's default Linux wheel is the CUDA build and would
# pull gigabytes of CUDA libraries. `torch==2.13.0` in the engine extra is then already satisfied by
# `2.13.0+cpu` (a local version label matches a pin without one), so pip keeps it. The build fails if a CUDA
# build of torch ends up installed anyway.
#
#   docker build -f docker/engine.Dockerfile -t loraplex-engine .
#
# The model is not in the image: mount a Hugging Face folder (config.json, *.safetensors, tokenizer.json) and
# point LORAPLEX_MODEL at it. For GPUs use docker/engine-cuda.Dockerfile.

# The official Python image on Docker Hub, pinned to an exact release (3.11.13 on Debian 12).
ARG PYTHON_IMAGE=docker.io/library/python:3.11.13-slim-bookworm

# ---- build: a virtual environment holding torch (CPU) + loraplex[engine] ---------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/loraplex \
 && /opt/loraplex/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY registry/ registry/
COPY kernels/ kernels/
COPY engine/ engine/
COPY services/ services/
RUN /opt/loraplex/bin/pip install ".[engine]" \
 && /opt/loraplex/bin/pip check \
 && /opt/loraplex/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)" \
 && /opt/loraplex/bin/loraplex engine serve --help >/dev/null

# ---- runtime: the venv, a non-root user, a writable home ------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 loraplex \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/loraplex --no-create-home \
        --shell /usr/sbin/nologin loraplex \
 && mkdir -p /var/lib/loraplex /models \
 && chown -R 10001:10001 /var/lib/loraplex
COPY --from=build /opt/loraplex /opt/loraplex
COPY docker/healthcheck.py /opt/loraplex/healthcheck.py
ENV PATH=/opt/loraplex/bin:$PATH \
    HOME=/var/lib/loraplex \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LORAPLEX_LISTEN=0.0.0.0:50051 \
    LORAPLEX_DEVICE=cpu
WORKDIR /var/lib/loraplex
USER 10001:10001
EXPOSE 50051
# Loading a model takes a while; the server answers NOT_SERVING until it is loaded and warmed up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/loraplex/healthcheck.py", "127.0.0.1:50051"]
ENTRYPOINT ["loraplex"]
CMD ["engine", "serve"]
