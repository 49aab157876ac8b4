"""`slotmesh up` keeps its cluster running: a child that exits (killed, crashed, or
stopped cleanly after a drain) is started again, with backoff, until Ctrl-C/SIGTERM.

One watcher thread per child, so a slow restart (a worker loading its model) never
delays noticing that another child died. The waits between restarts of one child double
from `initial_s` to `max_s` while it keeps failing soon after starting, and go back to
`initial_s` once it has run `reset_after_s` (Kubernetes' CrashLoopBackOff, shorter).
Every exit is logged with its status and every restart with where the child serves now.
The supervisor knows nothing of workers or routers: the cluster hands it `Child`
entries that say how to tell a process ended and how to start it again.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

POLL_S = 0.2  # how often a watcher looks at its child (a waitpid, no I/O)


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartPolicy:
    """initial_s: wait before the first restart; each restart of a child that ran less
    than reset_after_s doubles the wait, up to max_s."""

    initial_s: float = 0.5
    max_s: float = 10.0
    reset_after_s: float = 30.0

    def next_delay(self, previous_s: float | None, ran_s: float) -> float:
        if previous_s is None or ran_s >= self.reset_after_s:
            return self.initial_s
        return min(self.max_s, previous_s * 2)


@dataclass(frozen=True, slots=True)
class Child:
    """One supervised process. exit_code: None while it runs, else its status (negative:
    the signal that ended it). restart: start it again, wait until it serves and return
    where (for the log); raises when it does not come up."""

    name: str
    exit_code: Callable[[], int | None]
    restart: Callable[[], str]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Watches children until stop(); `restarts` counts restarts per child name (tests
    wait on it)."""

    def __init__(self, children: list[Child], policy: RestartPolicy | None = None,
                 out: IO[str] | None = None) -> None:
        self.children = children
        self.policy = policy or RestartPolicy()
        self.out = out
        self.restarts: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Supervisor:
        for child in self.children:
            t = threading.Thread(target=self._watch, args=(child,), daemon=True,
                                 name=f"supervise-{child.name}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """No more restarts. A restart under way finishes first (its process must be
        known before the cluster stops every child)."""
        self._stopping.set()
        for t in self._threads:
            t.join()

    def _watch(self, child: Child) -> None:
        delay_s: float | None = None
        started: float | None = None  # when this supervisor last started it
        while not self._stopping.is_set():
            code = child.exit_code()
            if code is None:
                self._stopping.wait(POLL_S)
                continue
            ran = "" if started is None else f" after {time.monotonic() - started:.1f} s"
            delay_s = self.policy.next_delay(
                delay_s, float("inf") if started is None else time.monotonic() - started)
            self._say(f"{child.name} exited ({describe_exit(code)}){ran}; "
                      f"restarting in {delay_s:g} s")
            if self._stopping.wait(delay_s):
                return
            started = time.monotonic()
            try:
                where = child.restart()
            except Exception as e:  # noqa: BLE001 - any failure to start is one more exit
                self._say(f"{child.name} did not start again: {e}")
                continue
            self.restarts[child.name] += 1
            self._say(f"{child.name} restarted ({where}) in "
                      f"{time.monotonic() - started:.1f} s")
            started = time.monotonic()

    def _say(self, line: str) -> None:
        print(f"slotmesh up: {line}", file=self.out or sys.stderr, flush=True)
