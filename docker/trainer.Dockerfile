# The meta-training image: CUDA base, the gpu and train extras, the fused CPU cell compiled
# in the build stage (for CPU runs); runs docker/train.sh (prepare, meta-train, publish,
# notify the API replicas).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install setuptools==80.9.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model model
COPY service service
COPY s2meta s2meta
COPY meta_training meta_training
# The project itself (its dependencies are pinned or bounded in pyproject.toml).
# hadolint ignore=DL3013
RUN pip install ".[gpu,train]" \
    && python -m model.kernels "$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"

FROM ${CUDA_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 s2meta \
    && useradd --system --uid 10001 --gid s2meta --create-home --shell /usr/sbin/nologin s2meta
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY docker/train.sh docker/train.sh
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    S2META_REGISTRY=/registry \
    S2META_CACHE_DIR=/cache
USER 10001:10001
# A batch job, not a server: its health is its exit status.
HEALTHCHECK NONE
CMD ["sh", "docker/train.sh"]
