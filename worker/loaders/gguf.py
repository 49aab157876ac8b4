"""GGUF files -> `ModelFiles`: HF config dict, HF-named float32 tensors, tokenizer.

Owns the GGUF header parsing, the GGUF -> Hugging Face tensor renaming and the undoing of
llama.cpp's conversion transforms (the same ones transformers' GGUF loader undoes):
  - llama: Q/K rows were permuted for llama.cpp's interleaved rope -> permuted back;
  - gemma3: every RMSNorm weight was stored as w + 1 -> 1 is subtracted, so HF's
    `x * (1 + w)` applies.
Weights are dequantised with `gguf.quants.dequantize` (every type the gguf package knows),
or, under a quantized `weights` policy, repacked into int4/int8 (`gguf_repack.py`).

The header is parsed here, not by `gguf.GGUFReader`: the reader turns every element of
the 150k-260k-entry tokenizer arrays into numpy views and takes 5-20 s on these models;
this parser takes well under a second. Tensor data is still memory-mapped and handed to
the gguf package's `dequantize` as the reader would.

`ModelFiles.fingerprint` is the SHA-256 of the whole file (hex), read from the hub's
size+mtime-keyed sidecar when present, so it is the same hash the hub verified.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from worker.loaders.gguf_repack import FOUR_BIT, auto_format, map_rows, repack
from worker.loaders.gguf_tokenizer import build_gguf_tokenizer, eos_token_ids
from worker.loaders.hub import file_sha256
from worker.loaders.model_files import ModelFiles
from worker.quantize import Q8, QuantizedTensor, base_policy
from worker.vocab.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"

# GGUF value type id -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                   10: "Q", 11: "q", 12: "d"}
_NUMPY_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32,
                5: np.int32, 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64,
                12: np.float64}
_STRING, _ARRAY = 8, 9
# Unquantised GGML types whose data are read with a plain numpy dtype.
_PLAIN_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header entry. `shape` is numpy/HF order (GGUF stores it reversed)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # absolute file offset of the data
    num_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    metadata: dict
    tensors: list[TensorInfo]
    file_size: int


# ---------------------------------------------------------------- header parsing


class _Cursor:
    """Little-endian reads from a buffer; raises ModelLoadError past the end."""

    def __init__(self, buf: bytes | mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ModelLoadError("GGUF header is truncated")
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("Q")
        if self.pos + length > len(self.buf):
            raise ModelLoadError("GGUF header is truncated (string)")
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        raise ModelLoadError(f"GGUF metadata has unknown value type {vtype}")

    def array(self) -> list:
        item_type, count = self.unpack("IQ")
        if item_type in _NUMPY_TYPES:
            dtype = np.dtype(_NUMPY_TYPES[item_type]).newbyteorder("<")
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise ModelLoadError("GGUF header is truncated (array)")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos = end
            return values.tolist()
        return [self.value(item_type) for _ in range(count)]


def read_gguf_header(path: Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF v2/v3 file; ModelLoadError if it is not one."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(_Cursor(buf), len(buf))
    except (OSError, ValueError, OverflowError, MemoryError) as exc:
        raise ModelLoadError(f"{path}: cannot read as GGUF: {exc}") from exc


def _parse_header(cur: _Cursor, file_size: int) -> GGUFHeader:
    if file_size < 24 or cur.buf[:4] != GGUF_MAGIC:
        raise ModelLoadError("not a GGUF file (bad magic)")
    cur.pos = 4
    version, num_tensors, num_kv = cur.unpack("IQQ")
    if version not in (2, 3):
        raise ModelLoadError(f"unsupported GGUF version {version}")
    metadata = {}
    for _ in range(num_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("I"))
    raw_infos = [_read_tensor_info(cur) for _ in range(num_tensors)]
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [_tensor_info(name, dims, qtype, data_start + rel, file_size)
               for name, dims, qtype, rel in raw_infos]
    return GGUFHeader(metadata=metadata, tensors=tensors, file_size=file_size)


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string()
    num_dims = cur.unpack("I")
    if num_dims > 8:
        raise ModelLoadError(f"tensor {name!r} has {num_dims} dims")
    dims = tuple(cur.unpack("Q") for _ in range(num_dims))
    qtype, rel_offset = cur.unpack("IQ")
    return name, dims, qtype, rel_offset


def _tensor_info(name: str, dims: tuple[int, ...], qtype_id: int, offset: int,
                 file_size: int) -> TensorInfo:
    try:
        qtype = GGMLQuantizationType(qtype_id)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"tensor {name!r} has unknown GGML type {qtype_id}") from exc
    shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dim first
    num_elements = math.prod(shape)
    if shape and shape[-1] % block_size:
        raise ModelLoadError(f"tensor {name!r}: row of {shape[-1]} not a multiple of "
                             f"{qtype.name} block size {block_size}")
    num_bytes = num_elements // block_size * type_size
    if offset + num_bytes > file_size:
        raise ModelLoadError(f"GGUF file is truncated: tensor {name!r} ends at byte "
                             f"{offset + num_bytes}, file has {file_size}")
    return TensorInfo(name, shape, qtype, offset, num_bytes)


# ---------------------------------------------------------------- tensor data


def dequantize_tensor(data: np.memmap, info: TensorInfo) -> np.ndarray:
    """float32 array of `info.shape` from the memory-mapped file bytes."""
    raw = data[info.offset:info.offset + info.num_bytes]
    plain = _PLAIN_DTYPES.get(info.qtype)
    if plain is not None:
        return raw.view(plain).reshape(info.shape).astype(np.float32)
    block_size, type_size = GGML_QUANT_SIZES[info.qtype]
    rows = raw.reshape(*info.shape[:-1], info.shape[-1] // block_size * type_size)
    try:
        return np.asarray(dequantize(rows, info.qtype), dtype=np.float32)
    except NotImplementedError as exc:
        raise ModelLoadError(f"tensor {info.name!r}: {info.qtype.name} is not supported "
                             "by the gguf package's dequantize") from exc


# ---------------------------------------------------------------- architectures

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_LAYER_NAMES = _LAYER_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Tensors llama.cpp stores that HF models derive from the config instead.
_SKIPPED_TENSORS = {"rope_freqs.weight"}

Transform = Callable[[str, np.ndarray, dict], np.ndarray]


@dataclass(frozen=True, slots=True)
class ArchSpec:
    """How one GGUF `general.architecture` maps onto a Hugging Face model."""

    hf_architecture: str
    model_type: str
    layer_names: dict[str, str]  # GGUF `blk.N.<x>` -> HF `model.layers.N.<y>`
    transform: Transform  # (gguf_name, array, config) -> array in HF layout
    extra_config: Callable[[dict, dict], dict]  # (metadata, base config) -> extra keys


def _unpermute_rope(gguf_name: str, array: np.ndarray, config: dict) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute of Q/K rows (weights and biases)."""
    if ".attn_q." in gguf_name:
        num_heads = config["num_attention_heads"]
    elif ".attn_k." in gguf_name:
        num_heads = config["num_key_value_heads"]
    else:
        return array
    # [num_heads, 2, half, ...] in GGUF <- [num_heads, half, 2, ...]: swap back.
    half = array.shape[0] // num_heads // 2
    grouped = array.reshape(num_heads, half, 2, *array.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(array.shape))


