# syntax=docker/dockerfile:1
# The slotmesh worker on a CUDA runtime base with the CUDA build of torch (cu128 wheels,
# which also bring their own cuBLAS/cuDNN; the host needs an NVIDIA driver >= 570 and
# the NVIDIA container toolkit / device plugin). Build from the repository root:
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t slotmesh-worker:gpu .
# No model is baked in: `slotmesh fetch-model --model NAME` fills /models (deploy/k8s runs
# it as an init container) or a volume that already holds the files is mounted there.
# The Python install is scripts/install-python.sh, the same script CI's setup runs.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/slotmesh
COPY pyproject.toml README.md ./
COPY scripts/install-python.sh scripts/
COPY protos/ protos/
COPY services/ services/
COPY worker/ worker/
COPY kernels/ kernels/
RUN bash scripts/install-python.sh /opt/slotmesh/bin/python worker

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# the interpreter the venv links to; nothing else (no compiler, no pip cache)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent slotmesh \
    && mkdir /models && chown 10001:10001 /models
COPY --from=build /opt/slotmesh /opt/slotmesh
ENV PATH=/opt/slotmesh/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SLOTMESH_CACHE=/models HOME=/tmp NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
VOLUME ["/models"]
EXPOSE 50061 9401
# SIGTERM drains: readiness goes NOT_SERVING, the router migrates the sequences away
# (--router-address), the worker deregisters and exits 0 within --shutdown-grace.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-m", "services.rpc.health_probe", "127.0.0.1:50061"]
ENTRYPOINT ["slotmesh", "worker"]
CMD ["--host", "0.0.0.0", "--port", "50061", "--metrics-port", "9401", "--cache-dir", "/models"]
