"""The epoch loop: train steps, validation passes, progress bars, metrics, Ctrl-C.

`Trainer.fit` runs a validation pass before training (the baseline every later epoch is
compared with), then per epoch: the learning rate from the schedule, the training
windows in the epoch's order in steps of batch × grad_accum windows, one optimizer step
each, then a validation pass. Each window's loss is the mean cross-entropy of its ctx
next-token predictions; a step's loss is the mean over all its tokens (each micro-batch
contributes its token sum / the step's token count, so accumulation gives the same
gradient as one big batch).

Ctrl-C (SIGINT) sets a flag; the loop stops at the next step boundary (never inside an
optimizer step), and `finetune.run` saves a checkpoint. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.nn.functional as F

from worker.models.decoder import DecoderModel
from worker.training.config import FinetuneConfig
from worker.training.data import Windows, epoch_order
from worker.training.memory import PeakMemory
from worker.training.optim import set_lr
from worker.training.progress import EpochBar, RunningStats
from worker.training.schedule import LRSchedule
from worker.vocab.errors import InvalidRequestError


@dataclass(slots=True)
class TrainState:
    """Where the run is; saved in a checkpoint and restored on --resume."""

    epoch: int = 0  # the epoch in progress (0-based)
    windows_done: int = 0  # training windows of `epoch` already stepped on
    train_stats: RunningStats = field(default_factory=RunningStats)  # of `epoch` so far
    train_seconds: float = 0.0  # of `epoch` so far
    initial_val: dict | None = None  # validation before any training
    history: list[dict] = field(default_factory=list)  # finished epochs' metrics

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "windows_done": self.windows_done,
                "train_stats": self.train_stats.to_json(), "train_seconds": self.train_seconds,
                "initial_val": self.initial_val, "history": self.history}

    @classmethod
    def from_json(cls, d: dict) -> TrainState:
        return cls(epoch=d["epoch"], windows_done=d["windows_done"],
                   train_stats=RunningStats(**d["train_stats"]),
                   train_seconds=d["train_seconds"], initial_val=d["initial_val"],
                   history=list(d["history"]))


class Interrupt:
    """Context manager: the first SIGINT asks the loop to stop; a second one aborts."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.requested = False
        self._previous = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step to save a checkpoint "
              "(Ctrl-C again to abort without one)", file=self.stream, flush=True)


class Trainer:
    def __init__(self, *, model: DecoderModel, optimizer: torch.optim.Optimizer,
                 windows: Windows, schedule: LRSchedule, config: FinetuneConfig,
                 state: TrainState, stream: TextIO) -> None:
        self.model, self.optimizer, self.windows = model, optimizer, windows
        self.schedule, self.config, self.state = schedule, config, state
        self.stream = stream
        self.device = torch.device(config.device)
        self.memory = PeakMemory(self.device)

    def fit(self, interrupt: Interrupt) -> bool:
        """Train the remaining epochs; False if interrupted (state says where)."""
        state = self.state
        if state.initial_val is None and len(self.windows.val):
            state.initial_val = self._evaluate("val before training", interrupt)
            if state.initial_val is None:
                return False
        while state.epoch < self.config.epochs:
            self.memory.reset()
            lr = self.schedule.lr_at(state.epoch)
            set_lr(self.optimizer, lr)
            if not self._train_epoch(interrupt):
                return False
            val = self._evaluate(f"epoch {state.epoch + 1}/{self.config.epochs} val", interrupt)
            if val is None and len(self.windows.val):
                return False
            state.history.append(self._epoch_metrics(lr, val))
            state.epoch, state.windows_done = state.epoch + 1, 0
            state.train_stats, state.train_seconds = RunningStats(), 0.0
        return True

    # -- training ------------------------------------------------------------------------

    def _train_epoch(self, interrupt: Interrupt) -> bool:
        state, cfg = self.state, self.config
        order = epoch_order(len(self.windows.train), cfg.seed, state.epoch)
        step_windows = cfg.batch * cfg.grad_accum
        bar = EpochBar(f"epoch {state.epoch + 1}/{cfg.epochs} train", len(order), self.stream,
                       initial=state.windows_done)
        self.model.train()
        try:
            while state.windows_done < len(order):
                if interrupt.requested:
                    return False
                indices = order[state.windows_done:state.windows_done + step_windows]
                t0 = time.perf_counter()
                self.train_step(indices)
                state.train_seconds += time.perf_counter() - t0
                state.windows_done += len(indices)
                bar.update(len(indices), state.train_stats)
        finally:
            bar.close()
        return True

    def train_step(self, indices: list[int]) -> None:
        """One optimizer step over `indices` windows, in micro-batches of --batch."""
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = len(indices) * self.config.ctx
        for start in range(0, len(indices), self.config.batch):
            batch = self.windows.train[indices[start:start + self.config.batch]]
            token_loss, correct = self._token_losses(batch)  # [b, ctx]
            (token_loss.sum() / num_tokens).backward()
            window_losses = token_loss.detach().mean(dim=1).tolist()
            if not all(math.isfinite(x) for x in window_losses):
                raise InvalidRequestError(
                    "lr", f"training diverged (loss {max(window_losses)}) in epoch "
                          f"{self.state.epoch + 1} at a rate of "
                          f"{self.optimizer.param_groups[0]['lr']:.3g}; lower --lr")
            self.state.train_stats.add(window_losses, correct, token_loss.numel())
        self.optimizer.step()

    def _token_losses(self, windows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """windows: [b, ctx + 1] → per-token cross-entropy [b, ctx], correct top-1 count."""
        windows = windows.to(self.device)
        inputs, labels = windows[:, :-1], windows[:, 1:]
        logits = self.model.compute_logits(self.model.forward_dense(inputs))  # [b, ctx, V]
        correct = int((logits.detach().argmax(dim=-1) == labels).sum())
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return loss.view(labels.shape), correct

    # -- validation ----------------------------------------------------------------------

    def _evaluate(self, desc: str, interrupt: Interrupt) -> dict | None:
        """Stats over every validation window; None if there are none or on interrupt."""
        val = self.windows.val
        if not len(val):
            return None
        stats = RunningStats()
        bar = EpochBar(desc, len(val), self.stream)
        self.model.eval()
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for start in range(0, len(val), self.config.batch):
                    if interrupt.requested:
                        return None
                    token_loss, correct = self._token_losses(val[start:start + self.config.batch])
                    stats.add(token_loss.mean(dim=1).tolist(), correct, token_loss.numel())
                    bar.update(len(token_loss), stats)
        finally:
            bar.close()
        return stats.summary() | {"seconds": round(time.perf_counter() - t0, 3)}

    def _epoch_metrics(self, lr: float, val: dict | None) -> dict:
        state = self.state
        seconds = state.train_seconds
        tokens = state.train_stats.num_tokens
        train = state.train_stats.summary() | {
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds else None}
        return {"epoch": state.epoch + 1, "lr": lr, "train": train, "val": val,
                "peak_memory_bytes": self.memory.peak_bytes(), "memory_kind": self.memory.kind}
