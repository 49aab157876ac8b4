"""One decoder-only transformer that covers Llama, Qwen2, Mistral, Gemma 3 and Mixtral.

The differences between the families are data in ModelArgs (qkv bias, sliding layers,
norm style, QK-norm, embedding scale, MoE), not subclasses. Every forward works on a
flat token batch: x is [T, hidden]. What attention does with its q, k, v is the
context's business: StepContext (serving, one engine step: T new tokens of all
sequences together) reads and writes the paged KV cache; DenseContext (training,
`forward_dense`: T = B × L tokens of B whole sequences) runs causal attention over each
sequence with no cache, so autograd sees one plain graph through the same layers.

Weights: every linear multiplies by its float `weight` parameter, unless the model
registry packed it (`module.packed`, a kernels.packed_weight.PackedWeight: int8, int4 or
a dense dtype other than the model's, float16 in FBGEMM's layout on x86 CPUs; `weight` is
then None). A packed embedding table is int8 per row or in blocks of 32 (a gather
dequantizes the rows it reads) or dense in another dtype (fp16 for an untied GGUF table
under auto without the CPU's block op); a tied
lm_head multiplies by that same packed table, or by its own copy (`packed_head`) where
the table's layout cannot be multiplied fast. Packed models serve only: `forward_dense`
refuses them.

MoE (SparseMoE): each expert runs on the tokens routed to it, grouped by expert; under
torch.compile every expert runs on every token (static shapes). `set_warmup` switches
the warmup mode on which every token goes to every expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kernels.block_linear import BLOCKS_LAYOUT, dequantize_blocks
from kernels.causal_attention import causal_attention
from kernels.gated_act import gated_act
from kernels.linear import linear
from kernels.packed_linear import packed_linear
from kernels.paged_attention import PagedAttentionMetadata, paged_attention, write_kv
from kernels.rms_norm import add_rms_norm, rms_norm
from kernels.rotary import apply_rotary, rope_cache
from worker.models.args import SLIDING, ModelArgs
from worker.vocab.errors import PreconditionError


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

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): a residual add fused with this norm."""
        return add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset)


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
        self.act = args.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _project(self.down_proj, gated_act(_project(self.gate_up_proj, x), self.act))


def sparse_moe_reference(x: torch.Tensor, weights: torch.Tensor,
                         run_expert: Callable[[int, torch.Tensor], torch.Tensor]
                         ) -> torch.Tensor:
    """Every expert on every token, weighted by its routing weight (zero where not chosen).

    x: [T, D]; weights: fp32 [T, E]; run_expert(e, rows [n, D]) → [n, D]. Static shapes
    and no host sync, at num_experts / top_k times the routed compute.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(weights.shape[1]):
        out += weights[:, e : e + 1] * run_expert(e, x)
    return out.to(x.dtype)


@dataclass(slots=True)
class ExpertGroups:
    """The step's (token, expert) pairs sorted by expert: each expert's rows are one slice.

    token_ids: [T × k] the token of each pair; weights: fp32 [T × k, 1] its routing
    weight; counts: per expert how many pairs it got, on the host (Python ints).
    """

    token_ids: torch.Tensor
    weights: torch.Tensor
    counts: list[int]

    @classmethod
    def build(cls, top_w: torch.Tensor, top_i: torch.Tensor, num_experts: int
              ) -> ExpertGroups:
        """top_w: fp32 [T, k] weights of top_i: [T, k] expert ids."""
        expert_ids = top_i.flatten()  # [T × k]; pair p is token p // k
        order = expert_ids.argsort(stable=True)  # stable: a group keeps token order
        # The group sizes decide the slices, so they are read on the host: one sync per
        # MoE layer, free on the CPU. A CUDA grouped-GEMM kernel would take them on device.
        counts = torch.bincount(expert_ids, minlength=num_experts).tolist()
        return cls(order // top_i.shape[1], top_w.flatten()[order, None], counts)

    def slices(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(expert, token ids [n], weights [n, 1]) of each expert with n > 0 pairs."""
        start = 0
        for e, n in enumerate(self.counts):
            if n:
                yield e, self.token_ids[start : start + n], self.weights[start : start + n]
            start += n


