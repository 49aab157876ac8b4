"""The sampler's stateless filters on their own: top-p's exact cut (radix select vs sort,
ties, -inf, ±0) and the float64 nucleus on rows wider than the sort limit."""

from __future__ import annotations

import torch

from worker import sampling_filters as filters_module


def test_top_p_radix_select_equals_sort() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = (torch.randn(5, 3000, generator=generator) * 3).to(torch.bfloat16).float()  # ties
        x[0, :100] = float("-inf")
        x[1, :50] = 7.0
        x[2, :20], x[2, 20:40] = 0.0, -0.0
        top_p = torch.tensor([0.5, 0.9, 0.99, float("inf"), 0.01])
        key = filters_module._order_key(x)
        weight = (x - x.amax(-1, keepdim=True)).exp().mul(filters_module._MASS_SCALE).long()
        total = weight.sum(-1, keepdim=True)
        need = torch.where(top_p[:, None] <= 1, torch.ceil(top_p[:, None].double() * total).long(),
                           total + 1)
        by_sort = filters_module._top_mass_key_by_sort(key, weight, need)
        by_radix = filters_module._top_mass_key_by_radix(key, weight, need)
        assert torch.equal(key >= by_sort, key >= by_radix)
        assert torch.equal(filters_module._float_of_key(key).view(torch.int32),
                           x.view(torch.int32))


def test_wide_top_p_keeps_the_float64_nucleus() -> None:
    """Rows wider than the sort limit take the radix path; the cut is the float64 one."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 20_000, generator=generator) * 2.5  # [8, V], V > sort limit
    top_p = torch.rand(8, generator=generator) * 0.98 + 0.01
    kept = filters_module.apply_top_p(x, top_p).isfinite().sum(-1)
    probs = torch.sort(x.double(), descending=True).values.softmax(-1)  # [8, V]
    before = probs.cumsum(-1) - probs
    assert kept.tolist() == (before < top_p[:, None].double()).sum(-1).tolist()
