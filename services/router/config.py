"""Router configuration, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.security.tls import RedisTls, TlsConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterConfig:
    """The router's server, registry polling and routing knobs.

    registry_poll_s: how often the cached registry is refreshed from Redis.
    max_load_imbalance: prefix affinity gives way to least-loaded when the prefix's owner
        carries this many more sequences per slot than the least loaded worker (SGLang's
        cache-aware router has the same kind of balance threshold).
    sequence_ttl_s: a sequence record is a lease the relaying router renews every third
        of this; a router that dies leaves its records for at most this long (a client
        resuming on another router without a seed reads the seed from it meanwhile).
    prefix_ttl_s: expiry of prefix-owner keys (hints, never renewed).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    router_id: str | None = None  # default: "router-{hostname}-{port}"
    advertise_address: str | None = None  # what peer routers dial (default: host:port)
    heartbeat_ttl_s: float = 6.0  # expiry of this router's key in the router registry
    redis_url: str = "redis://127.0.0.1:6379/0"
    registry_poll_s: float = 1.0
    max_load_imbalance: float = 1.0
    sequence_ttl_s: float = 60.0
    prefix_ttl_s: float = 600.0
    drain_exclusion_s: float = 120.0  # a drained worker gets no new sequences this long
    unreachable_backoff_s: float = 5.0  # skip a worker that refused a connection this long
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    # bearer tokens (services/security/auth.py): None = every caller may call everything
    auth_tokens: tuple = ()  # TokenEntry, from --auth-tokens-file; empty = no checks
    peer_token: str | None = field(default=None, repr=False)  # sent to peer routers
    shutdown_grace_s: float = 10.0
    # TLS of the server and of the calls to workers and peers (services/security/tls.py); None:
    # plaintext. The router's certificate is its client certificate for workers that
    # require one (mutual TLS).
    tls: TlsConfig | None = field(default=None, repr=False)
    redis_tls: RedisTls | None = None
    # the cluster key: calls to workers carry the credential derived from it
    # (services/security/cluster_auth.py); None: no credential sent
    cluster_key: bytes | None = field(default=None, repr=False)
