"""The gateway process: the app under uvicorn on a socket bound here, so port 0 works
and the `SLOTMESH_READY` line names the port actually bound. SIGTERM/SIGINT stop it
cleanly (uvicorn's own signal handling is replaced by slotmesh's, as in the other
servers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.local.process import announce_ready, shutdown_requested

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers; `started` is an event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()  # also when startup failed: `started` says which


def _uvicorn_config(config: GatewayConfig, app) -> uvicorn.Config:
    tls = {}
    if config.tls_cert_file is not None:
        tls = {"ssl_certfile": str(config.tls_cert_file),
               "ssl_keyfile": str(config.tls_key_file)}
        if config.tls_require_client_cert:
            tls |= {"ssl_ca_certs": str(config.tls_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=10, **tls)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve(config: GatewayConfig) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code."""
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    server = _Server(_uvicorn_config(config, Gateway(config).app()))
    stop = shutdown_requested()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await server.ready.wait()
    if not server.started:
        await task
        return 1
    address = f"{config.host}:{port}"
    announce_ready(address, address)  # /metrics is on the same port
    scheme = "https" if config.tls_cert_file else "http"
    log.info("gateway on %s://%s/v1 for router %s", scheme, address, config.router_address)
    await asyncio.wait([task, asyncio.create_task(stop.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    sock.close()
    return 0
