"""The gateway's configuration, built once by the CLI (`slotmesh gateway`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.security.auth import TokenEntry
    from services.security.tls import TlsConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Where the gateway listens and which router it forwards to.

    router_token: the gateway's own bearer token, sent only on its own calls (ListWorkers
        for /v1/models and /health); a router with a tokens file wants an admin one.
        Generation calls carry the HTTP caller's token, never this one.
    auth_tokens: the router's tokens file, when given: a /v1 request without a valid
        token is refused here (401) before it reaches the router.
    default_max_tokens: a chat completion without max_tokens generates at most this many
        (capped at the model's context); a text completion's default is OpenAI's 16.
    models_ttl_s: how long the served model list (from ListWorkers) is reused.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    router_address: str = "127.0.0.1:50051"
    router_token: str | None = field(default=None, repr=False)
    auth_tokens: tuple[TokenEntry, ...] = ()
    default_max_tokens: int = 1024
    models_ttl_s: float = 5.0
    request_timeout_s: float | None = None  # deadline of each Generate call; None: none
    # TLS: the certificate files uvicorn serves HTTPS with, and how the router is dialed
    # (services/security/tls.py); None: plaintext
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # with tls_require_client_cert: HTTP clients' CA
    tls_require_client_cert: bool = False
    tls: TlsConfig | None = field(default=None, repr=False)
