"""The chaos suite in its short form: every `slotmesh chaos` scenario, shrunk, on a tiny
random Llama, against a real redis-server, router and worker processes on loopback.

One run (module scope) produces the report; each test asserts one scenario's
invariants — token-exact streams, no data lost, nothing leaked, memory bounded — never
its timing. The full form is `slotmesh chaos --full` (docs/reliability.md).
"""

from __future__ import annotations

import pytest

from services.tools.chaos import SCENARIOS, ChaosConfig, format_report, run_chaos, start_cluster

pytestmark = pytest.mark.cluster  # real Redis and/or server processes


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> ChaosConfig:
    model = tiny_model_dir("llama")
    # paced steps (>= 10 ms): a 48-token stream lasts >= 0.5 s on any machine, so the
    # faults, injected once half the streams are a quarter through, find them running
    return ChaosConfig(worker_args=("--model", str(model), "--slots", "8",
                                    "--kv-cache-mb", "16", "--min-step-ms", "10"),
                       num_workers=2, slots=8, num_streams=16, max_tokens=48,
                       num_cancels=200, num_slow_streams=8, slow_max_tokens=256,
                       soak_s=15.0, sample_s=1.0)


@pytest.fixture(scope="module")
def cluster(config, tmp_path_factory):
    c = start_cluster(config, tmp_path_factory.mktemp("chaos-logs"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def report(cluster, config) -> dict:
    report = run_chaos(cluster, config)
    print(format_report(report))  # shown with -s, and in the failure output
    return report


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_loses_no_data_and_leaks_nothing(report, name) -> None:
    figures = report["scenarios"][name]
    assert figures["failures"] == [], figures
    assert figures["data_lost"] == 0
    assert not any(figures["leaks_after"].values()), figures["leaks_after"]


def test_every_stream_is_token_exact(report, config) -> None:
    s = report["scenarios"]
    for name in ("kill_worker", "restart_redis", "restart_router", "slow_reader", "soak"):
        assert s[name]["token_exact"] == s[name]["streams"] > 0, (name, s[name])
        assert s[name]["lost_tokens"] == s[name]["duplicated_tokens"] == 0, (name, s[name])
    assert s["kill_worker"]["streams_on_killed"] > 0  # the fault hit running streams
    assert s["restart_router"]["retries"] > 0  # clients did retry, and resumed exactly
    assert s["cancel_storm"]["prefix_exact"] == config.num_cancels
    assert s["cancel_storm"]["before_first_token"] > 0 < s["cancel_storm"]["mid_stream"]
    assert s["cancel_storm"]["serving_after"]


def test_memory_and_descriptors_stay_bounded(report, config) -> None:
    slow = report["scenarios"]["slow_reader"]
    assert slow["unread_started"] and slow["unread_generated"]
    assert max(slow["rss_peak_growth_mb"].values()) <= config.max_rss_growth_mb
    soak = report["scenarios"]["soak"]
    assert all(last - first <= config.max_rss_growth_mb
               for first, last in soak["rss_mb"].values()), soak["rss_mb"]
    assert all(last - first <= config.max_fd_growth
               for first, last in soak["fds"].values()), soak["fds"]


def test_every_process_is_up_at_the_end(report) -> None:
    assert report["dead_processes"] == []
    assert report["ok"]
