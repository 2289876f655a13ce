# The API image for CPU: model/ and service/ with faiss-cpu, the compiled kernels (the fused
# update cell, the ranking kernel) built in the build stage; no training stack and no caches
# in the final stage. It keeps g++: torch.compile builds the adaptation step's kernels when
# the service starts (service/compilation.py; without it the eager step serves).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# A compiler for the kernels of model/kernels.py, in this stage only.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install setuptools==80.9.0 \
    && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model model
COPY service service
COPY s2meta s2meta
COPY meta_training meta_training
# Serving only: the offline job's sources go (s2meta then says the train extra is missing),
# and the compiled kernels (model/kernels.py) are built for every CPU capability into
# site-packages.
# The project itself (its dependencies are pinned or bounded in pyproject.toml).
# hadolint ignore=DL3013
RUN pip install ".[cpu,otel]" \
    && site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && rm -rf "$site/meta_training" \
    && python -m model.kernels "$site"

FROM ${PYTHON_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 s2meta \
    && useradd --system --uid 10001 --gid s2meta --no-create-home --shell /usr/sbin/nologin s2meta
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    S2META_HOST=0.0.0.0 \
    S2META_PORT=8000 \
    S2META_REGISTRY=/registry
USER 10001:10001
WORKDIR /home/s2meta
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["s2meta", "serve"]
