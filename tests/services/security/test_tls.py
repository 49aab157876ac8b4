"""Transport security with real processes: a router and workers over TLS with mutual TLS
between them, a Redis that serves TLS only to clients with a certificate as an ACL user,
and workers that take calls only with the cluster's credentials (docs/security.md).

One cluster (a throwaway CA from services/security/local_ca.py, a cluster key, two workers on a
tiny random Gemma 3 with a 4096-token context, so a stream lives long enough to be
migrated) serves every test here.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import grpc
import pytest

from protos.slotmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.client.clients import AsyncClient, Client, RpcError, build_request
from services.local.cluster import LocalCluster, write_key_file
from services.local.process import child_env, spawn_service
from services.metadata.store import RedisStore, StoreUnavailableError
from services.rpc.health_probe import check
from services.rpc.plumbing import blocking_channel
from services.security.cluster_auth import UNAUTHENTICATED, caller_metadata
from services.security.local_ca import make_local_pki
from services.security.tls import ChannelTls, RedisTls
from tests.tiny_models import make_tiny_model
from worker.vocab.integrity import load_key

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("gemma3", tmp_path_factory.mktemp("gemma3-tls"), window=48,
                           max_positions=4096)


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("tls-logs")
    pki = make_local_pki(logs / "pki")
    key_file = write_key_file(logs / "cluster.key")
    # paced steps: a MAX_TOKENS stream lasts >= 3 s, so it is still running when the
    # tests below migrate or save it, on a machine of any speed
    with LocalCluster(worker_args=["--model", str(model_dir), "--slots", "4",
                                   "--kv-cache-mb", "16", "--ctx", "4096",
                                   "--min-step-ms", "10"],
                      num_workers=2, registry_poll_s=0.25, metrics=False, log_dir=logs,
                      cluster_key_file=key_file, tls=pki) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout=120, tls=cluster.client_tls()) as c:
        yield c


def test_tls_cluster_generates_what_the_engine_generates(cluster, client, model_dir) -> None:
    from worker.config import EngineConfig, ModelConfig
    from worker.engine import LLMEngine
    from worker.vocab.sampling_params import SamplingParams

    done = client.generate(text=PROMPT, max_tokens=24, temperature=0.9, seed=7,
                           ignore_eos=True)
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(model_dir)), warmup=False))
    [want] = engine.generate([engine.encode_prompt(prompt=PROMPT)],
                             SamplingParams(max_tokens=24, temperature=0.9, seed=7,
                                            ignore_eos=True))
    assert done.token_ids == want.token_ids and done.finish_reason == "length"
    assert cluster.redis_url.startswith("rediss://slotmesh:")

    async def with_async_client():
        async with AsyncClient(cluster.router_address, timeout=60,
                               root_certificates=cluster.tls.ca.read_bytes()) as c:
            return await c.generate(text=PROMPT, max_tokens=24, temperature=0.9, seed=7,
                                    ignore_eos=True)

    assert asyncio.run(with_async_client()).token_ids == want.token_ids


@pytest.fixture(scope="module")
def key_only_worker(cluster, model_dir, tmp_path_factory):
    """A worker with TLS and the cluster key but without --tls-require-client-cert: the
    cluster credential in the metadata is what it checks."""
    pki = cluster.tls
    proc = spawn_service("key-only", [
        "worker", "--port", "0", "--worker-id", "key-only", "--model", str(model_dir),
        "--slots", "2", "--kv-cache-mb", "16", "--ctx", "4096", "--min-step-ms", "10",
        "--cluster-key-file", str(cluster.cluster_key_file),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-ca", str(pki.ca), "--redis-tls-ca", str(pki.ca),
        "--redis-tls-cert", str(pki.client_cert), "--redis-tls-key", str(pki.client_key)],
        env=child_env({"SLOTMESH_REDIS_URL": cluster.redis_url}),
        stderr=cluster._log("key-only"))
    yield proc
    proc.terminate()


def test_a_worker_refuses_callers_without_cluster_credentials(cluster, key_only_worker
                                                              ) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = ChannelTls.from_files(ca=cluster.tls.ca)
    source = cluster.workers[0].address
    calls = {
        "Generate": lambda s: list(s.Generate(build_request(text=PROMPT, max_tokens=2),
                                              timeout=30)),
        "ExportSequence": lambda s: list(s.ExportSequence(
            worker_pb2.ExportSequenceRequest(request_id="x"), timeout=30)),
        "ImportSequence": lambda s: list(s.ImportSequence(worker_pb2.ImportSequenceRequest(
            request_id="x", source_address=source), timeout=30)),
        "RestoreSequence": lambda s: list(s.RestoreSequence(
            iter([common_pb2.SnapshotChunk(data=b"x")]), timeout=30)),
        "Info": lambda s: s.Info(worker_pb2.InfoRequest(), timeout=30),
    }
    wrong = (("slotmesh-cluster-credential", "00" * 32),)
    for metadata in ((), wrong):
        with blocking_channel(key_only_worker.address, tls=tls, metadata=metadata) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as e:
                    call(stub)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert e.value.details() == UNAUTHENTICATED
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    credential = caller_metadata(load_key(cluster.cluster_key_file))
    with Client(key_only_worker.address, timeout=60, service="worker", tls=tls,
                metadata=credential) as c:
        assert c.generate(text=PROMPT, max_tokens=2).finish_reason == "length"


def test_migration_between_workers_over_mutual_tls(cluster, client) -> None:
    params = {"temperature": 0.9, "top_k": 40, "seed": 1234, "ignore_eos": True,
              "max_tokens": MAX_TOKENS}
    want = client.generate(text=PROMPT, **params)
    moves, token_ids = [], []
    for chunk in client.stream(text=PROMPT, request_id="tls-mig", **params):
        token_ids.extend(chunk.token_ids)
        if len(token_ids) >= 10 and not moves:
            moves.append(client.migrate("tls-mig"))
    assert token_ids == want.token_ids
    assert moves[0].target_worker_id != moves[0].source_worker_id


def test_redis_over_tls_with_an_acl_user(cluster) -> None:
    pki, url = cluster.tls, cluster.redis_url
    password = url.split("@")[0].rsplit(":", 1)[1]
    tls = RedisTls(ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                   key_file=str(pki.client_key))

    async def routers(url: str, tls: RedisTls | None) -> list:
        store = await RedisStore.connect(url, tls=tls, cluster_key=cluster.cluster_key())
        try:
            return await store.list_routers()
        finally:
            await store.close()

    assert [r.address for r in asyncio.run(routers(url, tls))] == [cluster.router_address]
    wrong = url.replace(password, "not-the-password")
    with pytest.raises(StoreUnavailableError) as e:
        asyncio.run(routers(wrong, tls))
    assert "not-the-password" not in str(e.value) and password not in str(e.value)
    assert "slotmesh:***@" in str(e.value) and "username-password" in str(e.value)
    with pytest.raises(StoreUnavailableError):  # TLS, but no client certificate
        asyncio.run(routers(url, RedisTls(ca_file=str(pki.ca))))
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "router", "--port", "0", "--redis-tls-ca",
         str(pki.ca), "--redis-tls-cert", str(pki.client_cert), "--redis-tls-key",
         str(pki.client_key)], env=child_env({"SLOTMESH_REDIS_URL": wrong}),
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "not-the-password" not in out.stderr and "username-password" in out.stderr


def test_seq_save_and_restore_over_mutual_tls(cluster, client, key_only_worker,
                                              tmp_path) -> None:
    from services.cli.main import main

    pki = cluster.tls
    # a client certificate for the workers that require one, the cluster key for the one
    # that checks the credential instead
    security = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key",
                str(pki.client_key), "--cluster-key-file", str(cluster.cluster_key_file)]
    path = tmp_path / "seq.snap"
    stream = client.stream(text=PROMPT, request_id="tls-file", max_tokens=MAX_TOKENS,
                           ignore_eos=True, temperature=0)
    first = next(c for c in stream if c.worker_id)
    owner = next(w for w in [*cluster.workers, key_only_worker]
                 if w.name == first.worker_id)
    assert main(["seq", "save", "--worker", owner.address, *security, "tls-file",
                 str(path)]) == 0
    stream.close()
    other = next(w for w in cluster.workers if w.name != owner.name)
    assert main(["seq", "restore", "--worker", other.address, *security, str(path),
                 "--json"]) == 0
    assert main(["seq", "restore", "--worker", other.address, "--tls-ca", str(pki.ca),
                 str(path)]) == 1  # no client certificate: no handshake


def test_slotmesh_generate_and_drain_over_tls(cluster, key_only_worker, capsys) -> None:
    """Runs after the other tests of the cluster: the drained worker takes no more."""
    from services.cli.main import main

    ca = str(cluster.tls.ca)
    assert main(["generate", "--router", cluster.router_address, "--tls-ca", ca, PROMPT,
                 "--max-tokens", "3", "--json"]) == 0
    assert capsys.readouterr().out.count("token_ids") == 1
    assert main(["generate", "--router", cluster.router_address, PROMPT, "--timeout",
                 "10"]) == 1  # plaintext to a TLS router
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["drain", "--router", cluster.router_address, "--worker-id", "key-only",
                 "--tls-ca", ca, "--timeout", "30"]) == 0
    assert "drained key-only: 0 migrated, 0 stayed" in capsys.readouterr().out


def test_plaintext_or_a_foreign_ca_cannot_reach_the_router(cluster, tmp_path) -> None:
    with Client(cluster.router_address, timeout=10) as plain, pytest.raises(RpcError) as e:
        plain.generate(text=PROMPT, max_tokens=2)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "a plaintext client reaching a TLS server" in e.value.message  # says what to do
    other = make_local_pki(tmp_path / "other")
    with Client(cluster.router_address, timeout=10,
                root_certificates=other.ca.read_bytes()) as foreign, \
            pytest.raises(RpcError) as e:
        foreign.generate(text=PROMPT, max_tokens=2)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_worker_requires_a_client_certificate(cluster) -> None:
    worker = cluster.workers[0].address
    no_cert = ChannelTls.from_files(ca=cluster.tls.ca)
    credential = caller_metadata(load_key(cluster.cluster_key_file))
    with Client(worker, timeout=10, service="worker", tls=no_cert,
                metadata=credential) as c, pytest.raises(RpcError) as e:
        c.generate(text=PROMPT, max_tokens=2)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE  # no handshake without one
    with Client(worker, timeout=60, service="worker", tls=cluster.worker_tls()) as c:
        assert c.generate(text=PROMPT, max_tokens=2).finish_reason == "length"
    # the exec health probe dials as the server's own container does
    assert check(worker, tls=cluster.worker_tls())
    assert not check(worker, tls=no_cert) and not check(worker)


def test_slotmesh_up_tls_prints_how_to_connect(cluster, capsys) -> None:
    """What `slotmesh up --tls` prints, for the fixture's cluster (the same LocalCluster
    it starts): the CA a client needs and the Redis URL with its password masked."""
    from services.local.cluster import _print_cluster

    _print_cluster(cluster)
    out = capsys.readouterr().out
    password = cluster.redis_url.split("@")[0].rsplit(":", 1)[1]
    assert f"--tls-ca {cluster.tls.ca}" in out and "rediss://slotmesh:***@" in out
    assert password not in out


def test_slotmesh_up_tls_makes_a_ca_and_a_secured_cluster(monkeypatch) -> None:
    """`slotmesh up --tls` builds the cluster the fixture above runs: a fresh CA in its
    temporary directory, mutual TLS, a TLS Redis with an ACL user, a cluster key. (The
    processes themselves are the fixture's; starting a second cluster here would double
    this file's runtime.)"""
    import services.local.cluster
    from services.cli.main import main

    seen = []

    def run_up(cluster, args, stop) -> int:
        seen.append((cluster.tls, cluster.tls.ca.read_bytes(), cluster.redis_url,
                     cluster._tls_flags(worker=True), cluster.cluster_key_file.exists()))
        cluster.redis.close()  # made, never started
        return 0

    monkeypatch.setattr(services.local.cluster, "_run_up", run_up)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["up", "--tls", "--workers", "1", "--port", "0"]) == 0
    finally:  # cmd_up installs its own; pytest's Ctrl-C must work after this test
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    [(pki, ca, redis_url, worker_flags, has_key)] = seen
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----") and has_key
    assert redis_url.startswith("rediss://slotmesh:")
    assert "--tls-require-client-cert" in worker_flags and "--redis-tls-cert" in worker_flags
    assert not pki.ca.exists()  # the throwaway CA went with the run


