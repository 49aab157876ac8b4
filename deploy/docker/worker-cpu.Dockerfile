# syntax=docker/dockerfile:1
# The slotmesh worker on the CPU build of torch. Build from the repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t slotmesh-worker:cpu .
# No model is baked in: `slotmesh fetch-model --model NAME` fills /models (deploy/k8s runs
# it as an init container) or a volume that already holds the files is mounted there.
# The Python install is scripts/install-python.sh, the same script CI's setup runs.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
RUN python -m venv /opt/slotmesh
COPY pyproject.toml README.md ./
COPY scripts/install-python.sh scripts/
COPY protos/ protos/
COPY services/ services/
COPY worker/ worker/
COPY kernels/ kernels/
RUN bash scripts/install-python.sh /opt/slotmesh/bin/python worker

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent slotmesh \
    && mkdir /models && chown 10001:10001 /models
COPY --from=build /opt/slotmesh /opt/slotmesh
ENV PATH=/opt/slotmesh/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SLOTMESH_CACHE=/models HOME=/tmp
USER 10001:10001
WORKDIR /tmp
VOLUME ["/models"]
EXPOSE 50061 9401
# SIGTERM drains: readiness goes NOT_SERVING, the router migrates the sequences away
# (--router-address), the worker deregisters and exits 0 within --shutdown-grace.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "services.rpc.health_probe", "127.0.0.1:50061"]
ENTRYPOINT ["slotmesh", "worker"]
CMD ["--host", "0.0.0.0", "--port", "50061", "--metrics-port", "9401", "--cache-dir", "/models"]
