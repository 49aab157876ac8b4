"""Worker caller authentication: workers take calls only from the cluster's own processes.

A worker is secured when it requires client certificates (--tls-require-client-cert)
and/or has a cluster key (--cluster-key-file). Then every slotmesh.v1.Worker call
(Generate, ExportSequence, ImportSequence, RestoreSequence, …) needs one of:

- a client certificate verified against the cluster CA (mutual TLS); or
- the cluster credential in the call's metadata: `slotmesh-cluster-credential:
  <hex HMAC-SHA-256 of a fixed label under the cluster key>`. The router, peer workers
  (pulling a snapshot), `slotmesh seq save|restore` and the test harness send it.

Anything else is answered UNAUTHENTICATED with the same words whatever was wrong.
grpc.health and reflection stay open (probes). A worker with neither setting is open to
every caller, as for local development.

The credential is derived, not the key itself: seeing it on the wire does not let anyone
forge a snapshot MAC. It is the same on every call, though, so whoever sees it can replay
it: it is a shared secret that must only travel over TLS. Without TLS (a cluster key
alone) it protects against callers that cannot read the cluster's traffic, nothing more.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import grpc

from services.security.auth import refusing

WORKER_SERVICE = "/slotmesh.v1.Worker/"
CREDENTIAL_METADATA = "slotmesh-cluster-credential"
UNAUTHENTICATED = "cluster credentials are required"
_LABEL = b"slotmesh/v1 worker caller credential"

log = logging.getLogger(__name__)


def cluster_credential(key: bytes) -> str:
    return hmac.new(key, _LABEL, hashlib.sha256).hexdigest()


def caller_metadata(key: bytes | None) -> tuple[tuple[str, str], ...]:
    """What slotmesh's own callers of a worker add to every call (none without a key)."""
    return ((CREDENTIAL_METADATA, cluster_credential(key)),) if key else ()


def has_client_certificate(context) -> bool:
    """The TLS peer presented a certificate. The server asks for one only when it
    requires it, and then the handshake has verified it against the cluster CA."""
    auth = context.auth_context() or {}
    return bool(auth.get("x509_pem_cert"))


class CallerAuthInterceptor(grpc.aio.ServerInterceptor):
    """The worker's one check of who calls it (see the module docstring)."""

    def __init__(self, *, cluster_key: bytes | None, require_client_cert: bool) -> None:
        assert cluster_key or require_client_cert, "an open worker needs no interceptor"
        self.expected = cluster_credential(cluster_key).encode() if cluster_key else None
        self.require_client_cert = require_client_cert

    def has_credential(self, metadata) -> bool:
        if self.expected is None:
            return False
        value = next((v for k, v in metadata or () if k == CREDENTIAL_METADATA), "")
        if not isinstance(value, str):
            return False
        return hmac.compare_digest(value.encode(), self.expected)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(WORKER_SERVICE):
            return handler  # health and reflection stay open
        if self.has_credential(handler_call_details.invocation_metadata):
            return handler
        if self.require_client_cert:  # the certificate is known only inside the call
            return _checking_certificate(handler)
        log.info("refused %s: no cluster credential", handler_call_details.method)
        return refusing(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


def _checking_certificate(handler):
    """The same handler, answering UNAUTHENTICATED when the peer has no certificate."""
    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}

    async def check(context) -> None:
        if not has_client_certificate(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

    def unary(inner):
        async def call(request, context):
            await check(context)
            return await inner(request, context)
        return call

    def stream(inner):
        async def call(request, context):
            await check(context)
            async for response in inner(request, context):
                yield response
        return call

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kwargs)
