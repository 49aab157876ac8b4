"""One MoE layer, sparse (each expert on its own tokens) against every expert on every token.

    .venv/bin/python -m scripts.moe_timing                    # fp32, 2 threads
    .venv/bin/python -m scripts.moe_timing --weights int8 --tokens 1 16 128
    .venv/bin/python -m scripts.moe_timing --compiled         # + torch.compile, small T

A random SparseMoE (8 experts, top-2, hidden 512, intermediate 1408 unless told) on random
hidden states. Per token count: median milliseconds per forward of the eager sparse path,
of `sparse_moe_reference` (every expert on every token: what the compiled path computes)
and, with `--compiled`, of the layer under torch.compile (that formula, compiled), each
with its time over the sparse path's. The variants take turns, so the load of a shared
machine falls on all of them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from worker.models.args import FULL, ModelArgs, RopeArgs
from worker.models.decoder import SparseMoE, sparse_moe_reference
from worker.models.packing import _pack_experts


def build_moe(hidden: int, intermediate: int, num_experts: int, top_k: int,
              weights: str | None) -> SparseMoE:
    args = ModelArgs(architecture="MixtralForCausalLM", vocab_size=1, hidden_size=hidden,
                     intermediate_size=intermediate, num_layers=1, num_heads=1,
                     num_kv_heads=1, head_dim=hidden, rms_norm_eps=1e-5,
                     max_position_embeddings=1, tie_word_embeddings=False,
                     layer_types=(FULL,), rope={FULL: RopeArgs(theta=1e4)},
                     num_experts=num_experts, num_experts_per_tok=top_k)
    moe = SparseMoE(args).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    if weights is not None:
        _pack_experts(moe, weights, torch.device("cpu"))
    return moe


def time_round_robin(variants: dict, x: torch.Tensor, repeat: int) -> dict[str, list[float]]:
    """Milliseconds of each forward, the variants interleaved so that the machine's load
    falls on all of them alike."""
    for fn in variants.values():
        fn(x)  # first call: page in the weights (or compile)
    times = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--weights", choices=["int8", "int4"], default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--compiled", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe = build_moe(args.hidden, args.intermediate, args.experts, args.top_k, args.weights)
    variants = {
        "sparse": moe,
        "all_experts": lambda x: sparse_moe_reference(x, moe.routing_weights(x),
                                                      moe.run_expert),
    }
    if args.compiled:
        variants["compiled_all_experts"] = torch.compile(moe, dynamic=False)
    others = [name for name in variants if name != "sparse"]
    print(f"E={args.experts} top-{args.top_k} D={args.hidden} I={args.intermediate} "
          f"weights={args.weights or 'float32'} threads={args.threads}: median ms per "
          f"forward; x sparse: the median of the rounds' time ratios")
    print(f"{'tokens':>6} {'experts hit':>11} " + " ".join(f"{v:>20}" for v in variants))
    with torch.inference_mode():
        for num_tokens in args.tokens:
            x = torch.randn(num_tokens, args.hidden)
            hit = int((moe.routing_weights(x) > 0).any(dim=0).sum())
            times = time_round_robin(variants, x, args.repeat)
            cells = [f"{statistics.median(times['sparse']):>20.2f}"]
            for name in others:
                ratio = statistics.median(
                    t / s for t, s in zip(times[name], times["sparse"], strict=True))
                cells.append(f"{statistics.median(times[name]):>11.2f} ({ratio:4.1f}x)")
            print(f"{num_tokens:>6} {hit:>11} " + " ".join(f"{c:>20}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
