"""ModelArgs: every hyper-parameter the decoder needs, read from an HF-style config dict.

transformers 5.x writes `rope_parameters` (per layer type for Gemma 3) and `dtype`
where 4.x wrote `rope_theta`, `rope_scaling` and `torch_dtype`; both are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True, slots=True, kw_only=True)
class RopeArgs:
    theta: float
    scaling: dict | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_types: tuple[str, ...]  # FULL or SLIDING per layer
    rope: dict[str, RopeArgs]  # per layer type
    sliding_window: int | None = None
    attention_bias: bool = False  # Qwen2: bias on q, k, v
    hidden_act: str = "silu"
    # Gemma family
    norm_weight_offset: float = 0.0  # 1.0: norms scale by (1 + w)
    embed_scale: float | None = None  # multiply embeddings by this (sqrt(hidden))
    sandwich_norms: bool = False  # pre/post feed-forward norms and post-attention norm
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    # Mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 0

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar**-0.5
        return self.head_dim**-0.5

    @property
    def windows(self) -> list[int | None]:
        """Window per KV group: group 0 full attention (if any), then sliding."""
        return [None if t == FULL else self.sliding_window for t in self.group_types]

    @property
    def group_types(self) -> list[str]:
        return [t for t in (FULL, SLIDING) if t in self.layer_types]

    def layer_group(self, layer: int) -> int:
        return self.group_types.index(self.layer_types[layer])


def rope_from_config(cfg: dict, layer_types: tuple[str, ...], default_theta: float,
                     local_theta: float | None = None) -> dict[str, RopeArgs]:
    """Per-layer-type rope settings from either config generation."""
    params = cfg.get("rope_parameters") or {}
    if params and all(k in (FULL, SLIDING) for k in params):
        per_type = {t: params.get(t, {}) for t in (FULL, SLIDING)}
    else:
        legacy = dict(cfg.get("rope_scaling") or {})
        base = {**legacy, **params}
        base.setdefault("rope_theta", cfg.get("rope_theta", default_theta))
        local = {"rope_theta": cfg.get("rope_local_base_freq", local_theta or default_theta)}
        per_type = {FULL: base, SLIDING: local if local_theta is not None else base}
    out = {}
    for t in set(layer_types):
        p = dict(per_type.get(t) or {})
        fallback = default_theta if t == FULL else local_theta or default_theta
        theta = float(p.pop("rope_theta", fallback))
        kind = p.get("rope_type", p.get("type", "default"))
        out[t] = RopeArgs(theta=theta, scaling=None if kind in ("default", None) else p)
    return out
