"""services.client.clients.RetryPolicy: what is retried (UNAVAILABLE only), where (the next
address of the list) and with what (resume= the tokens received, the same request_id
and seed), against a real router, workers and redis-server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.client.clients import AsyncClient, Client, RetryPolicy, RpcError
from services.local.redis_server import RedisServer, free_port
from tests.cluster_harness import tiny_cluster

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
REQUEST = dict(text="retry me", max_tokens=24, temperature=0.8, seed=5, ignore_eos=True)


def test_backoff_grows_to_its_cap_and_bad_policies_are_refused() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff_s=0.1, multiplier=2.0,
                         max_backoff_s=0.5)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    for bad in (dict(max_attempts=0), dict(initial_backoff_s=-1), dict(multiplier=0.5)):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    # paced steps: the 200-token stream below lasts >= 2 s, so the router restart at its
    # 20th token breaks it on a machine of any speed
    with RedisServer() as redis, tiny_cluster(tiny_model_dir("llama"), redis.url,
                                              tmp_path_factory.mktemp("retry-logs"),
                                              num_workers=1, min_step_ms=10) as c:
        yield c


def test_unavailable_moves_to_the_next_address(cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with Client(cluster.router_address, timeout=30) as plain:
        expected = plain.generate(**REQUEST).token_ids
    with Client([dead, cluster.router_address], timeout=30, retry=FAST) as client:
        assert client.generate(**REQUEST).token_ids == expected
        assert client.num_retries == 1
    with Client(dead, timeout=30) as no_retry, pytest.raises(RpcError) as e:
        no_retry.generate(**REQUEST)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_gives_up_after_max_attempts_and_never_retries_other_codes(cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with Client(dead, timeout=30, retry=FAST) as client, pytest.raises(RpcError) as e:
        client.generate(**REQUEST)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert client.num_retries == FAST.max_attempts - 1
    with Client(cluster.router_address, timeout=30, retry=FAST) as client, \
            pytest.raises(RpcError) as e:
        client.generate(**{**REQUEST, "temperature": -1.0})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert client.num_retries == 0


def test_a_stream_broken_by_a_router_restart_resumes_token_exact(cluster) -> None:
    """The router is killed mid-stream and started again on its port: the async client
    retries, resumes after the tokens it had with the seed the first chunk reported (the
    request had none), and the whole is the stream that seed gives unbroken."""
    request = {**REQUEST, "max_tokens": 200, "seed": None}
    policy = RetryPolicy(max_attempts=50, initial_backoff_s=0.05, max_backoff_s=0.5)

    async def broken() -> tuple[list[int], int, int]:
        tokens, seed, restarted = [], 0, False
        async with AsyncClient(cluster.router_address, timeout=60, retry=policy) as client:
            async for chunk in client.stream(**request):
                seed = seed or chunk.seed
                tokens.extend(chunk.token_ids)
                if len(tokens) >= 20 and not restarted:
                    restarted = True
                    await asyncio.to_thread(cluster.restart_router, 0)
            return tokens, seed, client.num_retries

    tokens, seed, retries = asyncio.run(broken())
    assert retries >= 1 and seed
    with Client(cluster.router_address, timeout=60) as plain:
        assert tokens == plain.generate(**{**request, "seed": seed}).token_ids