class SparseMoE(nn.Module):
    """Mixtral routing: softmax over experts, top-k, renormalised weights.

    Eager, the (token, expert) pairs are grouped by expert (ExpertGroups) and each expert
    runs only on its own tokens; its outputs are added back into their tokens' rows,
    scaled by the routing weight. Experts no token chose are skipped. These are the sums
    transformers' Mixtral does, in the same order.

    Compiled (`torch.compile` of the static decode step), the group sizes would be
    data-dependent shapes (a graph break or a recompile per routing), so the layer runs
    `sparse_moe_reference` instead: every expert on every token, weighted, static shapes.
    A fixed-capacity dispatch is no cheaper: without dropping tokens (Mixtral drops none)
    an expert's capacity is T, so it computes what the dense formula does, plus the
    gathers. The price, measured on one layer (8 experts, top-2, fp32, 1 thread): the
    compiled all-experts layer takes 1.5-1.9x the eager sparse one at 2-16 tokens
    (docs/benchmarks.md, "Sparse MoE"). Sparse inside the graph needs an op the compiler
    does not trace (a grouped-GEMM kernel, or a custom op holding the host-side
    grouping); CUDA graphs, where the compiled step is headed, capture no host sync.

    Warmup mode (`DecoderModel.set_warmup`, after llama.cpp's `llama_set_warmup`) routes
    every token to every expert, so the startup warmup touches every expert's weights
    and runs every expert at each step shape.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        e, d, i = args.num_experts, args.hidden_size, args.intermediate_size
        self.num_experts = e
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(d, e, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))  # [E, 2I, D]
        self.down_proj = nn.Parameter(torch.empty(e, d, i))  # [E, D, I]
        self.act = args.hidden_act
        # per expert (gate_up, down) PackedWeights when the registry packed them
        self.packed_experts: list[tuple] | None = None
        self.is_warmup = False

    def route(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] → fp32 weights [T, k] (summing to 1) of the top-k expert ids [T, k]."""
        probs = torch.softmax(_project(self.gate, x).float(), dim=-1)  # [T, E]
        top_w, top_i = probs.topk(k, dim=-1)
        return top_w / top_w.sum(dim=-1, keepdim=True), top_i

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 [T, E] weight of each expert for each token, zero for the unchosen."""
        top_w, top_i = self.route(x, self.top_k)
        return torch.zeros(x.shape[0], self.num_experts, device=x.device).scatter_(
            1, top_i, top_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # static shapes: see the class docstring
            # reads no warmup flag: the graph compiled at warmup is the one that serves
            return sparse_moe_reference(x, self.routing_weights(x), self.run_expert)
        k = self.num_experts if self.is_warmup else self.top_k
        groups = ExpertGroups.build(*self.route(x, k), self.num_experts)
        out = torch.zeros_like(x)  # [T, D]
        for e, token_ids, weights in groups.slices():
            y = self.run_expert(e, x[token_ids])  # [n, D]
            # what index_add_ does, but index_add_ opens a parallel region per call on the
            # CPU: with 2 threads on a busy 2-core machine a layer at T=1 took 84 ms with
            # it, 3.4 ms with the accumulating index_put_, which runs serially
            out.index_put_((token_ids,), (y * weights).to(x.dtype), accumulate=True)
        return out

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU MLP: x [n, D] → [n, D]."""
        return self._expert_linear(e, 1, gated_act(self._expert_linear(e, 0, x), self.act))

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

    def forward(self, x: torch.Tensor, ctx: StepContext | DenseContext,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden state coming in is residual + x (x alone at the first layer, residual
        None); the one going out is the returned (block output, residual) pair summed. So
        every residual add is fused with the norm after it (`add_and_norm`), this layer's
        last add with the next layer's first norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        out = self.self_attn(h, ctx)
        if self.sandwich:  # Gemma: norm before and after each block
            h, residual = self.pre_feedforward_layernorm.add_and_norm(
                self.post_attention_layernorm(out), residual)
            return self.post_feedforward_layernorm(self.mlp(h)), residual
        h, residual = self.post_attention_layernorm.add_and_norm(out, residual)
        return self.mlp(h), residual


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
        residual = None
        for layer in self.layers:
            x, residual = layer(x, ctx, residual)
        return self.norm.add_and_norm(x, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] → [T, hidden] in the model dtype."""
        packed = getattr(self.embed_tokens, "packed", None)
        if packed is None:
            return self.embed_tokens(input_ids)
        dtype = self.norm.weight.dtype
        if packed.layout == BLOCKS_LAYOUT:  # int8 blocks of 32: widen the rows read
            return dequantize_blocks(packed.data[input_ids], packed.format,
                                     packed.in_features).to(dtype)
        if packed.format != "int8":  # a dense table in another dtype (bf16, fp16)
            return packed.data[input_ids].to(dtype)
        # int8 rows [T, hidden] × their scales [T, 1]: only the T rows read are dequantized
        return packed.data[input_ids].to(dtype) * packed.scales[input_ids, None].to(dtype)

    def set_warmup(self, is_warmup: bool) -> None:
        """Warmup mode (llama.cpp's `llama_set_warmup`): while on, every MoE layer routes
        every token to every expert, so a warmup step touches all their weights. Its
        outputs are meant to be thrown away: the routing is not the model's."""
        for m in self.modules():
            if isinstance(m, SparseMoE):
                m.is_warmup = is_warmup

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
        packed = getattr(head, "packed_head", None) or getattr(head, "packed", None)
        if packed is not None:  # a packed lm_head, or the tied table (or its head copy)
            logits = packed_linear(hidden, packed).float()
        else:
            logits = linear(hidden, head.weight).float()
        cap = self.args.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
