"""One decoder-only transformer that covers Llama, Qwen2, Mistral, Gemma 3 and Mixtral.

The differences between the families are data in ModelArgs (qkv bias, sliding layers,
norm style, QK-norm, embedding scale, MoE), not subclasses. Every forward works on the
flat token batch of one engine step: x is [T, hidden] for T new tokens of all sequences
together; attention reads and writes the paged KV cache through StepContext.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.linear import linear
from kernels.paged_attention import PagedAttentionMetadata, paged_attention, write_kv
from kernels.rms_norm import rms_norm
from kernels.rotary import apply_rotary
from worker.models.args import ModelArgs

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


@dataclass(slots=True)
class StepContext:
    """What attention needs for one step, built once by the model runner.

    cos_sin: layer type -> [T, head_dim] rotary rows at each new token's position.
    attn: per KV group metadata; kv_caches: per KV group [2, layers_in_group, num_blocks,
    block_size, kv_heads, head_dim] (0 = keys, 1 = values).
    """

    cos_sin: dict[str, torch.Tensor]
    attn: list[PagedAttentionMetadata]
    kv_caches: list[torch.Tensor]


def _project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, layer.weight, layer.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_offset: float) -> None:
        super().__init__()
        # Gemma stores w with the HF (1 + w) convention, so its neutral weight is 0
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - weight_offset))
        self.eps = eps
        self.weight_offset = weight_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.weight_offset)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = args.num_heads, args.num_kv_heads
        self.head_dim = args.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, q_size + 2 * kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(q_size, args.hidden_size, bias=False)
        self.q_norm = self.k_norm = None
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, args.norm_weight_offset)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, args.norm_weight_offset)
        self.layer_type = args.layer_types[layer]
        self.group = args.layer_group(layer)
        self.index_in_group = sum(
            1 for i in range(layer) if args.layer_types[i] == self.layer_type
        )
        self.scale = args.attn_scale

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        num_tokens, h, kvh = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = _project(self.qkv_proj, x).view(num_tokens, h + 2 * kvh, self.head_dim)
        q, k, v = qkv.split([h, kvh, kvh], dim=1)  # [T, H, D], [T, KVH, D], [T, KVH, D]
        cos_sin = ctx.cos_sin[self.layer_type]
        if self.q_norm is None:  # q and k are adjacent heads: one rotary pass for both
            qk = apply_rotary(qkv[:, : h + kvh], cos_sin)
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = apply_rotary(self.q_norm(q), cos_sin)
            k = apply_rotary(self.k_norm(k), cos_sin)
        cache = ctx.kv_caches[self.group]
        k_cache, v_cache = cache[0, self.index_in_group], cache[1, self.index_in_group]
        meta = ctx.attn[self.group]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return _project(self.o_proj, out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = _ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _project(self.gate_up_proj, x).chunk(2, dim=-1)
        return _project(self.down_proj, self.act(gate) * up)


class SparseMoE(nn.Module):
    """Mixtral routing: softmax over experts, top-k, renormalised weights.

    Every expert runs on every token, weighted by its routing weight (zero where not
    chosen). That costs num_experts / top_k times the routed compute, but has no
    data-dependent shapes: no host sync inside the step, and warmup exercises every
    expert. A grouped-GEMM kernel is the fast path to add for large MoE models on CUDA.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        e, d, i = args.num_experts, args.hidden_size, args.intermediate_size
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(d, e, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))  # [E, 2I, D]
        self.down_proj = nn.Parameter(torch.empty(e, d, i))  # [E, D, I]
        self.act = _ACTIVATIONS[args.hidden_act]

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] weight of each expert for each token, zero for the unchosen."""
        probs = torch.softmax(_project(self.gate, x).float(), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter_(1, top_i, top_w).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.routing_weights(x)  # [T, E]
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            gate, up = linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            y = linear(self.act(gate) * up, self.down_proj[e])
            out += weights[:, e : e + 1] * y
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        eps, off = args.rms_norm_eps, args.norm_weight_offset
        self.self_attn = Attention(args, layer)
        self.mlp = SparseMoE(args) if args.num_experts else MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps, off)
        self.sandwich = args.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps, off)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.sandwich:  # Gemma: norm before and after each block
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
            h = self.mlp(self.pre_feedforward_layernorm(x))
            return x + self.post_feedforward_layernorm(h)
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_weight_offset)
        self.lm_head = None
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids: [T] → final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        if self.args.embed_scale is not None:
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] → fp32 logits [N, vocab]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = linear(hidden, weight).float()
        cap = self.args.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
