# syntax=docker/dockerfile:1
#
# The registry image: Python + loraplex[registry] (SQLAlchemy, Alembic, boto3, psycopg) and nothing else.
# No torch and no engine/kernels code: the registry never imports them (tests/services/test_packaging.py), so
# leaving them out keeps the image small and its attack surface narrow. The build fails if torch sneaks in.
#
#   docker build -f docker/registry.Dockerfile -t loraplex-registry .
#
# No secret is baked in: database URL, S3 credentials and tokens arrive at run time (environment or mounted
# files, see compose.yaml). Entry point is the `loraplex` CLI, so `docker run IMAGE registry gc --dry-run`
# and `docker run IMAGE adapters list --registry HOST:PORT` work too.

# The official Python image on Docker Hub, pinned to an exact release (3.11.13 on Debian 12).
ARG PYTHON_IMAGE=docker.io/library/python:3.11.13-slim-bookworm

# ---- build: a virtual environment holding loraplex[registry] ---------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/loraplex
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY registry/ registry/
COPY services/ services/
RUN /opt/loraplex/bin/pip install ".[registry]" \
 && /opt/loraplex/bin/pip check \
 && /opt/loraplex/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && /opt/loraplex/bin/loraplex --help >/dev/null

# ---- runtime: the venv, a non-root user, a writable data folder ------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 loraplex \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/loraplex --no-create-home \
        --shell /usr/sbin/nologin loraplex \
 && mkdir -p /var/lib/loraplex/spool \
 && chown -R 10001:10001 /var/lib/loraplex
COPY --from=build /opt/loraplex /opt/loraplex
COPY docker/healthcheck.py /opt/loraplex/healthcheck.py
ENV PATH=/opt/loraplex/bin:$PATH \
    HOME=/var/lib/loraplex \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LORAPLEX_LISTEN=0.0.0.0:50052 \
    LORAPLEX_SPOOL_DIR=/var/lib/loraplex/spool
WORKDIR /var/lib/loraplex
USER 10001:10001
EXPOSE 50052
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/loraplex/healthcheck.py", "127.0.0.1:50052"]
ENTRYPOINT ["loraplex"]
CMD ["registry", "serve"]
