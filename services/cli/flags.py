"""Flag helpers and config builders every `slotmesh` subcommand shares (a leaf: it imports
no other subcommand). Defaults come from the config dataclasses (`worker/config.py`,
`services/worker/config.py`), so each default is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from pathlib import Path

from services.security.tls import ChannelTls, add_redis_tls_flags, add_tls_flags, tls_config
from services.worker.config import ServerConfig
from worker.config import (
    COMPILE_MODES,
    WEIGHT_FORMATS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from worker.training.config import FinetuneConfig

# Exit codes of the client subcommands (generate, seq save/restore, drain): 0 done; 2 the
# request or file was refused, so the same call fails again until the input changes; 1 the
# call failed (cluster unreachable, deadline, overload, a server fault): retrying may help.
EXIT_REFUSED, EXIT_FAILED = 2, 1
_REFUSALS = frozenset({"INVALID_ARGUMENT", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                       "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED"})


def exit_code_of(status_name: str) -> int:
    """The exit code for a call that ended with the gRPC status of that name."""
    return EXIT_REFUSED if status_name in _REFUSALS else EXIT_FAILED


def default_of(cls, name: str):
    """The default of a (slots) dataclass field; `cls.name` is a slot descriptor there."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


DEFAULT_MODEL = default_of(ModelConfig, "model")
DEFAULT_REDIS_URL = default_of(ServerConfig, "redis_url")
DEFAULT_MAX_MODEL_LEN = 8192  # --ctx unset: the model's own context, capped here


def cache_dir() -> Path:
    from worker.loaders.hub import default_cache_dir

    return default_cache_dir(os.environ)


def add_model_flags(p: argparse.ArgumentParser, slots: bool = True,
                    default_slots: int = default_of(SchedulerConfig, "max_num_seqs")) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="known name (smollm2-135m, gemma3-270m, qwen2.5-0.5b, qwen2.5-1.5b), "
                        "a GGUF file or a Hugging Face directory (default: %(default)s)")
    p.add_argument("--dtype", default=default_of(ModelConfig, "dtype"),
                   choices=["float32", "bfloat16", "float16"],
                   help="compute and KV dtype (default: %(default)s)")
    p.add_argument("--weights", default=default_of(ModelConfig, "weights"),
                   choices=WEIGHT_FORMATS,
                   help="linear weights at inference: auto keeps a GGUF's 4-bit blocks as "
                        "int4 (Q4_0/Q4_1/Q4_K), its Q8_0/Q5_0 tensors as int8 blocks of 32 "
                        "and its other quantized types (Q6_K, Q5_1, ...) as float16 (on the "
                        "CPU the 4/8-bit blocks run in slotmesh's native op with fp32 "
                        "activations and logits); auto+bfloat16: auto, plus a bf16 copy of "
                        "each 4/8-bit block weight that steps of more than one row (prefill, "
                        "batched decode) multiply by (use with --dtype bfloat16); int8/int4 "
                        "quantize every linear; "
                        "float32/bfloat16/float16 dense (float16 on an x86 CPU: FBGEMM's fp16 "
                        "GEMM over every thread, fp32 activations) (default: dense in --dtype)")
    p.add_argument("--compile", default=default_of(ModelConfig, "compile"),
                   choices=COMPILE_MODES,
                   help="compile pure-decode steps with torch.compile, one graph per batch "
                        "size, at warmup: on, off (every step eager), or auto (on for bf16/"
                        "fp16 on a CPU with native bf16, where it halves a step, for "
                        "--weights float16 on FBGEMM and for the CPU's 4/8-bit blocks, "
                        "cached on disk after the first start, except auto+bfloat16's, "
                        "whose bf16 copies are frozen in; off elsewhere) "
                        "(default: %(default)s)")
    p.add_argument("--device", default=default_of(ModelConfig, "device"),
                   help="torch device: cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where model files are fetched to (default: $SLOTMESH_CACHE or "
                        "~/.cache/slotmesh)")
    if slots:
        p.add_argument("--slots", "--parallel", "-np", dest="slots", type=int,
                       default=default_slots,
                       help="concurrent sequences; --parallel / -np as in llama.cpp "
                            "(default: %(default)s)")
        p.add_argument("--block-size", type=int, default=default_of(CacheConfig, "block_size"),
                       help="tokens per KV block (default: %(default)s)")
        p.add_argument("--max-num-batched-tokens", "--batch-size", dest="max_num_batched_tokens",
                       type=int, default=default_of(SchedulerConfig, "max_num_batched_tokens"),
                       help="tokens one step may compute: the prefill chunk budget "
                            "(default: %(default)s)")
        p.add_argument("--kv-cache-mb", type=int,
                       default=default_of(CacheConfig, "kv_cache_bytes") >> 20,
                       help="memory for the full-attention KV pool in MiB "
                            "(default: %(default)s)")
        p.add_argument("--max-waiting", type=int,
                       default=default_of(SchedulerConfig, "max_waiting"),
                       help="requests queued beyond the slots before new ones are refused "
                            "with RESOURCE_EXHAUSTED (default: %(default)s)")
        p.add_argument("--swa-full", action="store_true",
                       help="sliding-window layers keep every block of a sequence instead "
                            "of the window only: more memory, any earlier prefix reusable "
                            "without checkpoints (and none are made)")
    p.add_argument("--ctx", "--ctx-size", "--max-model-len", dest="ctx", type=int,
                   default=None,
                   help="max context length in tokens (default: the model's own, capped at "
                        f"{DEFAULT_MAX_MODEL_LEN})")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                       weights=args.weights, compile=args.compile,
                       cache_dir=args.cache_dir or cache_dir(),
                       max_model_len=args.ctx or DEFAULT_MAX_MODEL_LEN)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=model_config(args),
                        cache=CacheConfig(kv_cache_bytes=args.kv_cache_mb * 1024 * 1024,
                                          swa_full=args.swa_full, block_size=args.block_size),
                        scheduler=SchedulerConfig(
                            max_num_seqs=args.slots, max_waiting=args.max_waiting,
                            max_num_batched_tokens=args.max_num_batched_tokens))


