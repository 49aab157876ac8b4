"""The worker process's server configuration (gRPC, Redis registry, prompt-cache budget)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.security.tls import RedisTls, TlsConfig


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
    router_token: str | None = field(default=None, repr=False)  # its admin bearer token
    max_snapshot_bytes: int = 8 << 30  # larger imports are refused (INVALID_ARGUMENT)
    # the cluster-wide prompt cache in Redis: 0 bytes turns it off (no reads, no writes)
    prompt_cache_bytes: int = 1 << 30  # payload budget, enforced by slotmesh
    prompt_cache_ttl_s: float = 3600.0
    # snapshots and prompt-cache entries carry a MAC under this key and must verify
    # (worker/vocab/integrity.py); None: a SHA-256 checksum only
    cluster_key: bytes | None = field(default=None, repr=False)
    # TLS of the gRPC server and of this worker's calls (services/security/tls.py); None: plaintext.
    # With require_client_cert and/or cluster_key, callers need cluster credentials
    # (services/security/cluster_auth.py).
    tls: TlsConfig | None = field(default=None, repr=False)
    redis_tls: RedisTls | None = None  # a rediss:// redis_url's CA and client certificate
    # a testing aid: every engine step lasts at least this long (0: off), so a stream of
    # N tokens lasts at least N of them whatever the machine's speed, and a test can act
    # on it mid-stream (migrate, kill, stop Redis) without racing its end
    min_step_s: float = 0.0
