"""Running loss/accuracy with standard errors, and the per-epoch progress bars.

The bar line is llama.cpp's finetune line (`data=N/M loss=L±e acc=A±e% t=… ETA=…`),
drawn by tqdm. On a terminal it redraws in place; into a pipe or file it prints whole
lines instead (the first step, then at most one every few seconds, then the final state),
so logs stay readable and a supervising process can wait for a line.

Standard errors as llama.cpp computes them: the loss's over the windows seen (sample
standard deviation / √n), the accuracy's binomial over the tokens seen (√(p(1−p)/(N−1))).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TextIO

from tqdm import tqdm

_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| data={n_fmt}/{total_fmt}{postfix} " \
              "t={elapsed} ETA={remaining}"
_PIPE_INTERVAL_S = 5.0


@dataclass(slots=True)
class RunningStats:
    num_windows: int = 0
    loss_sum: float = 0.0
    loss_sq_sum: float = 0.0
    num_tokens: int = 0
    num_correct: int = 0

    def add(self, window_losses: list[float], num_correct: int, num_tokens: int) -> None:
        self.num_windows += len(window_losses)
        self.loss_sum += sum(window_losses)
        self.loss_sq_sum += sum(x * x for x in window_losses)
        self.num_correct += num_correct
        self.num_tokens += num_tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_windows if self.num_windows else math.nan

    @property
    def loss_se(self) -> float:
        n = self.num_windows
        if n < 2:
            return math.nan
        var = max(0.0, (self.loss_sq_sum - n * self.loss**2) / (n - 1))
        return math.sqrt(var / n)

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_tokens if self.num_tokens else math.nan

    @property
    def accuracy_se(self) -> float:
        p, n = self.accuracy, self.num_tokens
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan

    def postfix(self) -> str:
        return (f"loss={self.loss:.5f}±{self.loss_se:.5f} "
                f"acc={100 * self.accuracy:.2f}±{100 * self.accuracy_se:.2f}%")

    def summary(self) -> dict:
        """For metrics.json: NaN (undefined with one window) becomes null."""
        values = {"loss": self.loss, "loss_se": self.loss_se, "accuracy": self.accuracy,
                  "accuracy_se": self.accuracy_se}
        return {k: None if math.isnan(v) else round(v, 6) for k, v in values.items()} | {
            "windows": self.num_windows, "tokens": self.num_tokens}

    def to_json(self) -> dict:
        return asdict(self)


class EpochBar:
    """One bar: `desc`, windows done out of `total`, the stats as postfix."""

    def __init__(self, desc: str, total: int, stream: TextIO, initial: int = 0) -> None:
        is_tty = stream.isatty() if hasattr(stream, "isatty") else False
        self._lines = None if is_tty else _LineWriter(stream)
        self.bar = tqdm(total=total, initial=initial, desc=desc, file=self._lines or stream,
                        bar_format=_BAR_FORMAT, mininterval=0.1 if is_tty else _PIPE_INTERVAL_S,
                        dynamic_ncols=is_tty, ascii=not is_tty, leave=True)
        self._updates = 0

    def update(self, num_windows: int, stats: RunningStats) -> None:
        self.bar.set_postfix_str(stats.postfix(), refresh=False)
        self.bar.update(num_windows)
        self._updates += 1
        if self._updates == 1 and self._lines is not None:
            self.bar.refresh()  # a pipe sees the first step at once

    def close(self) -> None:
        self.bar.close()


class _LineWriter:
    """tqdm's in-place redraws ('\\r' + line) as separate lines, repeats dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = ""

    def write(self, s: str) -> None:
        line = s.strip("\r\n").rstrip()
        if line and line != self._last:
            self.stream.write(line + "\n")
            self._last = line

    def flush(self) -> None:
        self.stream.flush()
