"""Python clients of the router (sync and async), over the generated stubs.

    with Client("127.0.0.1:50051") as c:
        for chunk in c.stream(text="Once upon a time", max_tokens=32, temperature=0):
            print(chunk.text, end="")
        result = c.generate(messages=[{"role": "user", "content": "Hi"}], seed=7)

Sampling keywords are SamplingParams' fields (max_tokens, temperature, top_k, top_p,
min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias
as {token_id: bias}, seed, logprobs, stop, stop_token_ids, ignore_eos, num_candidates).
Failures raise `RpcError` with the gRPC status code and the server's message. The same
clients talk to a worker directly with `service="worker"` (Generate and Abort only).

TLS (docs/security.md): `tls=True` verifies the router against the system's roots;
`root_certificates=` (PEM bytes, e.g. the CA `slotmesh up --tls` prints) against a
private CA; a `ChannelTls` also carries a client certificate (mutual TLS) or the name to
expect in the server's certificate. None or False: plaintext.

    Client("127.0.0.1:50051", root_certificates=Path("ca.pem").read_bytes())
    Client(address, tls=ChannelTls.from_files(ca="ca.pem", cert="c.pem", key="c.key"))

Retries (off unless asked for): `Client(["127.0.0.1:50051", "127.0.0.1:50052"],
retry=RetryPolicy())` makes `stream()` and `generate()` survive a router that dies or
restarts, and a cluster with no worker to take the request for a moment. When a call
fails with UNAVAILABLE (and only then: every other status is the request's own answer),
the client waits the policy's backoff (initial_backoff_s, times multiplier per retry, at
most max_backoff_s), moves to the next address of its list (round robin; one address =
the same router again) and sends the request again with `resume=` every token it has
received, under the same request_id (one is made, `c-<hex>`, when the caller gave none)
and the seed the first chunk reported, so the continuation is exactly the tokens the
broken stream would have delivered: no token is repeated or lost. After max_attempts
calls in all it raises the last UNAVAILABLE. Unary calls are not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from protos.slotmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc
from services.rpc import plumbing as rpc
from services.rpc.convert import (
    GenerationRequest,
    Prompt,
    chunk_from_pb,
    params_from_pb,
    request_to_pb,
)
from services.security.auth import default_token
from services.security.tls import ChannelTls
from worker.vocab.sampling_params import SamplingParams
from worker.vocab.streams import Resume, TokenChunk

log = logging.getLogger(__name__)

_STATUS_NAMES = {v: k.removeprefix("SEQUENCE_STATUS_").lower()
                 for k, v in router_pb2.SequenceStatus.items()}


class RpcError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `message` the server's details."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def wrap(cls, error: grpc.RpcError, tls: bool | None = None) -> RpcError:
        """tls: whether the channel used TLS; a connection refused for a TLS mismatch
        then says what to change (gRPC itself says only "Socket closed")."""
        details = error.details() or ""
        if error.code() == grpc.StatusCode.UNAVAILABLE and tls is not None:
            details += _tls_mismatch_hint(details, tls)
        return cls(error.code(), details)


def _tls_mismatch_hint(details: str, tls: bool) -> str:
    if not tls and "Socket closed" in details:
        return (" (a plaintext client reaching a TLS server looks like this: pass tls=True, "
                "or --tls / --tls-ca CA.pem on the command line)")
    if tls and "WRONG_VERSION_NUMBER" in details:
        return (" (a TLS client reaching a plaintext server looks like this: leave out "
                "tls / --tls)")
    return ""


@dataclass(slots=True)
class Completion:
    """A finished generation, assembled from its chunks."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    error: str = ""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from a prefix or prompt cache
    worker_id: str = ""

    def add(self, chunk: TokenChunk) -> None:
        self.request_id = self.request_id or chunk.request_id
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.error = chunk.error or self.error
        self.num_prompt_tokens = chunk.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = chunk.num_cached_tokens or self.num_cached_tokens
        self.worker_id = chunk.worker_id or self.worker_id


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how often stream()/generate() send a request again (module docstring).

    max_attempts: calls in all, the first included (1 = never retry).
    initial_backoff_s, multiplier, max_backoff_s: the wait before retry n is
        min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1)); no jitter.
    The defaults wait 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 5 + 5 s: a router restart fits.
    """

    max_attempts: int = 8
    initial_backoff_s: float = 0.2
    multiplier: float = 2.0
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.multiplier < 1 \
                or self.max_backoff_s < 0:
            raise ValueError(f"invalid retry policy {self}")

    def backoff_s(self, retry: int) -> float:
        """The wait before retry number `retry` (1 for the first)."""
        return min(self.max_backoff_s,
                   self.initial_backoff_s * self.multiplier ** (retry - 1))


class _Attempts:
    """One stream's retry state: what it received (resumed from), its seed, its address."""

    def __init__(self, policy: RetryPolicy, request: dict, num_addresses: int) -> None:
        self.policy = policy
        self.request = dict(request)
        self.request["request_id"] = request.get("request_id") or f"c-{uuid.uuid4().hex}"
        resume = self.request.pop("resume", None)
        self.received = Completion(token_ids=list(resume.token_ids),
                                   text=resume.text) if resume is not None else Completion()
        self.num_addresses = num_addresses
        self.address_index = 0
        self.num_retries = 0

    def message(self) -> common_pb2.GenerateRequest:
        resume = self.received if self.received.token_ids else None
        return build_request(**self.request, resume=resume)

    def on_chunk(self, chunk: TokenChunk) -> None:
        self.received.add(chunk)
        if self.request.get("seed") is None and chunk.seed:
            self.request["seed"] = chunk.seed  # the resumed call samples with the same one

    def on_error(self, error: RpcError) -> float:
        """Raise `error` when it is final; else move on and return the wait before the
        next call."""
        if error.code != grpc.StatusCode.UNAVAILABLE \
                or self.num_retries + 1 >= self.policy.max_attempts:
            raise error
        self.num_retries += 1
        self.address_index = (self.address_index + 1) % self.num_addresses
        log.info("retry %d of %s after %d tokens: %s", self.num_retries,
                 self.request["request_id"], len(self.received.token_ids), error)
        return self.policy.backoff_s(self.num_retries)


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceInfo:
    request_id: str
    worker_id: str
    status: str  # "waiting" | "running" | "migrating" | "unspecified"
    num_tokens_emitted: int
    prompt_hash: str
    router_id: str
    params: SamplingParams


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSummary:
    worker_id: str
    address: str
    model: str
    fingerprint: str
    slots: int
    num_running: int
    num_waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    attention_backend: str
    version: str
    instance_id: str  # the worker process (new at every start)
    weights: str  # what the linears multiply in, with the activation dtype


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationResult:
    source_worker_id: str
    target_worker_id: str
    num_tokens_at_migration: int
    duration_s: float
    snapshot_bytes: int


