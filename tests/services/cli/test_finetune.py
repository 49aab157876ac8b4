"""`slotmesh finetune` end to end: memorising a text with each optimizer, the output
served by `slotmesh generate`, bad input, Ctrl-C and --resume, a real model, the
benchmark's plumbing. Every test trains on one torch thread (conftest `one_thread`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.cli.main import main
from tests.paths import REPO
from tests.tiny_models import tiny_config, write_tokenizer
from worker.loaders.hf import load_hf_dir
from worker.tokenizer import Tokenizer
from worker.training.export import MODEL_FILES

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.slow]  # trains real steps; runs subprocesses

TEXT = ("Once upon a time there was a little engine that served tokens. "
        "The quick brown fox jumps over the lazy dog. ")


@pytest.fixture(scope="session")
def memo_model(tmp_path_factory) -> Path:
    """A 2-layer tiny Llama with a wider init (0.1): plain SGD memorises on it in a few
    dozen steps (from the default 0.02 it stalls at the unigram distribution)."""
    import transformers as tf

    path = tmp_path_factory.mktemp("memo")
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers, config.initializer_range = 2, 0.1
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    write_tokenizer(path)
    return path


def _finetune(capsys, *flags: str) -> tuple[int, str]:
    rc = main(["finetune", *flags])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize(("optimizer", "lr"), [("adamw", "1e-2"), ("sgd", "0.3")])
def test_memorises_text_and_generate_reproduces_it(optimizer, lr, memo_model, tmp_path,
                                                   capsys) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 12)
    out = tmp_path / "out"
    rc, log = _finetune(capsys, "--model", str(memo_model), "--data", str(data), "--out",
                        str(out), "--optimizer", optimizer, "--lr", lr, "--epochs", "6",
                        "--ctx", "32", "--val-split", "0.2", "--seed", "1",
                        "--weight-decay", "0.01", "--lr-halvings", "1")
    assert rc == 0, log
    assert "epoch 6/6 val" in log and "loss=" in log and "acc=" in log and "ETA=" in log
    assert sorted(p.name for p in out.iterdir()) == sorted([*MODEL_FILES, "metrics.json"])
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["initial_val"]["loss"], metrics["epochs"][-1]["val"]["loss"]
    assert after <= 0.5 * before, (before, after)
    assert metrics["epochs"][-1]["train"]["accuracy"] > 0.9
    assert metrics["lr_schedule"][0] == float(lr) and metrics["lr_schedule"][-1] < float(lr)
    if optimizer == "sgd":
        assert metrics["optimizer_state_bytes"] == 0
    else:
        assert metrics["moment_buffer_bytes"] == 2 * 4 * metrics["trainable_parameters"]
    rc = main(["generate", "Once upon a time", "--model", str(out), "--temperature", "0",
               "--max-tokens", "40", "--json"])
    assert rc == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert ("Once upon a time" + text) in TEXT * 3


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_INPUTS = [
    ("missing file", lambda d: ["--data", str(d / "nope.txt")], "data"),
    ("empty file", lambda d: ["--data", str(_write(d / "e.txt", " \n"))], "empty"),
    ("not utf-8", lambda d: ["--data", str(d / "b.txt")], "UTF-8"),
    ("too short", lambda d: ["--data", str(_write(d / "s.txt", "The quick fox."))], "window"),
    ("ctx above model", lambda d: ["--ctx", "4096"], "ctx"),
    ("lr zero", lambda d: ["--lr", "0"], "lr"),
    ("lr negative", lambda d: ["--lr=-1e-4"], "lr"),
    ("val split high", lambda d: ["--val-split", "0.6"], "val_split"),
    ("val split negative", lambda d: ["--val-split", "-0.1"], "val_split"),
    ("unknown optimizer", lambda d: ["--optimizer", "adam"], "optimizer"),
    ("out not writable", lambda d: ["--out", str(_write(d / "f", "x") / "out")], "out"),
    ("out not empty", lambda d: ["--out", str(_write(d / "full", "x").parent)], "out"),
    ("pattern matches nothing", lambda d: ["--train-only", "nothing_here"], "train_only"),
]


@pytest.mark.parametrize(("case", "flags", "says"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exit_2_nothing_written(case, flags, says, tiny_model_dir, tmp_path,
                                          capsys) -> None:
    model = str(tiny_model_dir("llama"))
    capsys.readouterr()  # what making the model printed
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 " * 200)
    data = _write(tmp_path / "ok.txt", TEXT * 20)
    work = tmp_path / "work"
    work.mkdir()
    args = ["--model", model, "--data", str(data), "--out", str(work / "out"),
            "--ctx", "32", *flags(tmp_path)]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["finetune", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("slotmesh: error:") and says in err and len(err.splitlines()) == 1
    assert not any(work.iterdir())  # no output, no checkpoint, no temporary directory
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_ctrl_c_saves_checkpoint_and_resume_finishes(tiny_model_dir, tmp_path,
                                                     capsys) -> None:
    data = _write(tmp_path / "text.txt", TEXT * 100)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "services.cli", "finetune", "--model",
           str(tiny_model_dir("llama")), "--data", str(data), "--out", str(out),
           "--ctx", "64", "--epochs", "3", "--lr", "1e-3", "--val-split", "0.1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # a pipe gets whole lines: wait for the first step's
        if "epoch 1/3 train" in line and "loss=" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, rest
    checkpoint = tmp_path / "out.checkpoint"
    assert "resume with: slotmesh finetune --resume" in rest
    assert not out.exists()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["loop"]["epoch"] == 0 and state["loop"]["windows_done"] > 0
    assert load_hf_dir(checkpoint).config["architectures"] == ["LlamaForCausalLM"]

    rc, log = _finetune(capsys, "--resume", str(checkpoint))
    assert rc == 0, log
    assert log.startswith("resuming:")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"] and [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["epochs"][0]["train"]["windows"] == metrics["data"]["train_windows"]
    assert not checkpoint.exists()  # superseded by the output


SMOLLM_TEXT = "".join(
    f"Day {i}: the keeper lit the lamp at {6 + i % 3} o'clock and wrote that the sea was "
    f"{['calm', 'grey', 'rough', 'bright'][i % 4]} and the wind came from the "
    f"{['north', 'east', 'south', 'west'][i * 3 % 4]}.\n" for i in range(1, 13))


def test_smollm2_one_epoch_lowers_validation_loss(model_cache, tmp_path, capsys) -> None:
    """One epoch on a twelve-line text (375 tokens: 8 windows of 32 to train on, 3 held
    out), only the last block trained so backward stays short: the loss on the held-out
    windows drops. The output carries the GGUF's tokenizer and config."""
    data = _write(tmp_path / "log.txt", SMOLLM_TEXT)
    out = tmp_path / "out"
    rc, log = _finetune(capsys, "--model", "smollm2-135m", "--cache-dir", str(model_cache),
                        "--data", str(data), "--out", str(out), "--epochs", "1",
                        "--ctx", "32", "--val-split", "0.25", "--lr", "3e-4", "--batch", "2",
                        "--train-only", r"layers\.29\.")
    assert rc == 0, log
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["initial_val"]["loss"], metrics["epochs"][0]["val"]["loss"]
    print(f"smollm2-135m held-out loss {before:.4f} -> {after:.4f}; {metrics['data']}")
    assert metrics["data"]["val_windows"] == 3
    assert after < before
    assert metrics["trainable_parameters"] < metrics["parameters"] / 20
    tokenizer = Tokenizer.from_hf_dir(out)  # exported from the GGUF's own
    assert len(tokenizer.encode(SMOLLM_TEXT)) == metrics["data"]["tokens"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"


def test_help_lists_finetune(capsys) -> None:
    for argv in (["--help"], ["finetune", "--help"], ["bench", "finetune", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "--lr-halvings" in out and "--memory-cap-gib" in out


def test_bench_finetune_report(tiny_model_dir, monkeypatch, capsys, tmp_path) -> None:
    """The benchmark's plumbing with the child processes replaced by a fake that grows
    linearly with the context: ratio, the largest context under the cap, and its plot."""
    from services.tools import bench_finetune as bench

    def fake(spec: dict, plain_malloc: bool = False) -> dict:
        base = {"adamw": 4000, "sgd": 2000}[spec["optimizer"]]
        return {"peak_memory_bytes": base + 10 * spec["ctx"], "memory_kind": "rss",
                "tokens_per_s": 100.0, "step_seconds": [1.0], "max_position_embeddings": 8192}

    monkeypatch.setattr(bench, "_measure", fake)
    rc = main(["bench", "finetune", "--model", "x", "--ctx", "64", "--memory-cap-gib",
               str(8000 / 2**30), "--ctx-step", "32", "--json", "--plot",
               str(tmp_path / "finetune.png")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sgd_over_adamw_peak_memory"] == round(2640 / 4640, 3)
    assert report["adamw"]["max_ctx_under_cap"] == 384  # 4000 + 10·384 ≤ 8000 < 4000 + 10·416
    assert report["sgd"]["max_ctx_under_cap"] == 576
    assert (tmp_path / "finetune.png").read_bytes().startswith(b"\x89PNG")


def test_bench_child_measures_a_real_step(tiny_model_dir) -> None:
    from services.tools.bench_finetune import _child

    spec = {"model": str(tiny_model_dir("llama")), "cache_dir": "/nonexistent",
            "device": "cpu", "ctx": 16, "batch": 1, "steps": 2}
    sgd, adamw = (_child(spec | {"optimizer": o}) for o in ("sgd", "adamw"))
    assert sgd["optimizer_state_bytes"] == 0
    assert adamw["moment_buffer_bytes"] == 2 * adamw["parameter_bytes"]
    assert sgd["peak_memory_bytes"] > 0 and sgd["tokens_per_s"] > 0
