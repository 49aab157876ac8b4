"""Engine configuration: one frozen dataclass per concern, built once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# ModelConfig.weights' values (worker/quantize.py implements them; kept here, torch-free,
# so the router's command line can list them without importing torch)
WEIGHT_FORMATS = ("auto", "auto+bfloat16", "float32", "bfloat16", "float16", "int8", "int4")
COMPILE_MODES = ("auto", "on", "off")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Which model to load and how. `model` is a known name, a GGUF file or an HF directory."""

    model: str = "smollm2-135m"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "slotmesh")
    max_model_len: int | None = None  # None = the model's own context length
    # linear weights' format (worker/quantize.py): None = dense in `dtype` (nothing packed)
    # | auto | float32 | bfloat16 | float16 | int8 | int4; activations stay in `dtype`
    weights: str | None = None
    # pure-decode steps (worker/decode_step.py): "on" compiles them per batch size with
    # torch.compile, "off" runs every step on the general eager path (the reference),
    # "auto" compiles where it measured faster (static_decode_mode in worker/decode_step.py)
    compile: str = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    """The unified paged KV cache.

    num_blocks: blocks in the full-attention pool; None derives it from kv_cache_bytes.
    Sliding-window layers get their own pool sized for the window of every slot.
    Block 0 of every pool is the null block: never allocated, padding points at it.
    swa_full: sliding-window layers keep every block of a sequence (llama.cpp's
        `--swa-full`): more memory, any earlier prefix stays reusable locally, and no
        checkpoints are needed (none are made).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True
    swa_full: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointConfig:
    """When the engine captures prompt-cache checkpoints (published to Redis by the worker).

    A checkpoint at a block-aligned position P is the sliding-window layers' KV that the
    query at P still sees (a SWA_ONLY snapshot) plus the full-attention blocks of
    [0, P), which are content-addressed and shared between checkpoints.
    Checkpoints are made where a prompt ends, where a sequence ends (the next turn of a
    chat starts there), and every `every_tokens` in between.
    max_per_sequence: llama.cpp's `--swa-checkpoints`; the oldest is dropped first.
    every_tokens: one more while a sequence grows (prompt or generation) by this many
        tokens; 0 = only where a prompt or a sequence ends.
    min_step_tokens: no checkpoint of a prefix shorter than this, nor (except where the
        sequence ends) closer than this to the sequence's previous checkpoint.
    """

    max_per_sequence: int = 4
    every_tokens: int = 1024
    min_step_tokens: int = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Continuous batching limits.

    max_num_seqs: concurrent slots (llama.cpp's server default: 4).
    max_num_batched_tokens: token budget of one step; prompts longer than what is left
        of it are prefilled in chunks.
    max_waiting: requests queued beyond the slots before add() raises CapacityError.
    """

    max_num_seqs: int = 4
    max_num_batched_tokens: int = 512
    max_waiting: int = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoints: CheckpointConfig | None = None  # None: capture none (nobody publishes)
    warmup: bool = True
