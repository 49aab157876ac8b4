"""The bench figures: every chart function draws a PNG from its bench's report, `--plot`
refuses a missing matplotlib before a run starts (naming the extra), and the figures in
docs/ are the ones scripts/doc_plots.py draws and docs/benchmarks.md shows."""

from __future__ import annotations

import builtins
import re

import pytest

from services.cli.main import main
from services.tools.bench_cluster import cluster_chart
from services.tools.bench_engine import engine_chart
from services.tools.bench_finetune import finetune_chart
from services.tools.bench_migration import migration_chart
from services.tools.bench_swa import swa_chart
from services.tools.plots import render
from tests.paths import REPO

PNG = b"\x89PNG\r\n\x1a\n"

ENGINE = {"model": "m", "dtype": "float32", "weights": "dense", "threads": 2,
          "prompt_tokens": 8, "new_tokens": 4,
          "slotmesh": {"1": {"tokens_per_s": 10.0}, "4": {"tokens_per_s": 30.0}},
          "transformers": {"1": {"tokens_per_s": 9.0}, "4": {"tokens_per_s": 20.0}}}
CLUSTER = {"model": "m", "new_tokens": 4, "repeat": 1, "cpu_count": 2,
           "one_worker": {"1": {"direct": {"tokens_per_s": 5.0}, "router": {"tokens_per_s": 4.9}},
                          "4": {"direct": {"tokens_per_s": 15.0},
                                "router": {"tokens_per_s": 14.0}}},
           "two_workers": {"4": {"tokens_per_s": 20.0}}}
MIGRATION = {"model": "m", "migrate_at": 8, "new_tokens": 32, "contexts": {
    "256": {"snapshot": {"migrate_s": 0.3}, "replay": {"migrate_s": 1.0}},
    "1024": {"snapshot": {"migrate_s": 0.5}, "replay": {"migrate_s": 2.5}}}}
SWA = {"model": "m", "dtype": "float32", "contexts": {
    "2048": {"cold_s": 5.0, "warm_same_s": 0.2, "warm_other_s": 0.4},
    "8192": {"cold_s": 27.0, "warm_same_s": 0.2, "warm_other_s": 0.6}}}
FINETUNE = {"model": "m", "ctx": 256, "batch": 1, "device": "cpu",
            "memory_cap_bytes": 3 * 2**30,
            "adamw": {"peak_memory_bytes": 2.8e9, "max_ctx_under_cap": 512,
                      "probes": {"256": 2.8e9, "512": 3.1e9}},
            "sgd": {"peak_memory_bytes": 1.5e9}}  # --skip-max-ctx: one point, no mark


@pytest.mark.parametrize("chart", [
    lambda: engine_chart(ENGINE), lambda: cluster_chart(CLUSTER),
    lambda: migration_chart([MIGRATION, MIGRATION | {"model": "n"}]),
    lambda: swa_chart(SWA), lambda: finetune_chart(FINETUNE),
], ids=["engine", "cluster", "migration", "swa", "finetune"])
def test_every_bench_chart_renders_a_png(chart, tmp_path) -> None:
    path = render(chart(), tmp_path / "sub" / "figure.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000
    again = render(chart(), tmp_path / "again.png")
    assert again.read_bytes() == path.read_bytes()  # no timestamp: reproducible files


def test_series_follow_the_report() -> None:
    chart = migration_chart([MIGRATION])
    assert [s.label for s in chart.series] == ["snapshot", "replay"]
    assert chart.series[1].points == ((256.0, 1.0), (1024.0, 2.5))
    engine_only = {k: v for k, v in ENGINE.items() if k != "transformers"}  # --skip-…
    assert [s.label for s in engine_chart(engine_only).series] == ["slotmesh"]


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as e:  # at parse time: before any benchmark runs
        main(["bench", "swa", "--plot", "swa.png"])
    assert e.value.code == 2
    assert "pip install 'slotmesh[plot]'" in capsys.readouterr().err


def test_plot_must_be_a_png(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "migration", "--plot", "figure.svg"])
    assert "name it FILE.png" in capsys.readouterr().err


def test_doc_figures_are_drawn_by_the_script_and_shown_in_the_docs() -> None:
    from scripts.doc_plots import CHARTS

    figures = REPO / "docs" / "figures"
    assert {p.name for p in figures.glob("*.png")} == set(CHARTS)
    shown = set(re.findall(r"\]\(figures/([\w.-]+\.png)\)",
                           (REPO / "docs" / "benchmarks.md").read_text()))
    assert shown == set(CHARTS)
    assert all((figures / name).read_bytes().startswith(PNG) for name in CHARTS)