def _unshift_norms(gguf_name: str, array: np.ndarray, config: dict) -> np.ndarray:
    """Gemma RMSNorm weights are stored as w + 1; HF computes x * (1 + w)."""
    return array - 1.0 if gguf_name.endswith("norm.weight") else array


def _identity(gguf_name: str, array: np.ndarray, config: dict) -> np.ndarray:
    return array


def _llama_extra(md: dict, config: dict) -> dict:
    window = md.get("llama.attention.sliding_window")
    has_bias = bool(config.pop("_has_qkv_bias"))
    extra = {"hidden_act": "silu", "attention_bias": has_bias, "mlp_bias": False}
    if window is not None or "mistral" in str(md.get("general.name", "")).lower():
        extra |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                  "sliding_window": window}
    return extra


def _qwen2_extra(md: dict, config: dict) -> dict:
    config.pop("_has_qkv_bias")
    return {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": config["num_hidden_layers"]}


def _gemma3_extra(md: dict, config: dict) -> dict:
    """Gemma3 values llama.cpp hard-codes (llama-model.cpp, LLM_ARCH_GEMMA3)."""
    config.pop("_has_qkv_bias")
    pattern = 6
    num_layers = config["num_hidden_layers"]
    # 1/sqrt(head_dim) except the 27B (62 layers): 1/sqrt(hidden / heads).
    scalar = (config["hidden_size"] // config["num_attention_heads"] if num_layers == 62
              else config["head_dim"])
    local = {"rope_type": "default", "rope_theta": 10000.0}
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": md.get("gemma3.attention.sliding_window", 512),
        "sliding_window_pattern": pattern,
        "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention"
                        for i in range(num_layers)],
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "rope_parameters": {"full_attention": config["rope_parameters"],
                            "sliding_attention": local},
    }


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("LlamaForCausalLM", "llama", _LAYER_NAMES, _unpermute_rope,
                      _llama_extra),
    "qwen2": ArchSpec("Qwen2ForCausalLM", "qwen2", _LAYER_NAMES, _identity, _qwen2_extra),
    "gemma3": ArchSpec("Gemma3ForCausalLM", "gemma3_text", _GEMMA3_LAYER_NAMES,
                       _unshift_norms, _gemma3_extra),
}


