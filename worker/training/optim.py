"""The optimizers and what their state costs.

AdamW (`torch.optim.AdamW`) keeps two moment buffers per trainable parameter (exp_avg,
exp_avg_sq: 2× the trainable bytes) plus a scalar step count, and steps after backward
has produced every gradient. SGD is `torch.optim.SGD` with momentum 0, which creates no
per-parameter state at all; with one backward per step (--grad-accum 1) it also updates
each parameter inside backward, as soon as that parameter's gradient is complete, and
drops the gradient there (`SGDInBackward`), so a full set of gradients never exists at
once: its memory is the weights, the activations and one parameter's gradient. Weight
decay: AdamW decoupled (p ← p − lr·wd·p), SGD folded into the gradient
(p ← p − lr·(g + wd·p)), the same update (llama.cpp's SGD: x·(1 − lr·wd) − lr·g). Only
trainable parameters are handed to the optimizer, so a frozen one has neither gradient
nor state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from worker.vocab.errors import InvalidRequestError

OptimizerFactory = Callable[[list[torch.nn.Parameter], float, float], torch.optim.Optimizer]


def _adamw(params: list[torch.nn.Parameter], lr: float,
           weight_decay: float) -> torch.optim.Optimizer:
    # betas and eps as llama.cpp's ggml_opt defaults (and torch's)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=weight_decay)


def _sgd(params: list[torch.nn.Parameter], lr: float,
         weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)


class SGDInBackward(torch.optim.SGD):
    """`torch.optim.SGD` (momentum 0, so no state) whose update runs inside backward.

    A post-accumulate-grad hook on each parameter applies p ← p − lr·(g + wd·p) the
    moment p's gradient is final (after a tied weight's last use, too) and sets p.grad
    to None, so only one parameter's gradient is alive at a time. `step()` has nothing
    left to do. Valid only when every optimizer step is exactly one backward pass.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float,
                 weight_decay: float) -> None:
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        for p in self._group_of:
            p.register_post_accumulate_grad_hook(self._update)

    @torch.no_grad()
    def _update(self, param: torch.Tensor) -> None:
        group = self._group_of[param]
        grad = param.grad
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        param.add_(grad, alpha=-group["lr"])
        param.grad = None

    def step(self, closure=None) -> None:
        """Nothing: every parameter was updated during backward."""


OPTIMIZERS: dict[str, OptimizerFactory] = {"adamw": _adamw, "sgd": _sgd}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                   weight_decay: float, grad_accum: int = 1) -> torch.optim.Optimizer:
    """SGD steps inside backward unless gradients must accumulate over several passes."""
    if name == "sgd" and grad_accum == 1:
        return SGDInBackward(list(params), lr, weight_decay)
    return OPTIMIZERS[name](list(params), lr, weight_decay)


def select_trainable(model: torch.nn.Module, patterns: tuple[str, ...]
                     ) -> list[torch.nn.Parameter]:
    """Mark the parameters whose name matches any pattern (re.search) trainable, freeze the
    rest (no gradient is computed for them, so no optimizer state either). No patterns:
    everything trains. A pattern that matches nothing is an error, not a silent no-op."""
    named = list(model.named_parameters())
    chosen = {name for name, _ in named}
    if patterns:
        chosen = set()
        for pattern in patterns:
            matched = {name for name, _ in named if _compile(pattern).search(name)}
            if not matched:
                examples = ", ".join(name for name, _ in named[:4])
                raise InvalidRequestError("train_only", f"{pattern!r} matches no parameter; "
                                                        f"names look like {examples}")
            chosen |= matched
    for name, param in named:
        param.requires_grad_(name in chosen)
    return [param for name, param in named if name in chosen]


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidRequestError("train_only", f"{pattern!r}: {exc}") from None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (moment buffers and step counters)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


def moment_buffer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the per-element buffers: state tensors shaped like their parameter."""
    return sum(t.numel() * t.element_size() for p, state in optimizer.state.items()
               for t in state.values() if isinstance(t, torch.Tensor) and t.shape == p.shape)


def parameter_bytes(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


# -- checkpointing: flat tensors for safetensors, the rest is rebuilt from the config -----

def flat_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """{"<param index>.<key>": tensor} of the optimizer's state (empty for SGD)."""
    state = optimizer.state_dict()["state"]
    return {f"{i}.{key}": t.contiguous() for i, entry in state.items()
            for key, t in entry.items() if isinstance(t, torch.Tensor)}


def load_flat_state(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