_KINDS = {"full": common_pb2.SNAPSHOT_KIND_FULL, "swa_only": common_pb2.SNAPSHOT_KIND_SWA_ONLY,
          "tokens_only": common_pb2.SNAPSHOT_KIND_TOKENS_ONLY}


def _migrate_request(request_id: str, target_worker_id: str, kind: str):
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    return router_pb2.MigrateRequest(request_id=request_id, kind=_KINDS[kind],
                                     target_worker_id=target_worker_id)


def _migration_result(resp) -> MigrationResult:
    return MigrationResult(source_worker_id=resp.source_worker_id,
                           target_worker_id=resp.target_worker_id,
                           num_tokens_at_migration=resp.num_tokens_at_migration,
                           duration_s=resp.duration_s, snapshot_bytes=resp.snapshot_bytes)


def build_request(*, text: str | None = None, messages: list[dict] | None = None,
                  token_ids: list[int] | None = None, request_id: str = "",
                  resume: Completion | None = None,
                  **sampling) -> common_pb2.GenerateRequest:
    """The GenerateRequest for one prompt (exactly one of text, messages, token_ids).

    resume: what the client already received of this request (same request_id and
    prompt) when its stream broke with its router; any router continues after it, with
    the seed the sequence ran with (from Redis when the request has none)."""
    if "logit_bias" in sampling and isinstance(sampling["logit_bias"], dict):
        sampling["logit_bias"] = tuple(sampling["logit_bias"].items())
    for key in ("stop", "stop_token_ids"):
        if key in sampling:
            sampling[key] = tuple(sampling[key])
    prompt = Prompt(
        text=text, token_ids=tuple(token_ids) if token_ids is not None else None,
        messages=tuple((m["role"], m["content"]) for m in messages)
        if messages is not None else None)
    return request_to_pb(GenerationRequest(
        request_id=request_id, prompt=prompt, params=SamplingParams(**sampling),
        resume=Resume(output_token_ids=tuple(resume.token_ids),
                      emitted_chars=len(resume.text)) if resume is not None else None))


