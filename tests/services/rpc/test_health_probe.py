"""The health probe says what it found: SERVING, NOT_SERVING, or why it got no answer."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.rpc.health_probe import main


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prints_the_status_and_exits_by_it(health_server, capsys) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("liveness", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([address]) == 0
    assert capsys.readouterr().out == f"{address} (ready): SERVING\n"
    assert main([address, "--service", "liveness"]) == 1
    assert capsys.readouterr().out == f"{address} liveness: NOT_SERVING\n"
    assert main([address, "--service", "nope"]) == 1
    assert capsys.readouterr().out.startswith(f"{address} nope: NOT_FOUND")


def test_an_unreachable_server_is_named(capsys) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert main([address, "--timeout", "2"]) == 1
    assert capsys.readouterr().out.startswith(f"{address} (ready): UNAVAILABLE")
