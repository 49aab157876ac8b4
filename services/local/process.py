"""Service processes: how a server announces it is ready, and how `slotmesh up`, the
benchmarks and the tests start one and wait for that announcement.

A server prints exactly one line to stdout when it serves — `SLOTMESH_READY
address=HOST:PORT metrics=HOST:PORT|-` — and logs only to stderr, so the parent reads
stdout until that line (no sleeps, no polling of ports).
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

READY = "SLOTMESH_READY"
_REPO = Path(__file__).resolve().parents[2]  # children run from the repository root


def announce_ready(address: str, metrics_address: str | None) -> None:
    print(f"{READY} address={address} metrics={metrics_address or '-'}", flush=True)


@dataclass(slots=True)
class ServiceProcess:
    """A started `slotmesh router|worker` child process and where it listens."""

    name: str
    proc: subprocess.Popen
    address: str
    metrics_address: str | None

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (a clean shutdown), then SIGKILL after timeout_s; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


def spawn_service(name: str, argv: list[str], *, timeout_s: float = 300.0,
                  stderr: IO | int | None = None, env: dict | None = None,
                  module: str = "services.cli") -> ServiceProcess:
    """Start `python -m MODULE ARGV…` (default: the slotmesh CLI) and wait for its ready
    line."""
    [proc] = spawn_services([(name, argv, stderr)], timeout_s=timeout_s, env=env,
                            module=module)
    return proc


def spawn_services(specs: list[tuple[str, list[str], IO | int | None]], *,
                   timeout_s: float = 300.0, env: dict | None = None,
                   module: str = "services.cli") -> list[ServiceProcess]:
    """Start several services at once (they load in parallel), then wait for each."""
    started = []
    try:
        for name, argv, stderr in specs:
            cmd = [sys.executable, "-m", module, *argv]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env,
                                    cwd=_REPO, text=True,
                                    start_new_session=True)  # Ctrl-C reaches the parent only
            started.append((name, proc))
        ready = []
        for name, proc in started:
            fields = _wait_ready(proc, name, timeout_s)
            metrics = fields.get("metrics")
            ready.append(ServiceProcess(name, proc, fields["address"],
                                        None if metrics == "-" else metrics))
        return ready
    except BaseException:
        for _name, proc in started:
            proc.kill()
            proc.wait()
        raise


def _wait_ready(proc: subprocess.Popen, name: str, timeout_s: float) -> dict[str, str]:
    line = wait_for_line(proc.stdout, lambda ln: ln.startswith(READY), timeout_s)
    if line is None:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"{name} exited with code {code} before it was ready")
        raise TimeoutError(f"{name} not ready after {timeout_s:.0f} s")
    return dict(part.split("=", 1) for part in line.split()[1:])


class LineReader:
    """Reads a child's text stream in a thread, so the child never blocks on a full pipe
    and the parent can wait for a line with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []  # lines consumed by wait_for that did not match
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for(self, predicate, timeout_s: float) -> str | None:
        """The first line that matches; None at EOF or when the deadline passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            if line is None:
                self._lines.put(None)  # EOF stays visible to later calls
                return None
            if predicate(line):
                return line
            self.seen.append(line)


def wait_for_line(stream: IO[str], predicate, timeout_s: float,
                  seen: list[str] | None = None) -> str | None:
    """One-shot LineReader.wait_for; lines before the match go to `seen`."""
    reader = LineReader(stream)
    line = reader.wait_for(predicate, timeout_s)
    if seen is not None:
        seen.extend(reader.seen)
    return line


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def shutdown_requested() -> asyncio.Event:
    """An event the first SIGTERM or SIGINT sets (a server's clean-shutdown trigger).
    Install it before announcing readiness: a supervisor may signal as soon as it reads
    the ready line, and a signal before the handler would kill the process uncleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
