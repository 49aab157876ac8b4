"""Text file → token windows: tokenize, cut into windows of ctx + 1 tokens, split, shuffle.

The whole file is tokenized once with the model's tokenizer (BOS where the model asks
for it, as llama.cpp's finetune does). Window i holds tokens [i·ctx, (i+1)·ctx]: the
first ctx are the input, the last ctx the next-token labels, so consecutive windows
share one token (a label of one, the first input of the next) and nothing else. The
windows are shuffled by the seed, the first ⌈val_split · N⌉ (at most N − 1) held out for
validation; each epoch visits the training windows in an order drawn from (seed, epoch),
so an interrupted run resumes with the same order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.tokenizer import Tokenizer
from worker.vocab.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class Windows:
    train: torch.Tensor  # [num_train, ctx + 1] int64
    val: torch.Tensor  # [num_val, ctx + 1] int64
    num_tokens: int  # tokens in the whole file


def read_text(path: Path) -> str:
    """The file as text; InvalidRequestError if missing, unreadable, not UTF-8 or empty."""
    if not path.exists():
        raise InvalidRequestError("data", f"{path}: no such file")
    if not path.is_file():
        raise InvalidRequestError("data", f"{path}: not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError("data", f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError("data", f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise InvalidRequestError("data", f"{path}: the file is empty")
    return text


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenize_windows(text: str, tokenizer: Tokenizer, ctx: int, val_split: float,
                     seed: int) -> Windows:
    return make_windows(tokenizer.encode(text), ctx, val_split, seed)


def make_windows(ids: list[int], ctx: int, val_split: float, seed: int) -> Windows:
    count = (len(ids) - 1) // ctx
    if count < 1:
        raise InvalidRequestError(
            "data", f"{len(ids)} tokens; one window of --ctx {ctx} needs {ctx + 1}")
    tokens = torch.tensor(ids[: count * ctx + 1], dtype=torch.long)
    windows = tokens.unfold(0, ctx + 1, ctx)  # [count, ctx + 1], overlapping by one token
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    num_val = num_val_windows(count, val_split)
    # indexing with a tensor copies: the windows stop sharing storage with `tokens`
    return Windows(train=windows[order[num_val:]], val=windows[order[:num_val]],
                   num_tokens=len(ids))


def num_val_windows(count: int, val_split: float) -> int:
    """⌈val_split · count⌉, leaving at least one window to train on."""
    if val_split <= 0:
        return 0
    return min(count - 1, math.ceil(val_split * count - 1e-9))


def epoch_order(num_windows: int, seed: int, epoch: int) -> list[int]:
    """The training windows' order in `epoch`: fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=generator).tolist()
