"""Bearer tokens on the client-facing router: who may call, what, and how much.

The tokens file (JSON, e.g. a Kubernetes Secret mounted as a file) holds only hashes:

    {"tokens": [{"name": "alice", "sha256": "<hex SHA-256 of the token>",
                 "admin": false, "max_streams": 8, "tokens_per_minute": 60000}]}

`slotmesh token new NAME` makes a token and prints its entry. One interceptor checks
`authorization: Bearer <token>` on every slotmesh.v1.Router call (health and reflection
stay open for probes):

- no token, or one not in the file: UNAUTHENTICATED, with nothing else said;
- Migrate, Drain, Undrain and ListWorkers (operating the cluster) with a token that is
  not admin:
  PERMISSION_DENIED;
- a Generate beyond the token's max_streams concurrent streams, or once its streams got
  tokens_per_minute tokens in the last 60 s: RESOURCE_EXHAUSTED (0 = no limit).

slotmesh's own callers of a router (a worker draining itself, a router forwarding to a
peer, `slotmesh drain`, `slotmesh generate --router`) send $SLOTMESH_TOKEN.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from worker.vocab.errors import InvalidRequestError

ROUTER_SERVICE = "/slotmesh.v1.Router/"
ADMIN_METHODS = frozenset({"Migrate", "Drain", "Undrain", "ListWorkers"})
UNAUTHENTICATED = "a valid bearer token is required"
_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEntry:
    name: str
    sha256: bytes
    admin: bool = False
    max_streams: int = 0  # 0 = no limit
    tokens_per_minute: int = 0  # 0 = no limit


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return "smk_" + secrets.token_urlsafe(32)


def load_tokens(path: str | Path, flag: str = "--auth-tokens-file") -> list[TokenEntry]:
    """Parse and check the tokens file; InvalidRequestError naming the flag otherwise."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise InvalidRequestError(flag, f"cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise InvalidRequestError(flag, f"{path} is not JSON: {e}") from e
    raw = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError(flag, f'{path}: expected {{"tokens": [...]}} with entries')
    entries = [_entry(e, i, flag) for i, e in enumerate(raw)]
    if len({e.name for e in entries}) != len(entries):
        raise InvalidRequestError(flag, f"{path}: token names must be unique")
    return entries


def _entry(e, i: int, flag: str) -> TokenEntry:
    def bad(what: str) -> InvalidRequestError:
        return InvalidRequestError(flag, f"token {i}: {what}")

    if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
        raise bad("needs a non-empty name")
    digest = e.get("sha256")
    try:
        sha = bytes.fromhex(digest) if isinstance(digest, str) else b""
    except ValueError:
        sha = b""
    if len(sha) != 32:
        raise bad("sha256 must be 64 hex digits (the token's SHA-256)")
    limits = {k: e.get(k, 0) for k in ("max_streams", "tokens_per_minute")}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in limits.values()):
        raise bad("max_streams and tokens_per_minute must be integers >= 0")
    if not isinstance(e.get("admin", False), bool):
        raise bad("admin must be true or false")
    return TokenEntry(name=e["name"], sha256=sha, admin=e.get("admin", False), **limits)


