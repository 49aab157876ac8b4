"""One decoder-only transformer that covers Llama, Qwen2, Mistral, Gemma 3 and Mixtral.

The differences between the families are data in ModelArgs (qkv bias, sliding layers,
norm style, QK-norm, embedding scale, MoE), not subclasses. Every forward works on a
flat token batch: x is [T, hidden]. What attention does with its q, k, v is the
context's business: StepContext (serving, one engine step: T new tokens of all
sequences together) reads and writes the paged KV cache; DenseContext (training,
`forward_dense`: T = B × L tokens of B whole sequences) runs causal attention over each
sequence with no cache, so autograd sees one plain graph through the same layers.

Weights: every linear multiplies by its float `weight` parameter, unless the model
registry packed it (`module.packed`, a kernels.packed_weight.PackedWeight: int8, int4,
fp16 or a dense dtype other than the model's; `weight` is then None). A packed embedding
table is int8 per row (a gather dequantizes the rows it reads) or dense in another dtype
(fp16 for an untied GGUF table under auto); a tied lm_head multiplies by that same
packed table. Packed models serve only: `forward_dense` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.causal_attention import causal_attention
from kernels.linear import linear
from kernels.packed_linear import packed_linear
from kernels.paged_attention import PagedAttentionMetadata, paged_attention, write_kv
from kernels.rms_norm import rms_norm
from kernels.rotary import apply_rotary, rope_cache
from worker.models.args import SLIDING, ModelArgs
from worker.vocab.errors import PreconditionError

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

    def attend(self, layer: Attention, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Write the step's k, v into the layer's cache, attend over each sequence's blocks.

        q: [T, H, D]; k, v: [T, KVH, D] → [T, H, D].
        """
        cache = self.kv_caches[layer.group]
        k_cache, v_cache = cache[0, layer.index_in_group], cache[1, layer.index_in_group]
        meta = self.attn[layer.group]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, meta, layer.scale)


@dataclass(slots=True)
class DenseContext:
    """Training: B whole sequences of L tokens each, flattened to T = B × L, no cache.

    cos_sin: layer type -> [B × L, head_dim] rotary rows (positions 0..L-1 per sequence).
    windows: layer type -> sliding window, None for full attention.
    """

    batch: int
    seq_len: int
    cos_sin: dict[str, torch.Tensor]
    windows: dict[str, int | None]

    @classmethod
    def build(cls, args: ModelArgs, batch: int, seq_len: int,
              device: torch.device) -> DenseContext:
        cos_sin = {
            t: rope_cache(args.head_dim, seq_len, r.theta, r.scaling, device).repeat(batch, 1)
            for t, r in args.rope.items()
        }
        windows = {t: args.sliding_window if t == SLIDING else None for t in args.rope}
        return cls(batch, seq_len, cos_sin, windows)

    def attend(self, layer: Attention, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] → [T, H, D], causal within each sequence."""
        b, n = self.batch, self.seq_len
        out = causal_attention(q.view(b, n, *q.shape[1:]), k.view(b, n, *k.shape[1:]),
                               v.view(b, n, *v.shape[1:]), layer.scale,
                               self.windows[layer.layer_type])  # [B, L, H, D]
        return out.reshape(q.shape)


def _project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: [T, K] → [T, N] through the layer's packed weight if it has one."""
    packed = getattr(layer, "packed", None)
    if packed is not None:
        return packed_linear(x, packed)
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

    def forward(self, x: torch.Tensor, ctx: StepContext | DenseContext) -> torch.Tensor:
        q, k, v = self.project_qkv(x, ctx.cos_sin[self.layer_type])
        out = ctx.attend(self, q, k, v)  # [T, H, D]
        return _project(self.o_proj, out.reshape(x.shape[0], -1))

    def project_qkv(self, x: torch.Tensor, cos_sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, hidden] → rotated q [T, H, D], rotated k [T, KVH, D], v [T, KVH, D]."""
        num_tokens, h, kvh = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = _project(self.qkv_proj, x).view(num_tokens, h + 2 * kvh, self.head_dim)
        q, k, v = qkv.split([h, kvh, kvh], dim=1)
        if self.q_norm is None:  # q and k are adjacent heads: one rotary pass for both
            qk = apply_rotary(qkv[:, : h + kvh], cos_sin)
            return qk[:, :h], qk[:, h:], v
        return apply_rotary(self.q_norm(q), cos_sin), apply_rotary(self.k_norm(k), cos_sin), v


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
        # per expert (gate_up, down) PackedWeights when the registry packed them
        self.packed_experts: list[tuple] | None = None

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] weight of each expert for each token, zero for the unchosen."""
        probs = torch.softmax(_project(self.gate, x).float(), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter_(1, top_i, top_w).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.routing_weights(x)  # [T, E]
        out = torch.zeros_like(x)
        for e in range(weights.shape[1]):
            gate, up = self._expert_linear(e, 0, x).chunk(2, dim=-1)
            y = self._expert_linear(e, 1, self.act(gate) * up)
            out += weights[:, e : e + 1] * y
        return out

    def _expert_linear(self, e: int, which: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's gate_up (which=0) or down (1) projection of x."""
        if self.packed_experts is not None:
            return packed_linear(x, self.packed_experts[e][which])
        return linear(x, (self.gate_up_proj, self.down_proj)[which][e])


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

    def forward(self, x: torch.Tensor, ctx: StepContext | DenseContext) -> torch.Tensor:
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

    def forward(self, input_ids: torch.Tensor, ctx: StepContext | DenseContext
                ) -> torch.Tensor:
        """input_ids: [T] → final hidden states [T, hidden]."""
        x = self.embed(input_ids)
        if self.args.embed_scale is not None:
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] → [T, hidden] in the model dtype."""
        packed = getattr(self.embed_tokens, "packed", None)
        if packed is None:
            return self.embed_tokens(input_ids)
        dtype = self.norm.weight.dtype
        if packed.format != "int8":  # a dense table in another dtype (bf16, fp16)
            return packed.data[input_ids].to(dtype)
        # int8 rows [T, hidden] × their scales [T, 1]: only the T rows read are dequantized
        return packed.data[input_ids].to(dtype) * packed.scales[input_ids, None].to(dtype)

    @property
    def is_packed(self) -> bool:
        """Whether any weight was packed (quantized or recast) by the registry."""
        return any(getattr(m, "packed", None) is not None or
                   getattr(m, "packed_experts", None) is not None for m in self.modules())

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Training forward. input_ids: [B, L] whole sequences from position 0 → final
        hidden states [B, L, hidden]. Full causal attention (sliding window honoured), no
        KV cache, differentiable; the layers and weights are the serving ones."""
        if self.is_packed:
            raise PreconditionError("fine-tuning needs dense float weights; this model was "
                                    "built with packed (quantized) weights: load it with "
                                    "weights=None or a float format")
        batch, seq_len = input_ids.shape
        ctx = DenseContext.build(self.args, batch, seq_len, input_ids.device)
        return self(input_ids.reshape(-1), ctx).view(batch, seq_len, -1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., hidden] → fp32 logits [..., vocab]."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        packed = getattr(head, "packed", None)
        if packed is not None:  # int8/int4/fp16 lm_head, or the tied int8 embedding table
            logits = packed_linear(hidden, packed).float()
        else:
            logits = linear(hidden, head.weight).float()
        cap = self.args.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
