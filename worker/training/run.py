"""One fine-tuning run end to end: validate, load, train, then write the output or save a
checkpoint.

Order matters for "nothing half-written": every check that can fail on bad input (flags,
output directory, data file, model, --ctx against the model's context, the data's size,
--train-only patterns) runs before training starts and before anything is written. The
output directory appears only when training finished; Ctrl-C leaves only the checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from worker.loaders import load_model_files
from worker.loaders.model_files import ModelFiles
from worker.models.decoder import DecoderModel
from worker.models.registry import build_model, model_args
from worker.training.config import FinetuneConfig
from worker.training.data import Windows, file_digest, read_text, tokenize_windows
from worker.training.export import (
    MODEL_FILES,
    check_output_dir,
    staged_dir,
    write_json,
    write_model_dir,
)
from worker.training.optim import (
    load_flat_state,
    make_optimizer,
    moment_buffer_bytes,
    select_trainable,
    state_bytes,
)
from worker.training.resume import (
    SavedRun,
    default_resume_dir,
    read_resume_state,
    save_resume_state,
)
from worker.training.schedule import LRSchedule
from worker.training.trainer import Interrupt, Trainer, TrainState
from worker.vocab.errors import InvalidRequestError

EXIT_INTERRUPTED = 130  # the shell's code for "ended by SIGINT"


@dataclass(slots=True)
class Prepared:
    """Everything a run needs, loaded and checked; nothing written yet."""

    config: FinetuneConfig
    source: ModelFiles  # config and tokenizer to export with (tensors already dropped)
    model: DecoderModel
    optimizer: torch.optim.Optimizer
    windows: Windows
    state: TrainState
    data_sha256: str
    resumed_from: Path | None


@dataclass(frozen=True, slots=True)
class FinetuneResult:
    interrupted: bool
    path: Path  # the output directory, or the checkpoint when interrupted
    metrics: dict | None


def finetune(config: FinetuneConfig | None, stream: TextIO,
             resume: Path | None = None) -> FinetuneResult:
    """Run (or, with `resume`, continue) a fine-tuning; `config` is ignored on resume."""
    run = prepare(config, resume)
    trainer = Trainer(model=run.model, optimizer=run.optimizer, windows=run.windows,
                      schedule=_schedule(run.config), config=run.config, state=run.state,
                      stream=stream)
    _print_plan(run, stream)
    with Interrupt(stream) as interrupt:
        finished = trainer.fit(interrupt)
    if not finished:
        return _save_interrupted(run, stream)
    metrics = build_metrics(run)
    with staged_dir(run.config.out) as tmp:
        write_model_dir(tmp, run.model, run.source)
        write_json(tmp / "metrics.json", metrics)
    _print_summary(run, metrics, stream)
    if run.resumed_from == default_resume_dir(run.config.out):
        shutil.rmtree(run.resumed_from, ignore_errors=True)  # superseded by the output
    return FinetuneResult(interrupted=False, path=run.config.out, metrics=metrics)


# -- preparation -----------------------------------------------------------------------


def prepare(config: FinetuneConfig | None, resume: Path | None) -> Prepared:
    saved = read_resume_state(resume) if resume is not None else None
    if saved is not None:
        config = FinetuneConfig.from_json(saved.state["config"])
    config.validate()
    check_output_dir(config.out)
    text = read_text(config.data)
    digest = file_digest(config.data)
    if saved is not None and saved.state["data_sha256"] != digest:
        raise InvalidRequestError("data", f"{config.data} changed since the checkpoint was "
                                          "saved; resume needs the same data")
    source = saved.source if saved is not None else load_model_files(config.model,
                                                                    config.cache_dir)
    _check_ctx(config, source)
    windows = tokenize_windows(text, source.tokenizer, config.ctx, config.val_split,
                               config.seed)
    model = _build_trainable(source, config)
    optimizer = make_optimizer(config.optimizer, select_trainable(model, config.train_only),
                               config.lr, config.weight_decay, config.grad_accum)
    state = _restore(saved, optimizer)
    return Prepared(config=config, source=source, model=model, optimizer=optimizer,
                    windows=windows, state=state, data_sha256=digest, resumed_from=resume)


def _check_ctx(config: FinetuneConfig, source: ModelFiles) -> None:
    limit = model_args(source.config).max_position_embeddings
    if config.ctx > limit:
        raise InvalidRequestError("ctx", f"{config.ctx} is above the model's context of "
                                         f"{limit} tokens")


def _build_trainable(source: ModelFiles, config: FinetuneConfig) -> DecoderModel:
    """fp32 model (GGUF weights arrive dequantised); the loaded tensors are dropped so the
    weights are held once."""
    model = build_model(source.config, source.tensors, torch.float32,
                        torch.device(config.device))
    source.tensors.clear()
    return model


def _restore(saved: SavedRun | None, optimizer: torch.optim.Optimizer) -> TrainState:
    if saved is None:
        return TrainState()
    load_flat_state(optimizer, saved.optimizer_state)
    return TrainState.from_json(saved.state["loop"])


def _schedule(config: FinetuneConfig) -> LRSchedule:
    return LRSchedule.build(lr=config.lr, epochs=config.epochs, lr_min=config.lr_min,
                            halvings=config.lr_halvings, decay_epochs=config.decay_epochs)


# -- outputs ---------------------------------------------------------------------------


def _save_interrupted(run: Prepared, stream: TextIO) -> FinetuneResult:
    path = default_resume_dir(run.config.out)
    state = {"config": run.config.to_json(), "data_sha256": run.data_sha256,
             "loop": run.state.to_json()}
    save_resume_state(path, run.model, run.source, run.optimizer, state)
    done = run.state
    print(f"interrupted in epoch {done.epoch + 1}/{run.config.epochs} after "
          f"{done.windows_done}/{len(run.windows.train)} training windows; checkpoint saved "
          f"to {path}\nresume with: slotmesh finetune --resume {path}", file=stream, flush=True)
    return FinetuneResult(interrupted=True, path=path, metrics=None)


def build_metrics(run: Prepared) -> dict:
    """metrics.json: see docs/finetune.md for the schema."""
    cfg, params = run.config, list(run.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    history = run.state.history
    return {
        "format_version": 1,
        "model": cfg.model,
        "architecture": run.model.args.architecture,
        "config": cfg.to_json(),
        "lr_schedule": _schedule(cfg).rates(),
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "optimizer_state_bytes": state_bytes(run.optimizer),
        "moment_buffer_bytes": moment_buffer_bytes(run.optimizer),
        "data": {"file": str(cfg.data), "sha256": run.data_sha256,
                 "tokens": run.windows.num_tokens, "ctx": cfg.ctx,
                 "train_windows": len(run.windows.train), "val_windows": len(run.windows.val)},
        "initial_val": run.state.initial_val,
        "epochs": history,
        "peak_memory_bytes": max(e["peak_memory_bytes"] for e in history),
        "memory_kind": history[-1]["memory_kind"],
        "resumed": run.resumed_from is not None,
    }


def _print_plan(run: Prepared, stream: TextIO) -> None:
    cfg, w = run.config, run.windows
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in run.model.parameters())
    rates = ", ".join(f"{r:.3g}" for r in _schedule(cfg).rates())
    start = "resuming" if run.resumed_from else "finetune"
    print(f"{start}: {cfg.model} ({run.model.args.architecture}), {cfg.optimizer}, "
          f"{trainable:,}/{total:,} parameters trainable\n"
          f"data: {w.num_tokens:,} tokens → {len(w.train)} train + {len(w.val)} val windows "
          f"of {cfg.ctx}; batch {cfg.batch} × grad-accum {cfg.grad_accum}; "
          f"lr per epoch: {rates}", file=stream, flush=True)


def _print_summary(run: Prepared, metrics: dict, stream: TextIO) -> None:
    lines = []
    for e in metrics["epochs"]:
        val = e["val"] or {}
        lines.append(
            f"epoch {e['epoch']}: lr {e['lr']:.3g}  train loss {e['train']['loss']:.4f} "
            f"acc {100 * e['train']['accuracy']:.2f}%  val loss {_fmt(val.get('loss'))} "
            f"acc {_fmt(val.get('accuracy'), 100, '%', '.2f')}  "
            f"{_fmt(e['train']['tokens_per_s'], 1, ' tok/s', '.1f')}  "
            f"peak {e['peak_memory_bytes'] / 2**30:.2f} GiB")
    before, after = metrics["initial_val"], metrics["epochs"][-1]["val"]
    if before and after:
        change = 100 * (after["loss"] / before["loss"] - 1)
        lines.append(f"val loss {before['loss']:.4f} → {after['loss']:.4f} ({change:+.1f}%)")
    files = ", ".join((*MODEL_FILES, "metrics.json"))
    lines.append(f"wrote {run.config.out} ({files})")
    print("\n".join(lines), file=stream, flush=True)


def _fmt(value: float | None, scale: float = 1, unit: str = "", spec: str = ".4f") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{unit}"
