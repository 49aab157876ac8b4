"""The `slotmesh` command line on a tiny model: JSON output, errors, help."""

from __future__ import annotations

import json

import pytest

from services.cli.main import main


def test_generate_json(tiny_model_dir, capsys) -> None:
    path = str(tiny_model_dir("llama"))
    rc = main(["generate", "The quick brown fox", "--model", path, "--json",
               "--temperature", "0", "--max-tokens", "5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "finish_reason"}
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
    rc = main(["generate", "The quick brown fox", "--model", path, "--json",
               "--temperature", "0", "--max-tokens", "5"])
    assert json.loads(capsys.readouterr().out)["token_ids"] == out["token_ids"]


def test_generate_chat_streams_text(tiny_model_dir, capsys) -> None:
    rc = main(["generate", "hi", "--model", str(tiny_model_dir("llama")), "--chat",
               "--seed", "3", "--max-tokens", "4"])
    assert rc == 0 and capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(("flags", "field"), [
    (["--top-p", "2"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--min-p", "1.5"], "min_p"),
])
def test_bad_flags_exit_2_naming_the_field(tiny_model_dir, capsys, flags, field) -> None:
    rc = main(["generate", "x", "--model", str(tiny_model_dir("llama")), *flags])
    assert rc == 2
    assert field in capsys.readouterr().err


def test_unknown_model_exit_2(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SLOTMESH_CACHE", str(tmp_path))
    assert main(["generate", "x", "--model", "nope-7b"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "bench" in out and "chaos" in out


def test_generate_takes_every_sampling_field(tiny_model_dir, capsys) -> None:
    """The in-process generate forwards each sampling flag; the JSON carries logprobs."""
    path = str(tiny_model_dir("llama"))
    base = ["generate", "The quick brown fox", "--model", path, "--json", "--max-tokens", "4",
            "--temperature", "0"]
    assert main([*base, "--logit-bias", "7=100", "--ignore-eos", "--logprobs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == [7, 7, 7, 7]  # +100 wins every greedy step
    assert [e["token_id"] for e in out["logprobs"]] == out["token_ids"]
    assert all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in out["logprobs"])
    # llama.cpp's spelling of a bias, and the penalties: the same token is penalised away
    assert main([*base, "--logit-bias", "7+100", "--repeat-penalty", "1e30",
                 "--presence-penalty", "2", "--frequency-penalty", "2", "--typical-p",
                 "0.9", "--ignore-eos"]) == 0
    tokens = json.loads(capsys.readouterr().out)["token_ids"]
    assert tokens[0] == 7 and 7 not in tokens[1:]


@pytest.mark.parametrize("argv", [
    ["--parallel", "3", "--ctx-size", "128"],
    ["-np", "3", "--max-model-len", "128"],
    ["--slots", "3", "--ctx", "128"],
])
def test_llama_cpp_and_vllm_flag_names(argv) -> None:
    from services.cli.flags import engine_config
    from services.cli.main import build_parser

    args = build_parser().parse_args(["generate", "x", *argv, "--block-size", "32",
                                      "--batch-size", "96"])
    config = engine_config(args)
    assert config.scheduler.max_num_seqs == 3 and config.model.max_model_len == 128
    assert config.cache.block_size == 32 and config.scheduler.max_num_batched_tokens == 96


def test_bad_logit_bias_flag_names_the_format(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--logit-bias", "seven"])
    assert e.value.code == 2 and "is not ID=BIAS" in capsys.readouterr().err


def test_generate_no_warmup_skips_it_and_progress_shows_on_a_terminal(tiny_model_dir, capsys,
                                                                      monkeypatch) -> None:
    import sys

    import worker.engine

    def no_warmup(*args):
        raise AssertionError("--no-warmup ran the warmup")

    monkeypatch.setattr(worker.engine, "warmup", no_warmup)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["generate", "x", "--model", str(tiny_model_dir("llama")), "--max-tokens", "2",
            "--no-warmup", "--json"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "slotmesh: loading" in err and "(warmup 0.0s, skipped)" in err
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_version(capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"slotmesh {version('slotmesh')}\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["--scenarios", "kill_worker,typo"], "--scenarios: unknown ['typo']"),
    (["--workers", "1"], "--workers: at least 2"),
])
def test_chaos_refuses_bad_flags_before_starting_anything(argv, message, capsys) -> None:
    assert main(["chaos", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_engine_reports_ratios(tiny_model_dir, capsys, tmp_path) -> None:
    """Smoke test of the benchmark's plumbing on a tiny model (no timing asserted)."""
    plot = tmp_path / "engine.png"
    rc = main(["bench", "engine", "--model", str(tiny_model_dir("llama")), "--concurrency",
               "1,2", "--prompt-tokens", "8", "--new-tokens", "4", "--repeat", "1", "--json",
               "--plot", str(plot)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["vs_transformers"]) == {"1", "2"}
    assert report["dtype"] == "float32"
    assert report["device_to_host_bytes_per_step"]["2"]["device_sampling"] == 8
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_engine_runs_packed_weights_against_dense_transformers(tiny_model_dir,
                                                                     capsys) -> None:
    """--weights int4 packs the engine's linears; transformers still gets dense ones."""
    rc = main(["bench", "engine", "--model", str(tiny_model_dir("llama")), "--concurrency",
               "1", "--prompt-tokens", "8", "--new-tokens", "4", "--repeat", "1", "--json",
               "--weights", "int4"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "int4" and set(report["vs_transformers"]) == {"1"}


@pytest.mark.slow  # a fresh interpreter
def test_python_dash_m_worker_is_slotmesh_worker() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "services.worker", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--heartbeat-ttl" in out.stdout


def test_generate_via_unreachable_router_is_a_clear_error(capsys) -> None:
    from services.local.redis_server import free_port

    rc = main(["generate", "--router", f"127.0.0.1:{free_port()}", "hi", "--timeout", "5"])
    assert rc == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize("flags, field", [
    (["--swa-checkpoints", "-1"], "--swa-checkpoints"),
    (["--checkpoint-every", "-5"], "--checkpoint-every"),
    (["--checkpoint-min-step", "-1"], "--checkpoint-min-step"),
    (["--prompt-cache-mb", "-1"], "--prompt-cache-mb"),
    (["--prompt-cache-ttl", "0"], "--prompt-cache-ttl"),
])
def test_bad_prompt_cache_flags_exit_2_naming_the_flag(flags, field, capsys) -> None:
    assert main(["worker", *flags]) == 2  # refused before Redis or the model is touched
    assert field in capsys.readouterr().err
