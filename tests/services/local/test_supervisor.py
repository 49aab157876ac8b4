"""`slotmesh up`'s supervisor on plain child processes: exits are logged and restarted
with backoff, a failed start is one more exit, and only stop() ends it."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from services.local.supervisor import Child, RestartPolicy, Supervisor, describe_exit
from tests.cluster_harness import wait_until


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_long_run() -> None:
    policy = RestartPolicy(initial_s=0.5, max_s=10.0, reset_after_s=30.0)
    delays, delay = [], None
    for _ in range(7):
        delay = policy.next_delay(delay, ran_s=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.next_delay(10.0, ran_s=30.0) == 0.5


def test_exit_statuses_read_as_words() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(2) == "exit code 2"
    assert describe_exit(-9) == "killed by SIGKILL"


class Sleepers:
    """A child that is a real process; `fail_next` starts make restart() raise."""

    def __init__(self, fail_next: int = 0) -> None:
        self.procs = [self._spawn()]
        self.fail_next = fail_next

    @staticmethod
    def _spawn() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    def exit_code(self) -> int | None:
        return self.procs[-1].poll()

    def restart(self) -> str:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("exited with code 2 before it was ready")
        self.procs.append(self._spawn())
        return f"pid {self.procs[-1].pid}"

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.mark.slow  # child processes
def test_a_killed_child_is_restarted_and_logged_a_failed_start_retried() -> None:
    child = Sleepers(fail_next=1)
    out = io.StringIO()
    supervisor = Supervisor([Child("sleeper", child.exit_code, child.restart)],
                            RestartPolicy(initial_s=0.01, max_s=0.05), out).start()
    try:
        child.procs[0].kill()
        wait_until(lambda: supervisor.restarts["sleeper"] == 1, 30, "the restart")
        assert child.exit_code() is None and len(child.procs) == 2
        child.procs[1].terminate()  # any exit counts, not only a crash
        wait_until(lambda: supervisor.restarts["sleeper"] == 2, 30, "the second restart")
        assert child.exit_code() is None
    finally:
        supervisor.stop()
        child.close()
    log = out.getvalue().splitlines()
    # how long the first process ran is not known: it was not started by the supervisor
    assert log[0] == "slotmesh up: sleeper exited (killed by SIGKILL); restarting in 0.01 s"
    assert log[1] == "slotmesh up: sleeper did not start again: exited with code 2 before " \
                     "it was ready"
    assert log[2].startswith("slotmesh up: sleeper exited (killed by SIGKILL) after ")
    assert log[2].endswith("restarting in 0.02 s")  # it failed at once: doubled
    assert log[3].startswith(f"slotmesh up: sleeper restarted (pid {child.procs[1].pid}) in ")
    assert "sleeper exited (killed by SIGTERM)" in log[4]


@pytest.mark.slow  # a child process
def test_stop_ends_supervision_during_a_backoff() -> None:
    child = Sleepers()
    supervisor = Supervisor([Child("sleeper", child.exit_code, child.restart)],
                            RestartPolicy(initial_s=600.0), io.StringIO()).start()
    try:
        child.procs[0].kill()
        wait_until(lambda: "restarting in 600 s" in supervisor.out.getvalue(), 30,
                   "the exit to be seen")
    finally:
        supervisor.stop()  # returns at once: the backoff wait ends on stop
        child.close()
    assert supervisor.restarts["sleeper"] == 0 and len(child.procs) == 1


def test_up_hints_a_slotmesh_command_that_runs_from_the_users_shell(tmp_path,
                                                                     monkeypatch) -> None:
    """A bare `slotmesh` only where PATH finds this one; else its path (.venv/bin/...)."""
    from services.local import cluster

    script = tmp_path / ".venv" / "bin" / "slotmesh"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(script), "up"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert cluster._slotmesh_command() == ".venv/bin/slotmesh"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")  # an activated venv
    assert cluster._slotmesh_command() == "slotmesh"
    monkeypatch.setattr("sys.argv", ["/x/services/cli/__main__.py", "up"])  # python -m
    assert cluster._slotmesh_command() == "slotmesh"