def redis_url_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=os.environ.get("SLOTMESH_REDIS_URL",
                                                         DEFAULT_REDIS_URL),
                   help="Redis holding the registry (default: $SLOTMESH_REDIS_URL or "
                        f"{DEFAULT_REDIS_URL})")


def server_flags(p: argparse.ArgumentParser, config: type) -> None:
    """The flags a gRPC server shares; defaults from its config dataclass (ServerConfig,
    RouterConfig)."""
    port = default_of(config, "port")
    p.add_argument("--host", default=default_of(config, "host"),
                   help="interface to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=port,
                   help=f"gRPC port; 0 = any free port (default: {port})")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port; 0 = any free port "
                        "(default: off)")
    p.add_argument("--shutdown-grace", type=float, default=default_of(config, "shutdown_grace_s"),
                   help="seconds running streams get to finish on SIGTERM "
                        "(default: %(default)g)")
    redis_url_flag(p)
    add_tls_flags(p, server=True)
    add_redis_tls_flags(p)


def cluster_key_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--cluster-key-file", type=Path,
                   default=os.environ.get("SLOTMESH_CLUSTER_KEY_FILE") or None,
                   help=help + " (default: $SLOTMESH_CLUSTER_KEY_FILE)")


def cluster_key(args: argparse.Namespace) -> bytes | None:
    from worker.vocab.integrity import load_key

    return load_key(args.cluster_key_file) if args.cluster_key_file else None


def client_tls(args: argparse.Namespace) -> ChannelTls | None:
    """The ChannelTls of a client command's --tls-* flags; None = plaintext."""
    config = tls_config(args, server=False)
    return config.channel() if config is not None else None


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device and --cache-dir, shared by finetune and bench finetune."""
    p.add_argument("--device", default=default_of(FinetuneConfig, "device"),
                   help="cpu or cuda (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where known models are fetched to (default: $SLOTMESH_CACHE or "
                        "~/.cache/slotmesh)")
