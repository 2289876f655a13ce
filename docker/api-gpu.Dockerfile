# The API image for NVIDIA GPUs: CUDA base, the gpu extra (faiss-gpu), torch's CUDA build;
# adaptation and scoring run on the GPU (the fused CPU cell is not used there). The final
# stage keeps gcc and Python's headers: Triton builds its launcher when torch.compile
# compiles the adaptation step at start (service/compilation.py).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model model
COPY service service
COPY s2meta s2meta
COPY meta_training meta_training
# The project itself (its dependencies are pinned or bounded in pyproject.toml).
# hadolint ignore=DL3013
RUN pip install ".[gpu,otel]" \
    && site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && rm -rf "$site/meta_training"

FROM ${CUDA_IMAGE}
# The same interpreter the build stage's environment links to.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 s2meta \
    && useradd --system --uid 10001 --gid s2meta --no-create-home --shell /usr/sbin/nologin s2meta
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    S2META_HOST=0.0.0.0 \
    S2META_PORT=8000 \
    S2META_REGISTRY=/registry \
    S2META_DEVICE=cuda
USER 10001:10001
WORKDIR /home/s2meta
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["s2meta", "serve"]
