"""Progress lines of the long waits (model load, warmup) and the warmup's step shapes."""

from __future__ import annotations

import io

import torch

from worker.config import EngineConfig, ModelConfig, SchedulerConfig
from worker.engine import LLMEngine
from worker.progress import silent, stderr_progress
from worker.warmup import warmup_shapes


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_only_on_a_terminal_and_not_quiet() -> None:
    tty = _Terminal()
    stderr_progress(stream=tty)("loading x ...")
    assert tty.getvalue() == "slotmesh: loading x ...\n"
    assert stderr_progress(quiet=True, stream=_Terminal()) is silent
    assert stderr_progress(stream=io.StringIO()) is silent  # a pipe or a log file


def test_the_engine_reports_load_warmup_and_ready(tiny_model_dir) -> None:
    lines: list[str] = []
    config = EngineConfig(model=ModelConfig(model=str(tiny_model_dir("llama"))))
    engine = LLMEngine(config, progress=lines.append)
    assert [line.split(" ", 1)[0] for line in lines] == ["loading", "loaded", "ready"]
    assert "warming up (3 step shapes)" in lines[1]
    assert f"(warmup {engine.warmup_s:.1f}s)" in lines[2]
    lines.clear()
    LLMEngine(EngineConfig(model=config.model, warmup=False), progress=lines.append)
    assert lines[-1].endswith("(warmup 0.0s, skipped)") and len(lines) == 2


def test_warmup_shapes_a_full_chunk_only_on_cuda() -> None:
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512)
    # CPU: a short prefill spanning three 16-token blocks, decode of every slot, mixed
    assert warmup_shapes(sched, 8192, 16, torch.device("cpu")) == [
        [33], [1, 1, 1, 1], [30, 1, 1, 1]]
    # CUDA: the full chunk reserves the largest step's activations at startup
    assert warmup_shapes(sched, 8192, 16, torch.device("cuda"))[0] == [512]
    assert warmup_shapes(sched, 100, 16, torch.device("cuda"))[0] == [99]  # the context
    one_slot = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512)
    assert warmup_shapes(one_slot, 8192, 16, torch.device("cpu")) == [[33], [1]]