def _sequence_info(msg: router_pb2.SequenceInfo) -> SequenceInfo:
    return SequenceInfo(
        request_id=msg.request_id, worker_id=msg.worker_id,
        status=_STATUS_NAMES.get(msg.status, "unspecified"),
        num_tokens_emitted=msg.num_tokens_emitted, prompt_hash=msg.prompt_hash,
        router_id=msg.router_id, params=params_from_pb(msg.params))


def _worker_summary(w: common_pb2.WorkerInfo) -> WorkerSummary:
    return WorkerSummary(
        worker_id=w.worker_id, address=w.address, model=w.model, fingerprint=w.fingerprint,
        slots=w.slots, num_running=w.load.num_running, num_waiting=w.load.num_waiting,
        kv_blocks_free=w.load.kv_blocks_free, kv_blocks_total=w.load.kv_blocks_total,
        attention_backend=w.attention_backend, version=w.version, instance_id=w.instance_id,
        weights=w.weights)


def channel_tls(tls: ChannelTls | bool | None, root_certificates: bytes | None
                ) -> ChannelTls | None:
    """The client's TLS settings: None for plaintext."""
    if isinstance(tls, ChannelTls):
        if root_certificates is not None:
            raise ValueError("give root_certificates inside the ChannelTls, not both")
        return tls
    if tls or root_certificates is not None:
        return ChannelTls(root_certificates=root_certificates)
    return None


def _stub(channel, service: str):
    if service == "router":
        return router_pb2_grpc.RouterStub(channel)
    if service == "worker":
        return worker_pb2_grpc.WorkerStub(channel)
    raise ValueError(f"service must be 'router' or 'worker', got {service!r}")


def _addresses(address: str | Sequence[str]) -> list[str]:
    addresses = [address] if isinstance(address, str) else list(address)
    if not addresses:
        raise ValueError("at least one address is needed")
    return addresses