# ---------------------------------------------------------------- config


def _f32(value: float) -> float:
    """A float32 metadata value as the short decimal it came from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _scalar(value):
    """Per-layer arrays (some GGUFs store head counts per layer) -> their maximum."""
    return max(value) if isinstance(value, list) else value


def _rope_parameters(md: dict, arch: str) -> tuple[dict, dict | None]:
    theta = _f32(md.get(f"{arch}.rope.freq_base", 10000.0))
    params = {"rope_type": "default", "rope_theta": theta}
    kind = md.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return params, None
    scaling = {"rope_type": kind, "factor": _f32(md.get(f"{arch}.rope.scaling.factor", 1.0))}
    original = md.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return params | scaling, scaling


def build_config(header: GGUFHeader, arch: str, spec: ArchSpec) -> dict:
    """An HF config.json-style dict from GGUF metadata (keys as transformers 4.x and 5.x)."""
    md = header.metadata
    try:
        config = _base_config(md, arch, header)
    except KeyError as exc:
        raise ModelLoadError(f"GGUF metadata lacks {exc.args[0]!r}") from exc
    config |= spec.extra_config(md, config)
    return config


def _base_config(md: dict, arch: str, header: GGUFHeader) -> dict:
    names = {t.name for t in header.tensors}
    hidden = int(md[f"{arch}.embedding_length"])
    num_heads = int(_scalar(md[f"{arch}.attention.head_count"]))
    head_dim = (md.get(f"{arch}.attention.key_length")
                or md.get(f"{arch}.rope.dimension_count") or hidden // num_heads)
    rope_parameters, rope_scaling = _rope_parameters(md, arch)
    vocab_size = md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens", ()))
    return {
        "architectures": [ARCHITECTURES[arch].hf_architecture],
        "model_type": ARCHITECTURES[arch].model_type,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(md[f"{arch}.feed_forward_length"])),
        "num_hidden_layers": int(md[f"{arch}.block_count"]),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_scalar(md.get(f"{arch}.attention.head_count_kv",
                                                  num_heads))),
        "head_dim": int(head_dim),
        "rms_norm_eps": _f32(md[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": rope_parameters["rope_theta"],
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": int(md.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "dtype": "float32",
        "_has_qkv_bias": any(n.endswith("attn_q.bias") for n in names),
    }


# ---------------------------------------------------------------- loading


def hf_tensor_name(gguf_name: str, spec: ArchSpec) -> str | None:
    """HF parameter name, None for tensors HF derives itself; ModelLoadError if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _SKIPPED_TENSORS:
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        hf_inner = spec.layer_names.get(parts[2])
        if hf_inner is not None and parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{hf_inner}.{parts[3]}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no {spec.hf_architecture} "
                         "equivalent; refusing to load a model with weights dropped")


