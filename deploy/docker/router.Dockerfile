# syntax=docker/dockerfile:1
# The slotmesh router: no torch, no numpy, no model (the router side imports neither;
# tests/protos/test_protos.py checks it). Build from the repository root:
#   docker build -f deploy/docker/router.Dockerfile -t slotmesh-router .
# The Python install is scripts/install-python.sh (target `router`), the script CI's
# setup runs too.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/slotmesh
COPY pyproject.toml README.md ./
COPY scripts/install-python.sh scripts/
COPY protos/ protos/
COPY services/ services/
COPY worker/ worker/
COPY kernels/ kernels/
RUN bash scripts/install-python.sh /opt/slotmesh/bin/python router

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent slotmesh
COPY --from=build /opt/slotmesh /opt/slotmesh
ENV PATH=/opt/slotmesh/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9400
# SIGTERM: readiness NOT_SERVING, leave the router registry, finish streams within
# --shutdown-grace.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "services.rpc.health_probe", "127.0.0.1:50051"]
ENTRYPOINT ["slotmesh", "router"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400"]
