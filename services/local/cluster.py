"""`slotmesh up`: a whole local cluster from one command — a real redis-server (unless
--redis-url points at one), a router and N workers, each its own process, and with
--http-port the OpenAI-compatible gateway beside the router (`slotmesh serve` is `up`
with one worker and the gateway).

LocalCluster is also what the cluster benchmark and the integration tests start, so they
exercise exactly the processes a user runs. The Redis it starts has an ACL user with a
random password instead of its default user; the password travels to the children in
$SLOTMESH_REDIS_URL, never on a command line. With `tls` (a LocalPki,
services/security/local_ca.py) every gRPC server serves TLS, workers require the cluster
CA's client certificates (mutual TLS with the router and with each other), and that
Redis serves TLS only, to clients with a certificate. Children run in their own
sessions: Ctrl-C reaches only this supervisor, which then stops workers (they
deregister), the router, and Redis last, in that order.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from services.local.process import ServiceProcess, child_env, spawn_service, spawn_services
from services.local.redis_server import RedisServer, RedisServerTls
from services.local.supervisor import Child, RestartPolicy, Supervisor
from services.metadata.store import redact_url
from services.security.tls import ChannelTls, RedisTls
from worker.vocab.errors import SlotmeshError

if TYPE_CHECKING:  # security/local_ca.py needs `cryptography`, which the router image lacks
    from services.security.local_ca import LocalPki


class LocalCluster:
    """Redis + router + workers as child processes.

    worker_args: flags for every `slotmesh worker` (model, dtype, slots, ...).
    """

    def __init__(self, *, worker_args: list[str], num_workers: int = 2,
                 router_port: int = 0, redis_url: str | None = None,
                 install_redis: bool = True, heartbeat_ttl_s: float = 6.0,
                 registry_poll_s: float = 1.0, metrics: bool = False,
                 log_dir: Path | None = None, router_args: list[str] | None = None,
                 cluster_key_file: Path | None = None, tls: LocalPki | None = None,
                 http_port: int | None = None, gateway_args: list[str] | None = None
                 ) -> None:
        """http_port: also start `slotmesh gateway` on it (0 = any free port); None: no
        gateway."""
        self.worker_args = worker_args
        self.http_port = http_port
        self.gateway_args = gateway_args or []
        self.gateway: ServiceProcess | None = None
        self.cluster_key_file = cluster_key_file
        self.tls = tls
        self.num_workers = num_workers
        self.router_port = router_port
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.registry_poll_s = registry_poll_s
        self.metrics = metrics
        self.log_dir = log_dir
        self.router_args = router_args or []
        self.redis = None if redis_url else _local_redis(install_redis, tls)
        self.redis_url = redis_url or self.redis.url
        self.router: ServiceProcess | None = None
        self.routers: list[ServiceProcess] = []  # the first is `router`; workers drain via it
        self.workers: list[ServiceProcess] = []
        self._logs: dict[str, IO] = {}  # one per child name, reused by its restarts
        self._next_worker = 0

    @property
    def router_address(self) -> str:
        assert self.router is not None, "cluster not started"
        return self.router.address

    def _log(self, name: str) -> IO | None:
        if self.log_dir is None:
            return None
        if name not in self._logs:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / f"{name}.log"
            self._logs[name] = open(path, "a")  # noqa: SIM115 - closed in stop()
        return self._logs[name]

    def _metrics_flag(self) -> list[str]:
        return ["--metrics-port", "0"] if self.metrics else []

    def start(self) -> LocalCluster:
        try:
            if self.redis is not None:
                self.redis.start()
            # the router first: workers drain through it on SIGTERM
            self.router = self.add_router(self.router_port)
            workers = [self._worker_spec() for _ in range(self.num_workers)]
            self.workers = spawn_services(workers, env=self._env())
            self.wait_for_workers(len(self.workers))
            if self.http_port is not None:
                self.gateway = self._spawn_gateway(self.http_port)
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_spec(self, extra_args: list[str] | None = None,
                     name: str | None = None) -> tuple:
        if name is None:
            name = f"worker-{self._next_worker}"
            self._next_worker += 1
        return (name, [
            "worker", "--port", "0", "--worker-id", name,
            "--heartbeat-ttl", str(self.heartbeat_ttl_s), *self._metrics_flag(),
            "--router-address", self.router_address, *self._key_flag(),
            *self._tls_flags(worker=True), *self.worker_args, *(extra_args or [])],
            self._log(name))

    def _env(self) -> dict[str, str]:
        """The children's environment: the Redis URL (and any password in it) goes here,
        not on their command lines."""
        return child_env({"SLOTMESH_REDIS_URL": self.redis_url})

    def _key_flag(self) -> list[str]:
        return ["--cluster-key-file", str(self.cluster_key_file)] if self.cluster_key_file \
            else []

    def _tls_flags(self, worker: bool) -> list[str]:
        if self.tls is None:
            return []
        pki = self.tls
        flags = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                 "--tls-ca", str(pki.ca), *(["--tls-require-client-cert"] if worker else [])]
        if self.redis is not None:  # the Redis we started: TLS with client certificates
            flags += ["--redis-tls-ca", str(pki.ca), "--redis-tls-cert", str(pki.server_cert),
                      "--redis-tls-key", str(pki.server_key)]
        return flags

    def client_tls(self) -> ChannelTls | None:
        """How a client dials the router (None: plaintext)."""
        return ChannelTls.from_files(ca=self.tls.ca) if self.tls else None

    def redis_tls(self) -> RedisTls | None:
        """How a tool connects to the Redis this cluster started (None: plaintext)."""
        if self.tls is None or self.redis is None:
            return None
        return RedisTls(ca_file=str(self.tls.ca), cert_file=str(self.tls.client_cert),
                        key_file=str(self.tls.client_key))

    def worker_tls(self) -> ChannelTls | None:
        """How a tool dials a worker directly: the CA and the client certificate."""
        if self.tls is None:
            return None
        return ChannelTls.from_files(ca=self.tls.ca, cert=self.tls.client_cert,
                                     key=self.tls.client_key)

    def cluster_key(self) -> bytes | None:
        """The cluster key (None without one): what a tool reading the registry from
        Redis verifies records with (services/metadata/signing.py)."""
        from worker.vocab.integrity import load_key

        return load_key(self.cluster_key_file) if self.cluster_key_file else None

    def worker_credential(self) -> tuple[tuple[str, str], ...]:
        """The call metadata a direct caller of these workers sends: the credential
        derived from the cluster key (services/security/cluster_auth.py); none without a key."""
        from services.security.cluster_auth import caller_metadata

        return caller_metadata(self.cluster_key())

    def add_router(self, port: int = 0) -> ServiceProcess:
        """Another router replica on the same Redis (any replica serves any client)."""
        name = "router" if not self.routers else f"router-{len(self.routers)}"
        proc = self._spawn_router(name, port)
        self.routers.append(proc)
        return proc

    def _spawn_router(self, name: str, port: int) -> ServiceProcess:
        return spawn_service(name, [
            "router", "--port", str(port),
            "--registry-poll", str(self.registry_poll_s), *self._metrics_flag(),
            *self._key_flag(), *self._tls_flags(worker=False), *self.router_args],
            stderr=self._log(name), env=self._env())

    def _spawn_gateway(self, port: int) -> ServiceProcess:
        tls = []
        if self.tls is not None:  # HTTPS with the cluster's certificate; dials the router
            tls = ["--tls-cert", str(self.tls.server_cert), "--tls-key",
                   str(self.tls.server_key), "--tls-ca", str(self.tls.ca)]
        # `python -m services.gateway`: `slotmesh gateway` without the CLI's torch import
        return spawn_service("gateway", [
            "--router", self.router_address, "--port", str(port), *tls, *self.gateway_args],
            stderr=self._log("gateway"), env=self._env(), module="services.gateway")

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None, "no gateway started"
        return f"{'https' if self.tls else 'http'}://{self.gateway.address}/v1"

    def restart_gateway(self) -> ServiceProcess:
        """Start the gateway again on its port (killed first if it still runs)."""
        old = self.gateway
        old.kill()
        self.gateway = self._spawn_gateway(int(old.address.rsplit(":", 1)[1]))
        return self.gateway

    def kill_router(self, index: int = 0) -> ServiceProcess:
        """SIGKILL router `index` (a crash: no clean shutdown); restart_router brings it
        back."""
        self.routers[index].kill()
        return self.routers[index]

    def restart_router(self, index: int = 0) -> ServiceProcess:
        """Start router `index` again on its port (after kill_router, or it is killed
        first); clients that retry find it at the same address."""
        old = self.routers[index]
        old.kill()
        proc = self._spawn_router(old.name, int(old.address.rsplit(":", 1)[1]))
        self.routers[index] = proc
        if index == 0:
            self.router = proc
        return proc

    def add_worker(self, extra_args: list[str] | None = None) -> ServiceProcess:
        name, argv, log = self._worker_spec(extra_args)
        proc = spawn_service(name, argv, stderr=log, env=self._env())
        self.workers.append(proc)
        return proc

    def restart_worker(self, index: int) -> ServiceProcess:
        """Start worker `index` again under the same name and worker id (killed first if
        it still runs): a new process, so a new instance id, on a new free port."""
        old = self.workers[index]
        old.kill()
        name, argv, log = self._worker_spec(name=old.name)
        proc = spawn_service(name, argv, stderr=log, env=self._env())
        self.workers[index] = proc
        return proc

    def supervised(self, policy: RestartPolicy | None = None,
                   out: IO[str] | None = None) -> Supervisor:
        """A supervisor (not started) that restarts every child of this cluster that
        exits: the Redis it started (on its port, empty: workers re-register by
        heartbeat), each router (on its port) and each worker (same id, new port)."""
        children = [Child(r.name, lambda i=i: self.routers[i].proc.poll(),
                          lambda i=i: self.restart_router(i).address)
                    for i, r in enumerate(self.routers)]
        children += [Child(w.name, lambda i=i: self.workers[i].proc.poll(),
                           lambda i=i: self.restart_worker(i).address)
                     for i, w in enumerate(self.workers)]
        if self.gateway is not None:
            children.append(Child("gateway", lambda: self.gateway.proc.poll(),
                                  lambda: self.restart_gateway().address))
        if self.redis is not None:
            children.insert(0, Child("redis", self._redis_exit_code, self._restart_redis))
        return Supervisor(children, policy, out)

    def _redis_exit_code(self) -> int | None:
        proc = self.redis.proc
        return 1 if proc is None else proc.poll()  # None: its last start failed

    def _restart_redis(self) -> str:
        self.redis.restart()
        return redact_url(self.redis_url)

    def wait_for_workers(self, count: int, timeout_s: float = 60.0) -> None:
        """Until the router lists exactly `count` workers (its registry poll catches up)."""
        from services.client.clients import Client

        deadline = time.monotonic() + timeout_s
        with Client(self.router_address, timeout=5.0, tls=self.client_tls()) as client:
            while len(client.list_workers()) != count:
                if time.monotonic() > deadline:
                    raise SlotmeshError(f"router does not list {count} workers after "
                                        f"{timeout_s:.0f} s")
                time.sleep(self.registry_poll_s / 4)

    def stop(self) -> dict[str, int]:
        """The gateway, workers (they deregister), the router, then Redis; exit codes."""
        codes = {}
        if self.gateway is not None:
            codes[self.gateway.name] = self.gateway.terminate()
        for w in self.workers:
            codes[w.name] = w.terminate()
        for r in self.routers:
            codes[r.name] = r.terminate()
        if self.redis is not None:
            self.redis.close()
        for f in self._logs.values():
            f.close()
        self._logs.clear()
        return codes

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _local_redis(install: bool, tls: LocalPki | None) -> RedisServer:
    """Always an ACL user `slotmesh` with a random password instead of the default user
    (only the processes given $SLOTMESH_REDIS_URL can read or write the registry); with
    a TLS cluster also TLS only, client certificates required."""
    user = ("slotmesh", secrets.token_hex(16))
    if tls is None:
        return RedisServer(install=install, user=user)
    return RedisServer(install=install, user=user,
                       tls=RedisServerTls(tls.server_cert, tls.server_key, tls.ca,
                                          auth_clients=True))


def add_bench_tls_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", action="store_true",
                   help="run the cluster as `slotmesh up --tls` does (TLS everywhere, mutual "
                        "TLS between router and workers), to measure what it costs")


def bench_pki(args: argparse.Namespace, directory: str | Path) -> LocalPki | None:
    from services.security.local_ca import make_local_pki

    return make_local_pki(Path(directory) / "pki") if args.tls else None


def add_up_parser(sub, add_model_flags) -> None:
    p = sub.add_parser(
        "up", help="start a local cluster: Redis, a router and N workers",
        description="Start redis-server on a free loopback port with an ACL user and a "
                    "random password (unless --redis-url is "
                    "given; installed with apt-get when missing, if run as root), a router "
                    "and N workers as processes. Prints the router's address. A process "
                    "that exits (killed, crashed, or stopped after a drain) is started "
                    "again after 0.5 s, doubling to 10 s while it keeps failing: a worker "
                    "under the same id, the router and Redis on their ports. Only Ctrl-C "
                    "or SIGTERM stops the cluster, cleanly.")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    add_model_flags(p)
    p.add_argument("--port", type=int, default=50051,
                   help="router port on 127.0.0.1; 0 = any free port (default: 50051)")
    p.add_argument("--redis-url", default=None,
                   help="use this Redis (redis://host:port/db) instead of starting one")
    p.add_argument("--no-install-redis", action="store_true",
                   help="fail instead of installing redis-server when it is missing")
    p.add_argument("--metrics", action="store_true",
                   help="serve Prometheus /metrics from every process on free ports")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="write each process's log to DIR/NAME.log (default: this terminal)")
    p.add_argument("--cluster-key-file", type=Path, default=None,
                   help="the key snapshots, prompt-cache entries and registry records are "
                        "authenticated with (default: a throwaway key made for this run)")
    p.add_argument("--tls", action="store_true",
                   help="secure the cluster with a throwaway CA made for this run: TLS on "
                        "the router, the workers and Redis, mutual TLS between router and "
                        "workers, Redis with an ACL user; prints the CA a client needs")
    p.add_argument("--http-port", type=int, default=None,
                   help="also start the OpenAI-compatible HTTP gateway (`slotmesh gateway`) "
                        "on this port of 127.0.0.1, supervised like the rest; 0 = any free "
                        "port (default: no gateway)")
    p.set_defaults(func=cmd_up)


def add_serve_parser(sub, add_model_flags) -> None:
    """`slotmesh serve`: `slotmesh up` with one worker and the gateway, for one machine."""
    p = sub.add_parser(
        "serve", help="one-command local server: Redis, a router, one worker and the "
                      "OpenAI-compatible HTTP API",
        description="What `vllm serve` or llama-server are to one machine: start Redis, a "
                    "router, one worker and the HTTP gateway (as `slotmesh up --workers 1 "
                    "--http-port PORT` does, supervised the same way), print the API's URL, "
                    "and serve until Ctrl-C or SIGTERM stops everything.")
    add_model_flags(p)
    p.add_argument("--port", dest="http_port", type=int, default=8000,
                   help="HTTP port of the OpenAI-compatible API on 127.0.0.1; 0 = any free "
                        "port (default: %(default)s)")
    p.add_argument("--router-port", dest="port", type=int, default=0,
                   help="gRPC port of the router (default: any free port)")
    p.add_argument("--redis-url", default=None,
                   help="use this Redis (redis://host:port/db) instead of starting one")
    p.add_argument("--no-install-redis", action="store_true",
                   help="fail instead of installing redis-server when it is missing")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="write each process's log to DIR/NAME.log (default: this terminal)")
    p.set_defaults(func=cmd_up, workers=1, metrics=False, cluster_key_file=None, tls=False)


def model_worker_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--dtype", args.dtype, "--device", args.device,
           "--slots", str(args.slots), "--compile", args.compile]
    if args.weights is not None:
        out += ["--weights", args.weights]
    if args.cache_dir is not None:
        out += ["--cache-dir", str(args.cache_dir)]
    if args.ctx is not None:
        out += ["--ctx", str(args.ctx)]
    return out


def cmd_up(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise SlotmeshError("--workers: must be >= 1")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="slotmesh-up-") as tmp:
        key_file = args.cluster_key_file or write_key_file(Path(tmp) / "cluster.key")
        pki = None
        if args.tls:
            from services.security.local_ca import make_local_pki

            pki = make_local_pki(Path(tmp) / "tls")
        cluster = LocalCluster(worker_args=model_worker_args(args), num_workers=args.workers,
                               router_port=args.port, redis_url=args.redis_url,
                               install_redis=not args.no_install_redis, metrics=args.metrics,
                               log_dir=args.log_dir, cluster_key_file=key_file, tls=pki,
                               http_port=args.http_port)
        return _run_up(cluster, args, stop)


def write_key_file(path: Path) -> Path:
    """A fresh random cluster key (hex), readable by this user only."""
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def _run_up(cluster: LocalCluster, args: argparse.Namespace, stop: threading.Event) -> int:
    print(f"slotmesh up: starting {args.workers} worker(s) on {args.model}…", flush=True)
    cluster.start()
    supervisor = None
    try:
        _print_cluster(cluster)
        supervisor = cluster.supervised().start()
        while not stop.wait(0.5):  # a timeout: the signal handler runs between waits
            pass
        return 0
    finally:
        if supervisor is not None:
            supervisor.stop()
        codes = cluster.stop()
        print(f"slotmesh up: stopped ({', '.join(f'{k}={v}' for k, v in codes.items())})",
              flush=True)


def _print_cluster(cluster: LocalCluster) -> None:
    print(f"router   {cluster.router_address}"
          + (f"  metrics http://{cluster.router.metrics_address}/metrics"
             if cluster.router.metrics_address else ""))
    for w in cluster.workers:
        print(f"{w.name} {w.address}"
              + (f"  metrics http://{w.metrics_address}/metrics" if w.metrics_address else ""))
    print(f"redis    {redact_url(cluster.redis_url)}")
    if cluster.gateway is not None:
        print(f"gateway  {cluster.gateway_url}  (OpenAI-compatible; metrics on the same port)")
    if cluster.cluster_key_file is not None:
        print(f"key      {cluster.cluster_key_file} (the cluster key: `slotmesh seq save|restore "
              "--cluster-key-file` and a second router need it)")
    tls = ""
    if cluster.tls is not None:
        pki = cluster.tls
        print(f"tls      CA {pki.ca} (valid for this run only); client certificate for "
              f"calling a worker directly: {pki.client_cert} {pki.client_key}")
        print(f"         Python: Client('{cluster.router_address}', "
              f"root_certificates=Path('{pki.ca}').read_bytes())")
        tls = f"--tls-ca {pki.ca} "
    if cluster.gateway is not None:
        print(f"OpenAI API at {cluster.gateway_url} — try: curl {cluster.gateway_url}/models")
    slotmesh = _slotmesh_command()
    print(f"slotmesh up: ready. Try: {slotmesh} generate --router {cluster.router_address} "
          f"{tls}\"Hello\"   (Ctrl-C stops the cluster)", flush=True)


def _slotmesh_command() -> str:
    """How to run `slotmesh` from the user's shell: the bare name when it is on PATH (an
    activated venv), else the path of the one running now (the README's .venv/bin)."""
    here = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    on_path = shutil.which("slotmesh")
    if here is None or here.name != "slotmesh" or (on_path and Path(on_path).resolve() == here):
        return "slotmesh"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)
