"""The fine-tuning run's settings: one frozen dataclass, validated before any disk work."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from worker.vocab.errors import InvalidRequestError

OPTIMIZERS = ("adamw", "sgd")
MAX_VAL_SPLIT = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneConfig:
    """What `slotmesh finetune` was asked to do. Flags map one to one onto fields.

    lr_min / lr_halvings: at most one; both None keeps the rate at `lr` (llama.cpp's
        finetune with no `-lr-min`). decay_epochs: epochs over which the rate halves down
        to lr_min; None = all of them. train_only: regexes (re.search) over parameter
        names; empty = train everything.
    """

    model: str
    data: Path
    out: Path
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "slotmesh")
    optimizer: str = "adamw"
    lr: float = 1e-5
    lr_min: float | None = None
    lr_halvings: float | None = None
    decay_epochs: float | None = None
    weight_decay: float = 0.0
    epochs: int = 2
    val_split: float = 0.05
    ctx: int = 256
    batch: int = 1
    grad_accum: int = 1
    seed: int = 0
    train_only: tuple[str, ...] = ()
    device: str = "cpu"

    def validate(self) -> None:
        """InvalidRequestError naming the first bad field; touches nothing on disk."""
        if self.optimizer not in OPTIMIZERS:
            raise InvalidRequestError("optimizer", f"unknown optimizer {self.optimizer!r}; "
                                                   f"choose one of {', '.join(OPTIMIZERS)}")
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be > 0, got {self.lr}")
        self._validate_schedule()
        _check(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay",
               f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.val_split <= MAX_VAL_SPLIT, "val_split",
               f"must be in [0, {MAX_VAL_SPLIT}], got {self.val_split}")
        for name in ("epochs", "ctx", "batch", "grad_accum"):
            value = getattr(self, name)
            _check(value >= 1, name, f"must be >= 1, got {value}")
        _check_device(self.device)

    def _validate_schedule(self) -> None:
        if self.lr_min is not None and self.lr_halvings is not None:
            raise InvalidRequestError("lr_min", "give --lr-min or --lr-halvings, not both")
        if self.lr_min is not None:
            _check(0 < self.lr_min <= self.lr, "lr_min",
                   f"must be in (0, lr={self.lr}], got {self.lr_min}")
        if self.lr_halvings is not None:
            _check(0 <= self.lr_halvings < 1000, "lr_halvings",
                   f"must be in [0, 1000), got {self.lr_halvings}")
        if self.decay_epochs is not None:
            _check(self.decay_epochs > 0, "decay_epochs",
                   f"must be > 0, got {self.decay_epochs}")

    def to_json(self) -> dict:
        d = asdict(self)
        return d | {"data": str(self.data), "out": str(self.out),
                    "cache_dir": str(self.cache_dir), "train_only": list(self.train_only)}

    @classmethod
    def from_json(cls, d: dict) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        return cls(**values | {"data": Path(d["data"]), "out": Path(d["out"]),
                               "cache_dir": Path(d["cache_dir"]),
                               "train_only": tuple(d.get("train_only", ()))})


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InvalidRequestError("device", f"{device!r} is not a torch device") from None
    _check(kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()), "device",
           f"{device!r} is not available here")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(name, message)