def load_tensors(path: Path, header: GGUFHeader, spec: ArchSpec, config: dict,
                 weights: str | None = None) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Every tensor renamed/transformed into HF layout: dequantised to float32, or (for
    a quantized `weights` policy, 2-D weights only) a QuantizedTensor."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for info in header.tensors:
        hf_name = hf_tensor_name(info.name, spec)
        if hf_name is None:
            continue
        fmt = _quantized_format(info, hf_name, weights)
        if fmt is not None:
            tensors[hf_name] = _load_quantized(data, info, fmt, spec, config)
            continue
        array = spec.transform(info.name, dequantize_tensor(data, info), config)
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensors


def _quantized_format(info: TensorInfo, hf_name: str, weights: str | None) -> str | None:
    """int8 / int4 / q8 for a 2-D weight under a quantized policy, None for float32.

    The embedding table stays float here (the registry decides its format: it knows the
    device, and int8 rows or blocks of 32 depend on it). Under auto a quantized lm_head
    is Q8 (Q8_0, Q5_0: exact, worker/quantize.py) or fp16: multiplied with fp32
    activations and output by the CPU's block op or fbgemm's fp16 GEMM — never by torch's
    int8/int4 kernels, whose bf16 logits (1/16 apart at |8..16|) turn near-ties into
    exact ties.
    """
    weights = base_policy(weights)
    if weights not in ("auto", "int8", "int4") or len(info.shape) != 2:
        return None
    if hf_name.endswith("embed_tokens.weight"):
        return None
    if weights == "auto":
        if auto_format(info.qtype) is None:
            return None
        if hf_name.endswith("lm_head.weight") and auto_format(info.qtype) != Q8:
            return "fp16"  # any other quantized head: fp16, fp32 logits
        return auto_format(info.qtype)
    if weights == "int4" and info.shape[1] % 32:
        return "int8"
    return weights


def _load_quantized(data: np.memmap, info: TensorInfo, fmt: str, spec: ArchSpec,
                    config: dict) -> QuantizedTensor:
    raw = data[info.offset:info.offset + info.num_bytes]
    shape = (info.shape[0], info.shape[1])
    exact = fmt == "int4" and info.qtype in FOUR_BIT  # a block map, no float weights
    tensor = repack(raw, info.qtype, shape, fmt,
                    None if exact else dequantize_tensor(data, info))
    return map_rows(tensor, lambda rows: spec.transform(info.name, rows, config))


def load_gguf(path: str | Path, name: str | None = None,
              weights: str | None = None) -> ModelFiles:
    """A GGUF file as a `ModelFiles`; ModelLoadError for anything not loadable.

    weights (worker/quantize.py): None or a dense format loads float32 tensors; auto,
    int8 and int4 load the 2-D weights as QuantizedTensors (Q4 blocks without a float
    round trip)."""
    path = Path(path)
    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture")
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise ModelLoadError(f"{path.name}: GGUF architecture {arch!r} is not supported; "
                             f"supported: {', '.join(sorted(ARCHITECTURES))}")
    config = build_config(header, arch, spec)
    try:
        tensors = load_tensors(path, header, spec, config, weights)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path.name}: corrupt tensor data: {exc}") from exc
    tokenizer = build_gguf_tokenizer(path, header.metadata)
    return ModelFiles(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(header.metadata),
        name=name or path.stem,
        fingerprint=file_sha256(path),
        source_path=str(path),
        extra={"gguf_file_type": header.metadata.get("general.file_type")},
    )
