"""Bearer tokens on the router, with a real router, worker and redis-server: every
Router call needs a token from the hashed tokens file; operating the cluster needs an
admin one; each token's concurrent streams and tokens per minute are capped; health
stays open for probes."""

from __future__ import annotations

import json
import os

import grpc
import pytest

from services.client.clients import Client, RpcError
from services.security.auth import UNAUTHENTICATED, entry_for, load_tokens, new_token
from tests.cluster_harness import wait_until
from worker.vocab.errors import InvalidRequestError

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

ADMIN, USER, ONE_STREAM, TEN_PER_MINUTE = (new_token() for _ in range(4))


@pytest.fixture(scope="module")
def router(tiny_model_dir, redis_server, tmp_path_factory):
    from services.local.cluster import LocalCluster

    logs = tmp_path_factory.mktemp("auth")
    tokens = logs / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [
        entry_for("ops", ADMIN, admin=True), entry_for("user", USER),
        entry_for("one-stream", ONE_STREAM, max_streams=1),
        entry_for("ten-per-minute", TEN_PER_MINUTE, tokens_per_minute=10)]}))
    saved = os.environ.get("SLOTMESH_TOKEN")
    os.environ["SLOTMESH_TOKEN"] = ADMIN  # slotmesh's own callers (the harness, workers)
    try:
        # paced steps: a 200-token stream holds its token's one stream for >= 2 s
        with LocalCluster(worker_args=["--model", str(tiny_model_dir("llama")), "--slots",
                                       "4", "--kv-cache-mb", "16", "--min-step-ms", "10"],
                          num_workers=1, redis_url=redis_server.url, registry_poll_s=0.25,
                          log_dir=logs, router_args=["--auth-tokens-file", str(tokens)]) as c:
            yield c.router_address
    finally:
        if saved is None:
            os.environ.pop("SLOTMESH_TOKEN", None)
        else:
            os.environ["SLOTMESH_TOKEN"] = saved


def generate(address: str, token: str, **request):
    with Client(address, timeout=60, token=token) as client:
        return client.generate(text="Once upon a time", temperature=0.0, **request)


def test_calls_without_a_valid_token_are_unauthenticated(router) -> None:
    for token in ("", "smk_not-a-token", USER + "x"):
        with pytest.raises(RpcError) as e:
            generate(router, token, max_tokens=2)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert e.value.message == UNAUTHENTICATED  # the same words, whatever was wrong
    assert generate(router, USER, max_tokens=2).finish_reason == "length"


def test_the_async_client_sends_its_token_on_streams(router) -> None:
    """grpc.aio files a channel interceptor under one call kind only: the token must
    reach the Generate stream, not just unary calls."""
    import asyncio

    from services.client.clients import AsyncClient

    async def stream() -> str:
        async with AsyncClient(router, timeout=60, token=USER) as c:
            return (await c.generate(text="Once upon a time", max_tokens=2)).finish_reason

    assert asyncio.run(stream()) == "length"


def test_health_stays_open(router) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(router) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_operating_the_cluster_needs_an_admin_token(router) -> None:
    with Client(router, timeout=30, token=USER) as user:
        for call in (user.list_workers, lambda: user.migrate("x"),
                     lambda: user.drain("worker-0"), lambda: user.undrain("worker-0")):
            with pytest.raises(RpcError) as e:
                call()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    with Client(router, timeout=30, token=ADMIN) as ops:
        assert len(ops.list_workers()) == 1


def test_concurrent_streams_per_token(router) -> None:
    with Client(router, timeout=60, token=ONE_STREAM) as client:
        first = client.stream(text="Once upon a time", max_tokens=200, ignore_eos=True,
                              temperature=0.0)
        next(first)  # open and running
        with pytest.raises(RpcError) as e:
            client.generate(text="Hello", max_tokens=2)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "one-stream" in e.value.message and "limit is 1" in e.value.message
        first.close()
        wait_until(lambda: _can_generate(client), 30, "the stream slot back")


def _can_generate(client: Client) -> bool:
    try:
        return client.generate(text="Hello", max_tokens=2).finish_reason == "length"
    except RpcError as e:
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False


def test_tokens_per_minute_per_token(router) -> None:
    assert len(generate(router, TEN_PER_MINUTE, max_tokens=10, ignore_eos=True)
               .token_ids) == 10
    with pytest.raises(RpcError) as e:
        generate(router, TEN_PER_MINUTE, max_tokens=2)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens in the last minute" in e.value.message
    assert generate(router, USER, max_tokens=2).finish_reason == "length"  # others go on


@pytest.mark.parametrize("doc, message", [
    ({"tokens": []}, "with entries"),
    ({"tokens": [{"name": "a", "sha256": "zz"}]}, "64 hex digits"),
    ({"tokens": [{"name": "a", "sha256": "00" * 32, "max_streams": -1}]}, ">= 0"),
    ({"tokens": [{"name": "a", "sha256": "00" * 32}, {"name": "a", "sha256": "11" * 32}]},
     "unique"),
])
def test_bad_tokens_files_name_the_flag(tmp_path, doc, message) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidRequestError, match=message) as e:
        load_tokens(path)
    assert e.value.field == "--auth-tokens-file"


def test_token_new_with_file_builds_a_tokens_file_a_router_loads(tmp_path, capsys) -> None:
    from services.cli.main import main
    from services.security.auth import hash_token

    path = tmp_path / "tokens.json"
    assert main(["token", "new", "alice", "--file", str(path), "--max-streams", "2"]) == 0
    alice = capsys.readouterr().out.strip()
    assert main(["token", "new", "bob", "--file", str(path), "--admin"]) == 0
    bob = capsys.readouterr().out.strip()
    entries = {e.name: e for e in load_tokens(path)}
    assert set(entries) == {"alice", "bob"} and entries["bob"].admin
    assert entries["alice"].sha256 == hash_token(alice) and entries["alice"].max_streams == 2
    assert entries["bob"].sha256 == hash_token(bob)
    assert os.stat(path).st_mode & 0o077 == 0  # owner-only
    assert main(["token", "new", "alice", "--file", str(path)]) == 2  # names stay unique
    assert "already has a token named 'alice'" in capsys.readouterr().err
    assert len(load_tokens(path)) == 2
