"""gRPC plumbing shared by the router and the worker servers.

The one error interceptor lives here: handlers raise domain errors (worker/vocab/errors.py) or
let an upstream call's status through (`UpstreamError`), and the interceptor turns them
into statuses at the edge. Every server also serves grpc.health.v1 and reflection.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.security.tls import ChannelTls, TlsConfig
from worker.vocab.errors import (
    CapacityError,
    DataLossError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    SlotmeshError,
    UnavailableError,
)

log = logging.getLogger(__name__)

# Generous but bounded: a prompt of 128k token ids is ~0.7 MB on the wire.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
KEEPALIVE_MS = 30_000
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
)
SERVER_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Our callers ping every KEEPALIVE_MS while a call is open. gRPC servers by default
    # count a ping less than 5 minutes after the last one as a strike when no data flows
    # (a stream queued behind others, a long prefill, a reader that stopped) and, after
    # two, close the connection with GOAWAY too_many_pings: every stream on it would
    # end. Accept our cadence.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS * 2 // 3),
)

# Most specific class first: the first isinstance match wins.
_STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (DataLossError, grpc.StatusCode.DATA_LOSS),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)


class UpstreamError(SlotmeshError):
    """A call to another slotmesh server failed with a status that is relayed as is."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError, prefix: str = "") -> UpstreamError:
        return cls(error.code(), prefix + (error.details() or ""))


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a domain error is answered with."""
    if isinstance(error, UpstreamError):
        return error.code, error.details
    for cls, code in _STATUS_OF:
        if isinstance(error, cls):
            return code, str(error)
    if isinstance(error, SlotmeshError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server log"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by any handler to a status; nothing else does. Requests
    are parsed inside the handler too, so bytes that are not a valid message get
    INVALID_ARGUMENT instead of gRPC's generic INTERNAL."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        parse = _parser(handler.request_deserializer, method)
        kwargs = {"request_deserializer": None,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(_parsed(handler.unary_unary, parse, False), method), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(_parsed(handler.unary_stream, parse, False), method), **kwargs)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(_parsed(handler.stream_stream, parse, True), method), **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(_parsed(handler.stream_unary, parse, True), method), **kwargs)
        return handler


def _parser(deserializer: Callable | None, method: str) -> Callable:
    if deserializer is None:
        return lambda raw: raw
    rpc_name = method.rsplit("/", 1)[-1]

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as e:  # protobuf's DecodeError and kin
            raise InvalidRequestError("request", f"not a valid {rpc_name} request message "
                                                 f"({type(e).__name__})") from e

    return parse


def _parsed(behavior: Callable, parse: Callable, streaming: bool) -> Callable:
    """behavior, fed parsed requests (each item of a request stream as it comes)."""
    if not streaming:
        return lambda request, context: behavior(parse(request), context)

    async def requests(raw_iterator):
        async for raw in raw_iterator:
            yield parse(raw)

    return lambda request_iterator, context: behavior(requests(request_iterator), context)


async def _abort(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=error)
    else:
        log.info("%s: %s %s", method, code.name, message)
    await context.abort(code, message)


def _wrap_unary(behavior: Callable, method: str) -> Callable:
    async def wrapper(request, context):
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - every handler error is mapped here
            await _abort(context, method, e)

    return wrapper


def _wrap_stream(behavior: Callable, method: str) -> Callable:
    async def wrapper(request, context) -> AsyncIterator:
        try:
            responses = behavior(request, context)
            if inspect.isawaitable(responses):  # writes through context.write (health Watch)
                await responses
                return
            async for response in responses:
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - every handler error is mapped here
            await _abort(context, method, e)

    return wrapper


def make_server(interceptors: list | None = None) -> grpc.aio.Server:
    """A server whose handlers run inside `interceptors` (outermost first, e.g. the
    router's bearer-token check), then the error mapping."""
    return grpc.aio.server(interceptors=[*(interceptors or ()), ErrorInterceptor()],
                           options=SERVER_OPTIONS)


def bind(server: grpc.aio.Server, host: str, port: int, tls: TlsConfig | None = None) -> int:
    """Listen on host:port (0 = any free port), with TLS when `tls` is given (mutual TLS
    when it requires client certificates); return the port actually bound."""
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, tls.server_credentials()) if tls is not None
             else server.add_insecure_port(address))
    if bound == 0:
        raise UnavailableError(f"cannot listen on {host}:{port} (in use or not permitted)")
    return bound


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]
                              ) -> health.aio.HealthServicer:
    """Serve grpc.health.v1 (NOT_SERVING until `set_serving`) and server reflection."""
    names = list(service_names)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME], server)
    return servicer


# The health entry that means "the process is alive" (a Kubernetes liveness probe's
# `service`): SERVING from the first time the server is ready and never NOT_SERVING
# again, so a draining worker is not restarted. Readiness is "" and the service names.
LIVENESS_SERVICE = "liveness"


async def set_serving(servicer: health.aio.HealthServicer, service_names: Iterable[str],
                      serving: bool) -> None:
    """Readiness: "" and every service name flip together (NOT_SERVING while draining or
    shutting down); the liveness entry turns SERVING with the first ready and stays."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ["", *service_names]:
        await servicer.set(name, status)
    if serving:
        await servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)


def channel(address: str, token: str | None = None, *, tls: ChannelTls | None = None,
            metadata: tuple[tuple[str, str], ...] = ()) -> grpc.aio.Channel:
    """An aio channel, over TLS when `tls` is given. Every call carries the token (e.g.
    $SLOTMESH_TOKEN for a router that checks bearer tokens) and `metadata` (the cluster
    credential a secured worker asks for, services/security/cluster_auth.py)."""
    from services.security.auth import token_interceptors

    interceptors = token_interceptors(token, metadata)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                         interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.credentials(),
                                   options=CHANNEL_OPTIONS + tls.options(),
                                   interceptors=interceptors)


def dial_tls(tls: TlsConfig | None) -> ChannelTls | None:
    """How a process with these server settings dials the other slotmesh servers."""
    return tls.channel() if tls is not None else None


def blocking_channel(address: str, token: str | None = None, *, tls: ChannelTls | None = None,
                     metadata: tuple[tuple[str, str], ...] = ()) -> grpc.Channel:
    """The same for blocking callers (the Client, `slotmesh seq`, benchmarks)."""
    from services.security.auth import sync_token_interceptors

    if tls is None:
        ch = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        ch = grpc.secure_channel(address, tls.credentials(),
                                 options=CHANNEL_OPTIONS + tls.options())
    interceptors = sync_token_interceptors(token, metadata)
    return grpc.intercept_channel(ch, *interceptors) if interceptors else ch
