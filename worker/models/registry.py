"""Model registry keyed by Hugging Face architecture name.

Each entry turns an HF config dict into ModelArgs; every architecture builds the same
DecoderModel. `build_model` also loads HF-named tensors into the fused layout
(q/k/v → qkv_proj, gate/up → gate_up_proj, per-expert w1/w3/w2 → stacked experts);
`hf_state_dict` is the way back (fine-tuning writes its output with it).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from kernels.packed_weight import DENSE_FORMATS
from worker.models.args import FULL, SLIDING, ModelArgs, rope_from_config
from worker.models.decoder import DecoderModel
from worker.models.packing import detach_quantized, pack_model
from worker.quantize import (
    HYBRID,
    Q8,
    WEIGHTS,
    QuantizedTensor,
    base_policy,
    check_weights,
    concat_rows,
    use_blocks,
)
from worker.vocab.errors import ModelLoadError, PreconditionError

ArgsBuilder = Callable[[dict], ModelArgs]
_REGISTRY: dict[str, ArgsBuilder] = {}


def register(*architectures: str) -> Callable[[ArgsBuilder], ArgsBuilder]:
    def wrap(fn: ArgsBuilder) -> ArgsBuilder:
        for name in architectures:
            _REGISTRY[name] = fn
        return fn

    return wrap


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_args(config: dict) -> ModelArgs:
    arch = (config.get("architectures") or ["?"])[0]
    builder = _REGISTRY.get(arch)
    if builder is None:
        raise ModelLoadError(
            f"architecture {arch!r} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    try:
        return builder(config)
    except KeyError as e:
        raise ModelLoadError(f"config.json of {arch} lacks {e}") from None


def _common(cfg: dict, arch: str, **overrides) -> dict:
    heads = cfg["num_attention_heads"]
    layers = cfg["num_hidden_layers"]
    return dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        hidden_act=cfg.get("hidden_act", "silu"),
        layer_types=(FULL,) * layers,
        rope=rope_from_config(cfg, (FULL,), 10000.0),
    ) | overrides


@register("LlamaForCausalLM")
def _llama(cfg: dict) -> ModelArgs:
    bias = cfg.get("attention_bias", False)
    return ModelArgs(**_common(cfg, "LlamaForCausalLM", attention_bias=bias))


@register("Qwen2ForCausalLM")
def _qwen2(cfg: dict) -> ModelArgs:
    # Qwen2 configs carry use_sliding_window=false by default; the window is then unused
    return ModelArgs(**_common(cfg, "Qwen2ForCausalLM", attention_bias=True))


@register("MistralForCausalLM")
def _mistral(cfg: dict) -> ModelArgs:
    window = cfg.get("sliding_window")
    layers = cfg["num_hidden_layers"]
    kind = SLIDING if window else FULL
    return ModelArgs(**_common(
        cfg, "MistralForCausalLM", sliding_window=window, layer_types=(kind,) * layers,
        rope=rope_from_config(cfg, (kind,), 10000.0),
    ))


@register("MixtralForCausalLM")
def _mixtral(cfg: dict) -> ModelArgs:
    window = cfg.get("sliding_window")
    layers = cfg["num_hidden_layers"]
    kind = SLIDING if window else FULL
    return ModelArgs(**_common(
        cfg, "MixtralForCausalLM", sliding_window=window, layer_types=(kind,) * layers,
        rope=rope_from_config(cfg, (kind,), 1e6),
        num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
    ))


@register("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
def _gemma3(cfg: dict) -> ModelArgs:
    cfg = cfg.get("text_config", cfg)
    layers = cfg["num_hidden_layers"]
    pattern = cfg.get("sliding_window_pattern", 6)
    layer_types = tuple(cfg.get("layer_types") or (
        SLIDING if (i + 1) % pattern else FULL for i in range(layers)
    ))
    return ModelArgs(**_common(
        cfg, "Gemma3ForCausalLM",
        hidden_act=cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh")),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        layer_types=layer_types,
        rope=rope_from_config(cfg, layer_types, 1e6, local_theta=10000.0),
        sliding_window=cfg.get("sliding_window", 4096),
        attention_bias=cfg.get("attention_bias", False),
        norm_weight_offset=1.0,
        embed_scale=cfg["hidden_size"] ** 0.5,
        sandwich_norms=True,
        qk_norm=True,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
    ))


# -- weights -----------------------------------------------------------------------------

_QKV = re.compile(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_GATE_UP = re.compile(r"layers\.(\d+)\.mlp\.(gate|up)_proj\.weight$")
_MOE = r"layers\.(\d+)\.(?:block_sparse_moe|mlp)"
_EXPERT = re.compile(_MOE + r"\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_ROUTER = re.compile(_MOE + r"\.gate\.weight$")
_STACKED = re.compile(_MOE + r"\.experts\.(gate_up_proj|down_proj)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _strip_prefix(name: str) -> str:
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def load_weights(model: DecoderModel, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors into the fused parameters; every parameter must be set."""
    params = dict(model.named_parameters())
    loaded: dict[str, int] = {}  # parameter -> elements written
    with torch.no_grad():
        for hf_name, tensor in tensors.items():
            name = _strip_prefix(hf_name)
            if _IGNORED.search(name):
                continue
            target, rows = _target(model, name)
            if target not in params:
                if name == "lm_head.weight" and model.lm_head is None:
                    continue  # tied: some exports still write the copy
                raise ModelLoadError(f"unexpected tensor {hf_name!r} for {model.args.architecture}")
            dst = params[target].data if rows is None else params[target].data[rows]
            if dst.shape != tensor.shape:
                raise ModelLoadError(
                    f"{hf_name}: shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded[target] = loaded.get(target, 0) + dst.numel()
    _check_complete(model, params, loaded)


def _target(model: DecoderModel, name: str) -> tuple[str, object]:
    """HF name → (our parameter name, index into it or None)."""
    args = model.args
    if m := _QKV.search(name):
        layer, which, kind = int(m[1]), m[2], m[3]
        q = args.num_heads * args.head_dim
        kv = args.num_kv_heads * args.head_dim
        start = {"q": 0, "k": q, "v": q + kv}[which]
        size = q if which == "q" else kv
        return f"layers.{layer}.self_attn.qkv_proj.{kind}", slice(start, start + size)
    if m := _GATE_UP.search(name):
        i = args.intermediate_size
        rows = slice(0, i) if m[2] == "gate" else slice(i, 2 * i)
        return f"layers.{m[1]}.mlp.gate_up_proj.weight", rows
    if m := _EXPERT.search(name):
        layer, e, w = int(m[1]), int(m[2]), m[3]
        i = args.intermediate_size
        if w == "w2":
            return f"layers.{layer}.mlp.down_proj", e
        half = slice(0, i) if w == "w1" else slice(i, 2 * i)
        return f"layers.{layer}.mlp.gate_up_proj", (e, half)
    if m := _ROUTER.search(name):
        return f"layers.{m[1]}.mlp.gate.weight", None
    if m := _STACKED.search(name):
        return f"layers.{m[1]}.mlp.{m[2]}", None
    return name, None


def _check_complete(model: DecoderModel, params: dict, loaded: dict[str, int]) -> None:
    missing = [name for name, p in params.items() if loaded.get(name, 0) != p.numel()]
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


_FUSED_QKV = re.compile(r"layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)")
_FUSED_GATE_UP = re.compile(r"layers\.(\d+)\.mlp\.gate_up_proj\.weight")
_STACKED_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.(gate_up_proj|down_proj|gate\.weight)")


def hf_state_dict(model: DecoderModel) -> dict[str, torch.Tensor]:
    """Every parameter under its Hugging Face name, unfused; `load_weights` reads it back.

    Tensors are detached copies (safetensors refuses views that share storage). A tied
    lm_head is not written, as transformers does not write it. A model with packed
    weights has no float parameters for them: refused rather than written incomplete.
    """
    if model.is_packed:
        raise PreconditionError("hf_state_dict: the model has packed (quantized) weights")
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        for hf_name, tensor in _unfuse(model.args, name, param.detach()):
            tensors[hf_name] = tensor.clone()
    return tensors


def _unfuse(args: ModelArgs, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Our parameter → [(HF name, tensor)], the inverse of `_target`."""
    if name == "lm_head.weight":
        return [(name, t)]
    if m := _FUSED_QKV.fullmatch(name):
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        parts = t.split([q, kv, kv])
        return [(f"model.layers.{m[1]}.self_attn.{w}_proj.{m[2]}", x)
                for w, x in zip("qkv", parts, strict=True)]
    if m := _FUSED_GATE_UP.fullmatch(name):
        gate, up = t.chunk(2)
        return [(f"model.layers.{m[1]}.mlp.gate_proj.weight", gate),
                (f"model.layers.{m[1]}.mlp.up_proj.weight", up)]
    if args.num_experts and (m := _STACKED_EXPERTS.fullmatch(name)):
        return _unstack_experts(args, int(m[1]), m[2], t)
    return [(f"model.{name}", t)]


def _unstack_experts(args: ModelArgs, layer: int, which: str,
                     t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Mixtral's per-expert names: w1 = gate, w3 = up ([E, 2I, D] rows), w2 = down."""
    prefix = f"model.layers.{layer}.block_sparse_moe"
    if which == "gate.weight":
        return [(f"{prefix}.gate.weight", t)]
    i = args.intermediate_size
    out = []
    for e in range(t.shape[0]):
        if which == "down_proj":
            out.append((f"{prefix}.experts.{e}.w2.weight", t[e]))
        else:
            out += [(f"{prefix}.experts.{e}.w1.weight", t[e, :i]),
                    (f"{prefix}.experts.{e}.w3.weight", t[e, i:])]
    return out


def build_model(config: dict, tensors: dict[str, torch.Tensor | QuantizedTensor],
                dtype: torch.dtype, device: torch.device,
                weights: str | None = None) -> DecoderModel:
    """The model on `device` in `dtype`, its weights packed as `weights` asks
    (worker/quantize.py; None: every weight dense in `dtype`, nothing packed)."""
    check_weights(weights)
    twins = weights == HYBRID  # bf16 copies of the block weights, added by pack_model
    weights = base_policy(weights)
    args = model_args(config)
    with torch.device("meta"):
        model = DecoderModel(args)
    quantized = {n: t for n, t in tensors.items() if isinstance(t, QuantizedTensor)}
    dense = {n: t for n, t in tensors.items() if n not in quantized}
    if weights is None:  # quantized tensors but a dense policy: back to float
        dense |= {n: t.dequantize() for n, t in quantized.items()}
        quantized = {}
    fused = _fuse_quantized(model, quantized, dense)
    detach_quantized(model, fused)
    model = model.to_empty(device="cpu").float()
    load_weights(model, dense)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    fmt = _linear_format(weights, config, dtype, bool(quantized))
    embed_fmt = _embedding_format(weights, fmt, args.tie_word_embeddings, bool(quantized),
                                  use_blocks(device))
    pack_model(model, fused, fmt, embed_fmt, device, batched_twins=twins)
    return model


def _embedding_format(weights: str | None, fmt: str | None, is_tied: bool,
                      has_quantized: bool, blocks: bool) -> str | None:
    """The embedding table's format (a tied lm_head multiplies by the same table).

    blocks (the CPU's native block op is here): int8 in blocks of 32 (Q8) under int8,
    int4, and auto with a quantized file: a GGUF Q8_0 table exactly, ~a quarter of fp32,
    and a tied head's logits come out in fp32.
    Otherwise int8 per row under int8/int4: a quarter of fp32, but the lm_head's logits
    come out of torch's kernel in bf16. Under auto a tied table stays in the model dtype:
    on SmolLM2-135M (tied, Q8_0 table) the int8 table lost 2-4 of 63 teacher-forced top-1
    tokens against the fp32 path, a bf16 table 1 (bf16 logits are 1/16 apart at |13|:
    near-ties become exact ties), the fp32 one none. An untied GGUF table is only gathered
    from, so auto keeps it in fp16 (half of fp32; rows are read and widened, 2⁻¹¹
    relative). Otherwise the dense linears' format (None: model dtype).
    """
    if weights in ("int8", "int4"):
        return Q8 if blocks else "int8"
    if weights == "auto":
        if has_quantized and blocks:
            return Q8
        return "float16" if has_quantized and not is_tied else None
    return fmt


def _linear_format(weights: str | None, config: dict, dtype: torch.dtype,
                   has_quantized: bool) -> str | None:
    """The format of the linears a loader did not quantize; None: dense in `dtype`."""
    if weights == "auto":
        # a GGUF's float tensors stay dense; an HF checkpoint keeps its own dtype
        weights = None if has_quantized else config.get("dtype", config.get("torch_dtype"))
    if weights in DENSE_FORMATS and DENSE_FORMATS[weights] == dtype:
        return None
    return weights if weights in WEIGHTS else None


def _fuse_quantized(model: DecoderModel, quantized: dict[str, QuantizedTensor],
                    dense: dict[str, torch.Tensor]) -> dict[str, QuantizedTensor]:
    """HF-named QuantizedTensors → one per fused parameter (q/k/v rows concatenated in
    `_target`'s order). A fused parameter with a piece that is not quantized, or one that
    cannot be packed (MoE experts), gets its pieces dequantized into `dense` instead."""
    pieces: dict[str, list[tuple[int, str]]] = {}
    for hf_name in quantized:
        target, rows = _target(model, _strip_prefix(hf_name))
        if target == "lm_head.weight" and model.lm_head is None:
            continue  # tied: some exports still write the copy
        start = rows.start if isinstance(rows, slice) else 0 if rows is None else -1
        pieces.setdefault(target, []).append((start, hf_name))
    fused = {}
    for target, parts in pieces.items():
        expected = _num_rows(model, target)
        rows = sum(quantized[n].shape[0] for _, n in parts)
        if min(s for s, _ in parts) < 0 or rows != expected:  # partly dense, or experts
            dense |= {n: quantized[n].dequantize() for _, n in parts}
            continue
        fused[target] = concat_rows([quantized[n] for _, n in sorted(parts)])
    return fused


def _num_rows(model: DecoderModel, target: str) -> int:
    param = model.get_parameter(target)  # on the meta device: shape only
    return param.shape[0] if param.dim() == 2 else -1
