"""A Redis with a password (as deploy/k8s runs it): the processes take
redis://:PASSWORD@host:port/db from $SLOTMESH_REDIS_URL (no password on the command
line), and the password never appears in an error or a log line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from services.local.process import child_env, spawn_service
from services.local.redis_server import RedisServer
from services.metadata.store import RedisStore, StoreUnavailableError

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

PASSWORD = "0f3a9c1d2e4b5a6978877665"


@pytest.fixture(scope="module")
def redis_with_password():
    with RedisServer(password=PASSWORD) as server:
        yield server


def test_router_takes_a_password_url_from_the_environment(redis_with_password) -> None:
    router = spawn_service("router", ["router", "--port", "0", "--router-id", "auth-router"],
                           env=child_env({"SLOTMESH_REDIS_URL": redis_with_password.url}),
                           stderr=subprocess.DEVNULL)
    try:
        async def routers():
            store = await RedisStore.connect(redis_with_password.url)
            try:
                return await store.list_routers()
            finally:
                await store.close()

        [record] = asyncio.run(routers())
        assert record.router_id == "auth-router"
        assert record.address == router.address
    finally:
        assert router.terminate() == 0


def test_a_wrong_password_fails_without_revealing_it(redis_with_password) -> None:
    wrong = redis_with_password.url.replace(PASSWORD, "not-the-password")
    with pytest.raises(StoreUnavailableError) as e:
        asyncio.run(RedisStore.connect(wrong))
    assert "not-the-password" not in str(e.value) and ":***@" in str(e.value)
    out = subprocess.run([sys.executable, "-m", "services.cli", "router", "--port", "0"],
                         env=child_env({"SLOTMESH_REDIS_URL": wrong}), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "not-the-password" not in out.stderr and "unavailable" in out.stderr


def test_slotmesh_up_redis_refuses_unauthenticated_clients() -> None:
    """The Redis `slotmesh up` starts (LocalCluster's, even without --tls) has only an
    ACL user with a random password: a client without it can neither read nor write,
    the default user is off, and the password is on no command line."""
    import redis

    from services.local.cluster import LocalCluster

    cluster = LocalCluster(worker_args=[], num_workers=1)
    server = cluster.redis
    server.start()
    try:
        url = cluster.redis_url
        assert url.startswith("redis://slotmesh:") and "@127.0.0.1:" in url
        password = url.split("@")[0].rsplit(":", 1)[1]
        assert len(password) >= 32
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        for op in (anonymous.ping, lambda: anonymous.get("slotmesh:workers"),
                   lambda: anonymous.set("slotmesh:worker:evil", "{}")):
            with pytest.raises(redis.exceptions.AuthenticationError,
                               match=r"NOAUTH|authenticated"):
                op()
        for user, pw in (("default", ""), ("default", "x"), ("slotmesh", "wrong")):
            with pytest.raises(redis.exceptions.AuthenticationError):
                redis.Redis(host="127.0.0.1", port=server.port, username=user,
                            password=pw).ping()
        anonymous.close()
        with redis.Redis.from_url(url) as user:
            assert user.set("slotmesh:probe", "1") and user.get("slotmesh:probe") == b"1"
        cmdline = (Path("/proc") / str(server.proc.pid) / "cmdline").read_bytes()
        assert password.encode() not in cmdline
    finally:
        server.close()


def test_a_password_stays_off_the_command_line(redis_with_password) -> None:
    cmdline = (Path("/proc") / str(redis_with_password.proc.pid) / "cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline
