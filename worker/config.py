"""Engine configuration: one frozen dataclass per concern, built once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Which model to load and how. `model` is a known name, a GGUF file or an HF directory."""

    model: str = "smollm2-135m"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "slotmesh")
    max_model_len: int | None = None  # None = the model's own context length


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    """The unified paged KV cache.

    num_blocks: blocks in the full-attention pool; None derives it from kv_cache_bytes.
    Sliding-window layers get their own pool sized for the window of every slot.
    Block 0 of every pool is the null block: never allocated, padding points at it.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True


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
    warmup: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """The worker's gRPC server and its entry in the Redis registry.

    port 0 binds any free port. advertise_address is what the router and peers dial
    (default host:bound port). The heartbeat renews the registry key every ttl/3; a
    worker that stops renewing disappears from routing when the key expires.
    """

    host: str = "127.0.0.1"
    port: int = 50061
    advertise_address: str | None = None
    worker_id: str | None = None  # default: "{hostname}-{bound port}"
    redis_url: str = "redis://127.0.0.1:6379/0"
    heartbeat_ttl_s: float = 6.0
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    shutdown_grace_s: float = 10.0
    router_address: str | None = None  # SIGTERM drains through this router first
    max_snapshot_bytes: int = 8 << 30  # larger imports are refused (INVALID_ARGUMENT)
