"""A real `redis-server` on a free loopback port, for `slotmesh up`, benchmarks and tests.

The server keeps nothing on disk (no RDB, no AOF) and listens on 127.0.0.1 only. When
the binary is missing it is installed from the OS packages (apt-get) if the caller
allows it and runs as root; otherwise a SlotmeshError says how to install it.

With `tls` it serves TLS only (`--port 0 --tls-port N`; Debian's redis-server is built
with TLS), and with `tls.auth_clients` it also requires client certificates. With an
ACL `user` (name, password) the default user is switched off. Passwords (the user's, or
the default user's `password`) go into a config file readable by this user only, not
onto redis-server's command line.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.local.process import wait_for_line
from worker.vocab.errors import SlotmeshError

READY_MARK = "Ready to accept connections"


class RedisServerError(SlotmeshError):
    """redis-server is missing or did not start."""


def find_redis_server(install: bool) -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "install", "-y", "-q", "redis-server"],
                    ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "redis-server"]):
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=False)
            path = shutil.which("redis-server")
            if path:
                return path
    raise RedisServerError(
        "redis-server is not installed; install it (Debian: apt-get install redis-server) "
        "or pass --redis-url to an existing Redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, slots=True)
class RedisServerTls:
    """The server's certificate and key, and the CA its clients' certificates must chain
    to (auth_clients: require one)."""

    cert: Path
    key: Path
    ca: Path
    auth_clients: bool = False


class RedisServer:
    """One redis-server child process. `restart()` brings it back on the same port."""

    def __init__(self, *, install: bool = True, port: int | None = None,
                 password: str | None = None, user: tuple[str, str] | None = None,
                 tls: RedisServerTls | None = None) -> None:
        self.binary = find_redis_server(install)
        self.port = port or free_port()
        self.password = password  # --requirepass; the URL then carries it
        self.user = user  # an ACL user (name, password); the default user is then off
        self.tls = tls
        for secret in (password, *(user or ())):
            if secret is not None and (not secret or any(c.isspace() for c in secret)):
                raise ValueError("Redis user names and passwords here: no whitespace")
        self._dir = tempfile.TemporaryDirectory(prefix="slotmesh-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.user:
            auth = f"{self.user[0]}:{self.user[1]}@"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def _config_file(self) -> Path:
        """Settings with secrets, in a file only this user can read."""
        path = Path(self._dir.name) / "redis.conf"
        path.touch(mode=0o600)
        lines = [f"requirepass {self.password}"] if self.password else []
        if self.user:
            name, password = self.user
            lines = ["user default off", f"user {name} on >{password} ~* &* +@all"]
        path.write_text("".join(line + "\n" for line in lines))
        return path

    def _listen_flags(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes" if self.tls.auth_clients else "no"]

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        cmd = [self.binary, str(self._config_file()), *self._listen_flags(),
               "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", self._dir.name,
               "--logfile", "", "--loglevel", "notice"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        seen: list[str] = []
        if wait_for_line(self.proc.stdout, lambda ln: READY_MARK in ln, timeout_s, seen):
            return
        self.stop()
        raise RedisServerError(f"redis-server on port {self.port} did not start: "
                               + " | ".join(seen[-3:]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