class _Usage:
    """One token's open streams and the tokens its streams got in the last minute."""

    def __init__(self) -> None:
        self.streams = 0
        self.tokens: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens_in_window = 0

    def tokens_last_minute(self, now: float) -> int:
        while self.tokens and self.tokens[0][0] <= now - _WINDOW_S:
            self.tokens_in_window -= self.tokens.popleft()[1]
        return self.tokens_in_window

    def add_tokens(self, n: int, now: float) -> None:
        self.tokens.append((now, n))
        self.tokens_in_window += n


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, entries: list[TokenEntry]) -> None:
        self.entries = entries
        self._usage: dict[str, _Usage] = collections.defaultdict(_Usage)

    def authenticate(self, metadata) -> TokenEntry | None:
        """The entry whose hash matches the bearer token (every entry compared, in
        constant time each), or None."""
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        digest = hash_token(header[len("Bearer "):].strip())
        found = None
        for entry in self.entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(ROUTER_SERVICE):
            return handler  # health and reflection stay open
        entry = self.authenticate(handler_call_details.invocation_metadata)
        name = method[len(ROUTER_SERVICE):]
        if entry is None:
            return refusing(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        if name in ADMIN_METHODS and not entry.admin:
            return refusing(handler, grpc.StatusCode.PERMISSION_DENIED,
                             f"{name} needs an admin token")
        if handler.unary_stream is not None and (entry.max_streams or
                                                 entry.tokens_per_minute):
            return grpc.unary_stream_rpc_method_handler(
                self._limited(handler.unary_stream, entry),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _limited(self, inner, entry: TokenEntry):
        async def stream(request, context):
            usage = self._usage[entry.name]
            refusal = self._refusal(entry, usage)
            if refusal:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            usage.streams += 1
            try:
                async for msg in inner(request, context):
                    usage.add_tokens(len(msg.token_ids), time.monotonic())
                    yield msg
            finally:
                usage.streams -= 1

        return stream

    @staticmethod
    def _refusal(entry: TokenEntry, usage: _Usage) -> str:
        if entry.max_streams and usage.streams >= entry.max_streams:
            return (f"token {entry.name!r}: {usage.streams} streams open; its limit is "
                    f"{entry.max_streams}")
        used = usage.tokens_last_minute(time.monotonic())
        if entry.tokens_per_minute and used >= entry.tokens_per_minute:
            return (f"token {entry.name!r}: {used} tokens in the last minute; its limit is "
                    f"{entry.tokens_per_minute}")
        return ""


def refusing(handler, code: grpc.StatusCode, message: str):
    """A handler of the same shape that answers `code` without running the method."""
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


# -- the client side ---------------------------------------------------------------------

def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class _AddMetadata:
    """Adds fixed metadata (a bearer token, the cluster credential) to every call of an
    aio channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        # a grpc.aio.Metadata, as the call objects expect
        metadata = grpc.aio.Metadata.from_tuple(tuple(details.metadata or ()) + self.metadata)
        return details._replace(metadata=metadata)


# grpc.aio files each channel interceptor under the first of the four kinds it is an
# instance of (an if/elif), so one class per kind: one subclassing all four would only
# ever see unary-unary calls, and streams (Generate, ImportSequence) would go without.
class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def token_interceptors(token: str | None, extra: tuple[tuple[str, str], ...] = ()) -> list:
    """aio channel interceptors that add the bearer token and `extra` to every call."""
    metadata = bearer(token) + extra
    if not metadata:
        return []
    return [cls(metadata) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


class AddMetadataSync(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The same for a blocking channel (grpc.intercept_channel)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        return _SyncDetails(details.method, details.timeout,
                            tuple(details.metadata or ()) + self.metadata,
                            details.credentials, details.wait_for_ready,
                            details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _SyncDetails(collections.namedtuple(
        "_SyncDetails", "method timeout metadata credentials wait_for_ready compression"),
        grpc.ClientCallDetails):
    pass


def sync_token_interceptors(token: str | None, extra: tuple[tuple[str, str], ...] = ()
                            ) -> list:
    metadata = bearer(token) + extra
    return [AddMetadataSync(metadata)] if metadata else []


def default_token(token: str | None) -> str | None:
    """An explicit token, else $SLOTMESH_TOKEN (slotmesh's own callers of a router)."""
    return token if token is not None else os.environ.get("SLOTMESH_TOKEN") or None


def write_tokens_file(path: Path, entries: list[dict]) -> None:
    path.write_text(json.dumps({"tokens": entries}, indent=2) + "\n")


def add_token_entry(path: Path, entry: dict, flag: str = "--file") -> None:
    """Append an entry to a tokens file (created when missing, owner-only); the file is
    checked first and replaced atomically, so a router never reads half of it."""
    entries = []
    if path.exists():
        load_tokens(path, flag)  # refuses a file a router would refuse
        entries = json.loads(path.read_text())["tokens"]
    if any(e["name"] == entry["name"] for e in entries):
        raise InvalidRequestError(flag, f"{path} already has a token named {entry['name']!r}")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"tokens": [*entries, entry]}, indent=2) + "\n")
    os.replace(tmp, path)


def entry_for(name: str, token: str, **limits) -> dict:
    return {"name": name, "sha256": hash_token(token).hex(), **limits}
