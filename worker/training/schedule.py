"""Learning rate by epoch: halving from `lr` down to `lr_min`, as llama.cpp's finetune.

llama.cpp (common/common.cpp, `lr_opt`): with lr_min > 0 the number of halvings is
n = log2(lr0 / lr_min), spread over E = decay_epochs (or all epochs when decay_epochs is
unset or not below them), so epoch e (0-based) trains at

    lr(e) = lr0 · 0.5^(e · n / E)   for e < E,      lr(e) = lr_min   for e >= E

and the rate stays lr0 when lr_min is unset. The rate is per epoch: llama.cpp reads it
through its optimizer-parameter callback at its integer epoch counter, and so do we.
`--lr-halvings N` gives n directly (lr_min = lr0 · 2^-N): with N = E each epoch trains at
exactly half the rate of the one before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class LRSchedule:
    lr: float
    epochs: int
    halvings: float = 0.0  # n; 0 = constant rate
    decay_epochs: float = 0.0  # E, set by `build`

    @classmethod
    def build(cls, *, lr: float, epochs: int, lr_min: float | None = None,
              halvings: float | None = None, decay_epochs: float | None = None
              ) -> LRSchedule:
        if halvings is None:
            # exact for powers of two: log2 of 4.0 is 2.0, so lr_min = lr/4 halves twice
            halvings = math.log2(lr / lr_min) if lr_min is not None and lr_min < lr else 0.0
        span = decay_epochs if decay_epochs is not None and 0 < decay_epochs < epochs \
            else float(epochs)
        return cls(lr=lr, epochs=epochs, halvings=float(halvings), decay_epochs=float(span))

    @property
    def lr_min(self) -> float:
        return self.lr * 2.0 ** -self.halvings

    def lr_at(self, epoch: int) -> float:
        """The rate epoch `epoch` (0-based) trains at."""
        if self.halvings == 0:
            return self.lr
        if epoch >= self.decay_epochs:
            return self.lr_min
        # e·n first, then / E: whole halvings come out as exact powers of two
        return self.lr * 2.0 ** -(epoch * self.halvings / self.decay_epochs)

    def rates(self) -> list[float]:
        return [self.lr_at(e) for e in range(self.epochs)]