# -- flags: bad values are refused at startup, naming the flag (exit 2) -------------------

@pytest.fixture(scope="module")
def pki_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flag-pki")
    pki = make_local_pki(d / "pki")
    (d / "not.pem").write_text("hello\n")
    (d / "enc.key").write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n"
                               "-----END ENCRYPTED PRIVATE KEY-----\n")
    return pki, d / "not.pem"


@pytest.mark.parametrize("command", ["worker", "router"])
@pytest.mark.parametrize("flags, flag", [
    (lambda p, bad: ["--tls-cert", p.server_cert], "--tls-key"),
    (lambda p, bad: ["--tls-key", p.server_key], "--tls-cert"),
    (lambda p, bad: ["--tls-ca", p.ca], "--tls-cert"),  # a server needs its certificate
    (lambda p, bad: ["--tls-cert", bad, "--tls-key", p.server_key], "--tls-cert"),
    (lambda p, bad: ["--tls-cert", p.server_cert, "--tls-key", bad], "--tls-key"),
    (lambda p, bad: ["--tls-cert", p.server_cert, "--tls-key", p.client_key], "--tls-key"),
    (lambda p, bad: ["--tls-cert", p.server_cert, "--tls-key", bad.with_name("enc.key")],
     "--tls-key"),
    (lambda p, bad: ["--tls-cert", p.server_cert, "--tls-key", p.server_key,
                     "--tls-ca", bad], "--tls-ca"),
    (lambda p, bad: ["--tls-cert", p.server_cert, "--tls-key", p.server_key,
                     "--tls-require-client-cert"], "--tls-require-client-cert"),
    (lambda p, bad: ["--tls-cert", p.server_cert, "--tls-key", p.server_key,
                     "--tls-ca", "/nonexistent/ca.pem"], "--tls-ca"),
    (lambda p, bad: ["--redis-tls-ca", p.ca], "--redis-tls-ca"),  # a redis:// URL
    (lambda p, bad: ["--redis-url", "rediss://127.0.0.1:1/0", "--redis-tls-cert",
                     p.client_cert], "--redis-tls-key"),
    (lambda p, bad: ["--redis-url", "rediss://127.0.0.1:1/0", "--redis-tls-ca", bad],
     "--redis-tls-ca"),
    (lambda p, bad: ["--redis-url", "http://127.0.0.1:1/0"], "--redis-url"),
])
def test_bad_tls_flags_exit_2_naming_the_flag(pki_files, capsys, command, flags, flag
                                              ) -> None:
    from services.cli.main import main

    argv = [str(a) for a in flags(*pki_files)]
    assert main([command, *argv]) == 2  # refused before Redis or the model is touched
    assert flag in capsys.readouterr().err


def test_tls_settings_come_from_the_environment_too(pki_files, capsys, monkeypatch) -> None:
    from services.cli.main import main

    pki, _bad = pki_files
    monkeypatch.setenv("SLOTMESH_TLS_CERT", str(pki.server_cert))
    assert main(["router"]) == 2 and "--tls-key" in capsys.readouterr().err
    monkeypatch.setenv("SLOTMESH_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("SLOTMESH_TLS_REQUIRE_CLIENT_CERT", "maybe")
    assert main(["worker"]) == 2
    assert "--tls-require-client-cert" in capsys.readouterr().err
    monkeypatch.setenv("SLOTMESH_TLS_REQUIRE_CLIENT_CERT", "1")
    assert main(["worker"]) == 2  # requires a CA
    assert "needs --tls-ca" in capsys.readouterr().err


def test_help_names_the_security_flags(capsys) -> None:
    from services.cli.main import main

    for command in (["worker"], ["router"], ["drain"], ["seq", "save"], ["up"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        out = capsys.readouterr().out
        assert "--tls" in out, command
        if command[0] in ("worker", "router", "seq"):
            assert "--cluster-key-file" in out
        if command[0] in ("worker", "router"):
            assert "--tls-require-client-cert" in out and "--redis-tls-ca" in out