class _Connections:
    """What Client and AsyncClient share: their arguments, and one channel and stub per
    address, opened on first use (`_open` makes the blocking or the aio channel)."""

    def __init__(self, address: str | Sequence[str], *, timeout: float | None = None,
                 service: str = "router", token: str | None = None,
                 retry: RetryPolicy | None = None, tls: ChannelTls | bool | None = None,
                 root_certificates: bytes | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.addresses = _addresses(address)
        self.address = self.addresses[0]
        self.timeout = timeout
        self.retry = retry
        self.num_retries = 0
        self._service = service
        self._token = default_token(token)
        self._tls = channel_tls(tls, root_certificates)
        self._metadata = metadata
        self._channels: dict[str, grpc.Channel | grpc.aio.Channel] = {}
        self._stubs: dict[str, object] = {}
        self._stub = self._stub_for(self.address)

    def _open(self, address: str):
        raise NotImplementedError

    def _stub_for(self, address: str):
        if address not in self._stubs:
            self._channels[address] = self._open(address)
            self._stubs[address] = _stub(self._channels[address], self._service)
        return self._stubs[address]


class Client(_Connections):
    """Blocking client. `address`: one router (or worker), or a list of routers that
    retries go round (the first serves every other call). `timeout` (seconds) is each
    call's deadline; None = no deadline. `retry`: a RetryPolicy for stream()/generate()
    (module docstring); None = a failure raises at once. `token`: the bearer token a
    router with `--auth-tokens-file` asks for (default $SLOTMESH_TOKEN). `tls` /
    `root_certificates`: see the module docstring (default: plaintext). `metadata`: more
    call metadata, e.g. the cluster credential (services/security/cluster_auth.py) when talking
    to a secured worker directly. `num_retries` counts the retries made so far."""

    def _open(self, address: str) -> grpc.Channel:
        return rpc.blocking_channel(address, self._token, tls=self._tls,
                                    metadata=self._metadata)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def stream(self, **request) -> Iterator[TokenChunk]:
        """Yield chunks as they arrive. Breaking out of the loop cancels the request.
        With a retry policy, a stream broken by UNAVAILABLE continues where it broke."""
        if self.retry is None:
            yield from self._call(self._stub, build_request(**request))
            return
        attempts = _Attempts(self.retry, request, len(self.addresses))
        while True:
            stub = self._stub_for(self.addresses[attempts.address_index])
            try:
                with contextlib.closing(self._call(stub, attempts.message())) as chunks:
                    for chunk in chunks:
                        attempts.on_chunk(chunk)
                        yield chunk
                return
            except RpcError as e:
                wait_s = attempts.on_error(e)
                self.num_retries += 1
            time.sleep(wait_s)

    def _call(self, stub, message) -> Iterator[TokenChunk]:
        call = stub.Generate(message, timeout=self.timeout)
        try:
            for msg in call:
                yield chunk_from_pb(msg)
        except grpc.RpcError as e:
            raise RpcError.wrap(e, tls=self._tls is not None) from e
        finally:
            call.cancel()

    def generate(self, **request) -> Completion:
        result = Completion()
        for chunk in self.stream(**request):
            result.add(chunk)
        return result

    def _unary(self, method: str, msg):
        try:
            return getattr(self._stub, method)(msg, timeout=self.timeout)
        except grpc.RpcError as e:
            raise RpcError.wrap(e, tls=self._tls is not None) from e

    def abort(self, request_id: str) -> bool:
        return self._unary("Abort", common_pb2.AbortRequest(request_id=request_id)).found

    def get_sequence(self, request_id: str) -> SequenceInfo:
        return _sequence_info(self._unary(
            "GetSequence", router_pb2.GetSequenceRequest(request_id=request_id)))

    def list_workers(self) -> list[WorkerSummary]:
        resp = self._unary("ListWorkers", router_pb2.ListWorkersRequest())
        return [_worker_summary(w) for w in resp.workers]

    def migrate(self, request_id: str, target_worker_id: str = "",
                kind: str = "full") -> MigrationResult:
        resp = self._unary("Migrate", _migrate_request(request_id, target_worker_id, kind))
        return _migration_result(resp)

    def drain(self, worker_id: str) -> tuple[int, int]:
        """(sequences migrated, sequences that stayed)."""
        resp = self._unary("Drain", router_pb2.DrainRequest(worker_id=worker_id))
        return resp.num_migrated, resp.num_failed

    def undrain(self, worker_id: str) -> bool:
        """Return a drained worker to routing; whether it was drained."""
        return self._unary("Undrain",
                           router_pb2.UndrainRequest(worker_id=worker_id)).was_draining


class AsyncClient(_Connections):
    """The asyncio client; same arguments and methods as Client, awaitable."""

    def _open(self, address: str) -> grpc.aio.Channel:
        return rpc.channel(address, self._token, tls=self._tls, metadata=self._metadata)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def stream(self, **request) -> AsyncIterator[TokenChunk]:
        if self.retry is None:
            async with contextlib.aclosing(self._call(self._stub,
                                                      build_request(**request))) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        attempts = _Attempts(self.retry, request, len(self.addresses))
        while True:
            stub = self._stub_for(self.addresses[attempts.address_index])
            try:
                async with contextlib.aclosing(self._call(stub, attempts.message())) as chunks:
                    async for chunk in chunks:
                        attempts.on_chunk(chunk)
                        yield chunk
                return
            except RpcError as e:
                wait_s = attempts.on_error(e)
                self.num_retries += 1
            await asyncio.sleep(wait_s)

    async def _call(self, stub, message) -> AsyncIterator[TokenChunk]:
        call = stub.Generate(message, timeout=self.timeout)
        try:
            async for msg in call:
                yield chunk_from_pb(msg)
        except grpc.RpcError as e:
            raise RpcError.wrap(e, tls=self._tls is not None) from e
        finally:
            call.cancel()

    async def generate(self, **request) -> Completion:
        result = Completion()
        async for chunk in self.stream(**request):
            result.add(chunk)
        return result

    async def _unary(self, method: str, msg):
        try:
            return await getattr(self._stub, method)(msg, timeout=self.timeout)
        except grpc.RpcError as e:
            raise RpcError.wrap(e, tls=self._tls is not None) from e

    async def abort(self, request_id: str) -> bool:
        resp = await self._unary("Abort", common_pb2.AbortRequest(request_id=request_id))
        return resp.found

    async def get_sequence(self, request_id: str) -> SequenceInfo:
        return _sequence_info(await self._unary(
            "GetSequence", router_pb2.GetSequenceRequest(request_id=request_id)))

    async def list_workers(self) -> list[WorkerSummary]:
        resp = await self._unary("ListWorkers", router_pb2.ListWorkersRequest())
        return [_worker_summary(w) for w in resp.workers]

    async def migrate(self, request_id: str, target_worker_id: str = "",
                      kind: str = "full") -> MigrationResult:
        resp = await self._unary("Migrate", _migrate_request(request_id, target_worker_id,
                                                             kind))
        return _migration_result(resp)

    async def drain(self, worker_id: str) -> tuple[int, int]:
        resp = await self._unary("Drain", router_pb2.DrainRequest(worker_id=worker_id))
        return resp.num_migrated, resp.num_failed

    async def undrain(self, worker_id: str) -> bool:
        resp = await self._unary("Undrain", router_pb2.UndrainRequest(worker_id=worker_id))
        return resp.was_draining

