"""kernels/argmax.argmax_rows against torch's argmax: same index for every row, ties,
infinities and NaN included."""

from __future__ import annotations

import pytest
import torch

from kernels.argmax import CHUNK, argmax_rows


@pytest.mark.parametrize("vocab", [100, 2 * CHUNK, 49152, 151936, 3 * CHUNK + 1])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_argmax_rows_equals_argmax(vocab: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(vocab * 31 + rows)
    x = torch.randn(rows, vocab, generator=gen)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    # coarse values: many ties, within a chunk and across chunks
    ties = torch.randint(0, 4, (rows, vocab), generator=gen).float()
    assert torch.equal(argmax_rows(ties), ties.argmax(-1))
    # the maximum in the last element, in the short last chunk, or first and last
    edge = torch.full((rows, vocab), float("-inf"))
    edge[0, -1] = 1.0
    edge[-1, 0] = edge[-1, -1] = 2.0
    assert torch.equal(argmax_rows(edge), edge.argmax(-1))


def test_argmax_rows_nan_and_views() -> None:
    x = torch.randn(4, 5000)
    x[1, 4000] = float("nan")
    x[2, 10] = x[2, 4999] = float("nan")
    x[3] = float("-inf")
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    wide = torch.randn(3, 2 * 5000)[:, ::2]  # not contiguous
    assert torch.equal(argmax_rows(wide), wide.argmax(-1))
