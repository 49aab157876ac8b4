"""`slotmesh bench peers`: slotmesh against transformers, llama-server and vLLM-cpu on the
same workload, in one run, on one machine (issue 15's table).

The workload (`peers_workload.py`): --prompt-tokens prompts of real text, every request
a new one, exactly --new-tokens greedy tokens with EOS ignored, closed-loop clients at
each --concurrency, tokens/s over the whole run (prefill included) and the median time to
first token; each figure is the median of --repeat runs. Systems, measured one after
another (each alone on the cores):

  transformers `generate()` fp32, in-process: the baseline every row is divided by;
  slotmesh's engine in-process (the path `bench engine` drives), one row per --weights;
  llama-server on the model's GGUF (--llama-server, or found on PATH);
  vLLM-cpu's OpenAI server (--vllm-python: an interpreter that has vllm).

The HTTP peers go through one client (`peers_http.py`). A peer that is not installed or
does not start is reported as "not run (why)". "Best peer" at a concurrency is the
fastest non-slotmesh row that ran there (transformers included).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.tools.peers_report import Row, build_report, format_report
from services.tools.peers_workload import (
    PromptFeed,
    RunResult,
    Workload,
    make_prompts,
    median_result,
    run_engine,
    run_transformers,
)

_WARMUP_TOKENS = 8
_DTYPES = ("float32", "bfloat16", "float16")


def add_peers_bench_parser(bench_sub, add_model_flags) -> None:
    p = bench_sub.add_parser("peers", help="slotmesh vs transformers, llama-server, vLLM-cpu",
                             description=__doc__, conflict_handler="resolve",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, slots=False)  # the engine gets one slot per concurrent client
    p.add_argument("--weights", dest="weight_rows", metavar="LIST", type=_weight_rows,
                   default="dense,auto",
                   help="slotmesh rows: comma-separated weight formats (dense = nothing "
                        "packed, auto, float32, bfloat16, float16, int8, int4), each with an "
                        "optional :DTYPE, that row's --dtype (default: %(default)s, all in "
                        "--dtype)")
    p.add_argument("--concurrency", type=_levels, default="1,4,16",
                   help="comma-separated closed-loop client counts (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2,
                   help="requests each client sends per run, back to back (default: 2)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per system and concurrency; the median is kept (default: 3)")
    p.add_argument("--skip-transformers", action="store_true",
                   help="no transformers baseline (no ratios to it)")
    p.add_argument("--llama-server", metavar="PATH", default=None,
                   help="llama-server binary (default: llama-server on PATH; 'none' skips it)")
    p.add_argument("--llama-gguf", metavar="FILE", default=None,
                   help="comma-separated GGUF files for llama-server, one row each "
                        "(default: the model's own GGUF)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads of every system: torch's in-process, llama-server "
                        "-t/-tb, vLLM's OpenMP cores 0..N-1 (default: torch's thread count, "
                        "i.e. every core)")
    p.add_argument("--vllm-python", metavar="PATH", default=None,
                   help="a python with vllm(-cpu) installed; its OpenAI server is measured")
    p.add_argument("--vllm-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="vLLM's --dtype; auto = bfloat16 where the CPU has native bf16 "
                        "(AVX512_BF16/AMX), float32 otherwise (default: %(default)s)")
    p.add_argument("--vllm-model", metavar="DIR", type=Path, default=None,
                   help="HF-format directory for vLLM (default: the model exported from "
                        "slotmesh's loaded weights into the cache dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_peers_bench)


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "positive client counts")
    return levels


def _weight_rows(text: str) -> list[tuple[str, str | None]]:
    """"dense,auto,int4:bfloat16" -> [("dense", None), ("auto", None), ("int4", "bfloat16")]."""
    from worker.config import WEIGHT_FORMATS

    rows = []
    for item in text.split(","):
        weights, _, dtype = item.strip().partition(":")
        if weights not in ("dense", *WEIGHT_FORMATS):
            raise argparse.ArgumentTypeError(f"{weights!r} is not dense or one of "
                                             f"{', '.join(WEIGHT_FORMATS)}")
        if dtype not in ("", *_DTYPES):
            raise argparse.ArgumentTypeError(f"{dtype!r} is not one of {', '.join(_DTYPES)}")
        rows.append((weights, dtype or None))
    return rows


# -- systems ---------------------------------------------------------------------------


class System(Protocol):
    """A thing that serves the workload; opened just before and closed right after its
    runs, so two systems never hold the cores or the memory at once."""

    detail: str  # what exactly ran (weight format, server version, dtype)

    def run(self, feed: PromptFeed, concurrency: int, rounds: int,
            new_tokens: int) -> RunResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemSpec:
    name: str  # the report's row label
    kind: str  # "slotmesh" | "baseline" | "peer"
    open: Callable[[], System]  # raises PeerUnavailable when it cannot run here


@dataclass(slots=True)
class _InProcess:
    """An in-process system: a model object and the closed loop that drives it."""

    model: object
    loop: Callable[..., RunResult]
    detail: str

    def run(self, feed, concurrency, rounds, new_tokens) -> RunResult:
        return self.loop(self.model, feed, concurrency, rounds, new_tokens)

    def close(self) -> None:
        self.model = None


@dataclass(slots=True)
class _Server:
    server: object  # peers_http.PeerServer
    detail: str

    def run(self, feed, concurrency, rounds, new_tokens) -> RunResult:
        from services.tools.peers_http import run_http

        return run_http(self.server.client, feed, concurrency, rounds, new_tokens)

    def close(self) -> None:
        self.server.stop()


def _open_server(spec, detail: str) -> System:
    from services.tools.peers_http import PeerServer

    server = PeerServer(spec)
    try:
        ready_s = server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return _Server(server, f"{detail}; ready in {ready_s:.0f} s; log {server.log_path}")


# -- the run ---------------------------------------------------------------------------


def run_peers_bench(args: argparse.Namespace) -> int:
    from services.cli.flags import model_config
    from services.tools.bench_corpus import CORPUS
    from worker.loaders import load_model_files

    threads = args.threads or _torch_threads()
    workload = Workload(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                        levels=args.concurrency,
                        rounds=args.rounds, repeat=args.repeat)
    model = model_config(argparse.Namespace(**{**vars(args), "weights": None}))
    ckpt = load_model_files(model.model, model.cache_dir)  # dense: transformers' weights
    tok = ckpt.tokenizer
    prompts = make_prompts(tok.encode(CORPUS, add_special_tokens=False), workload.num_prompts,
                           workload.prompt_tokens, tok.bos_token_id if tok.add_bos else None)
    specs = _system_specs(args, model, ckpt, workload, threads)
    load_before = os.getloadavg()
    with _torch_threads_set(threads):
        rows = [_measure(spec, prompts, workload) for spec in specs]
    report = build_report(ckpt.name, workload, rows, threads, (load_before, os.getloadavg()))
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _system_specs(args, model, ckpt, workload: Workload, threads: int) -> list[SystemSpec]:
    specs = []
    if not args.skip_transformers:
        specs.append(SystemSpec(name="transformers generate() fp32", kind="baseline",
                                open=lambda: _open_transformers(ckpt)))
    for weights, dtype in args.weight_rows:
        specs.append(_slotmesh_spec(weights, dtype or model.dtype, model, ckpt, workload))
    specs += _llama_specs(args, model, workload, threads)
    if args.vllm_python:
        specs.append(_vllm_spec(args, model, ckpt, workload, threads))
    return specs


def _open_transformers(ckpt) -> System:
    import torch

    from services.tools.bench_engine import transformers_model

    return _InProcess(transformers_model(ckpt, torch.float32), run_transformers,
                      "dense fp32 weights as slotmesh loads them (GGUF blocks dequantized)")


def _slotmesh_spec(weights: str, dtype: str, model, ckpt, workload: Workload) -> SystemSpec:
    # the flags `slotmesh generate/worker` take for the same engine
    label = "slotmesh " + ("" if weights == "dense" else f"--weights {weights} ") + \
        f"--dtype {dtype}"

    def open_engine() -> System:
        from worker.config import CacheConfig, EngineConfig, SchedulerConfig
        from worker.engine import LLMEngine
        from worker.loaders import load_model_files

        policy = None if weights == "dense" else weights
        config = EngineConfig(
            model=dataclasses.replace(model, weights=policy, dtype=dtype),
            cache=CacheConfig(enable_prefix_caching=False),  # every prompt is computed
            scheduler=SchedulerConfig(max_num_seqs=max(workload.levels),
                                      max_num_batched_tokens=max(512, workload.prompt_tokens)))
        files = ckpt if policy is None else load_model_files(model.model, model.cache_dir,
                                                             policy)
        engine = LLMEngine(config, model_files=files)
        return _InProcess(engine, run_engine, f"weights {engine.weights_summary}")

    return SystemSpec(name=label, kind="slotmesh", open=open_engine)


def _llama_specs(args, model, workload: Workload, threads: int) -> list[SystemSpec]:
    from services.tools.peers_http import PeerUnavailable, llama_server_spec

    binary = None if args.llama_server == "none" else \
        args.llama_server or shutil.which("llama-server")
    ggufs = [Path(g) for g in args.llama_gguf.split(",")] if args.llama_gguf else \
        [_model_gguf(model)]
    specs = []
    for gguf in ggufs:
        name = f"llama-server {gguf.name if gguf else ''}".strip()

        def open_llama(gguf=gguf) -> System:
            if binary is None:
                raise PeerUnavailable("no llama-server binary: give --llama-server PATH or "
                                      "put one on PATH")
            if gguf is None or not gguf.is_file():
                raise PeerUnavailable(f"needs a GGUF file; {gguf or model.model} is not one")
            from services.local.redis_server import free_port

            spec = llama_server_spec(binary, gguf, free_port(), max(workload.levels), threads,
                                     workload.prompt_tokens + workload.new_tokens + 64)
            return _open_server(spec, f"--parallel {max(workload.levels)} -t {threads}")

        specs.append(SystemSpec(name=name, kind="peer", open=open_llama))
    return specs


def _vllm_spec(args, model, ckpt, workload: Workload, threads: int) -> SystemSpec:
    from worker.quantize import cpu_has_native_bf16

    dtype = args.vllm_dtype
    if dtype == "auto":
        dtype = "bfloat16" if cpu_has_native_bf16() else "float32"

    def open_vllm() -> System:
        from services.local.redis_server import free_port
        from services.tools.peers_http import python_has_vllm, vllm_spec

        version = python_has_vllm(args.vllm_python)
        model_dir = args.vllm_model or _exported_hf_dir(ckpt, model.cache_dir)
        spec = vllm_spec(args.vllm_python, model_dir, free_port(), max(workload.levels), dtype,
                         workload.prompt_tokens + workload.new_tokens + 64, threads)
        return _open_server(spec, f"vllm {version}, --dtype {dtype}, model {model_dir}")

    return SystemSpec(name=f"vLLM-cpu {dtype}", kind="peer", open=open_vllm)


def _exported_hf_dir(ckpt, cache_dir: Path) -> Path:
    import torch

    from services.tools.bench_engine import transformers_model
    from services.tools.peers_http import export_hf_dir

    out = Path(cache_dir) / "peers-hf" / f"{ckpt.name}-{ckpt.fingerprint[:16]}"
    if (out / "config.json").exists():
        return out
    return export_hf_dir(ckpt, transformers_model(ckpt, torch.float32), out)


def _model_gguf(model) -> Path | None:
    from worker.loaders.hub import resolve_model

    path = resolve_model(model.model, model.cache_dir)
    return path if path.is_file() else None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@contextlib.contextmanager
def _torch_threads_set(threads: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure(spec: SystemSpec, prompts: list[list[int]], workload: Workload) -> Row:
    """Open the system, warm it up with one short request, run every level --repeat times
    (levels in order within a repeat), close it. A peer that cannot start, or fails a
    request, gets a row that says so and no figures."""
    from services.tools.peers_http import PeerRequestError, PeerUnavailable

    row = Row(name=spec.name, kind=spec.kind)
    _progress(f"{spec.name}: starting")
    try:
        system = spec.open()
    except PeerUnavailable as e:
        row.not_run = str(e)
        _progress(f"{spec.name}: not run ({e})")
        return row
    row.detail = system.detail
    feed = PromptFeed(prompts)
    runs: dict[int, list[RunResult]] = {c: [] for c in workload.levels}
    try:
        system.run(feed, 1, 1, _WARMUP_TOKENS)
        for rep in range(workload.repeat):
            for c in workload.levels:
                result = system.run(feed, c, workload.rounds, workload.new_tokens)
                runs[c].append(result)
                _progress(f"{spec.name}: c={c} run {rep + 1}/{workload.repeat}: "
                          f"{result.tokens_per_s:.1f} tok/s, TTFT p50 {result.ttft_p50_s:.2f} s")
    except PeerRequestError as e:
        row.not_run = f"failed during the run: {e}"
        return row
    finally:
        system.close()
    row.results = {c: median_result(rs) for c, rs in runs.items()}
    return row


def _progress(line: str) -> None:
    print(f"bench peers: {line}", file=sys.stderr, flush=True)
