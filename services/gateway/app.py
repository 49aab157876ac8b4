"""The Starlette app: OpenAI routes over the router's Generate stream.

A request becomes one Generate stream per choice (prompt i, sample j → choice i*n + j,
request id `<response id>-<choice>`), all opened before the HTTP answer starts, so a
refusal (400/401/404/429/503) is the answer's status even for `stream: true`. A
streaming answer merges the choices' chunks in arrival order; when the client hangs up,
the response's disconnect watcher cancels the generator, whose `finally` cancels every
Generate call: the router cancels the worker call and the worker aborts the sequence and
frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.client.clients import RpcError
from services.gateway.config import GatewayConfig
from services.gateway.errors import ModelNotFoundError, error_body, http_error
from services.gateway.metrics import GatewayMetrics
from services.gateway.protocol import GatewayRequest, parse_chat, parse_completion
from services.gateway.responses import Choice, ResponseHead
from services.gateway.upstream import RouterStream, ServedModel, Upstream
from services.rpc.convert import GenerationRequest, request_to_pb
from services.rpc.plumbing import MAX_MESSAGE_BYTES, dial_tls
from services.security.auth import UNAUTHENTICATED, AuthInterceptor
from worker.vocab.errors import InvalidRequestError, UnavailableError

log = logging.getLogger(__name__)

_NOT_SUPPORTED = {
    "/v1/embeddings": "embeddings are not supported yet",
    "/v1/responses": "the Responses API is not supported; use /v1/chat/completions",
    "/v1/images/generations": "images are not supported",
    "/v1/audio/transcriptions": "audio is not supported",
}


class _EventStream(StreamingResponse):
    """An SSE response whose generator is closed and whose streams are cancelled however
    the response ends: a client that hangs up cancels the send loop, possibly before the
    generator ever ran (then closing it runs no `finally`, hence `cleanup`)."""

    media_type = "text/event-stream"

    def __init__(self, content, cleanup: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        self.cleanup = cleanup

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.cleanup()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Gateway:
    """The app's state: the router connection, the served models, the metrics."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.upstream: Upstream | None = None
        self._auth = AuthInterceptor(list(config.auth_tokens)) if config.auth_tokens else None
        self._models: list[ServedModel] = []
        self._models_at = float("-inf")

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        self.upstream = Upstream(self.config.router_address, tls=dial_tls(self.config.tls),
                                 token=self.config.router_token,
                                 timeout_s=self.config.request_timeout_s)
        try:
            yield
        finally:
            await self.upstream.close()

    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route("/{path:path}", self.not_found,
                  methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ]
        return Starlette(routes=routes, lifespan=self.lifespan)

    # -- the small endpoints ---------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        try:
            self._check_token(request)
            models = await self._served_models(refresh=False)
        except Exception as e:  # noqa: BLE001 - every failure is an OpenAI error answer
            return self._error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "slotmesh",
             "max_model_len": m.max_model_len} for m in models]})

    async def health(self, _request: Request) -> Response:
        """Ready when the router lists a routable worker (a readiness probe)."""
        try:
            models = await self._served_models(refresh=True)
        except Exception as e:  # noqa: BLE001 - the probe's answer says why
            return JSONResponse({"status": "unavailable", "reason": str(e)}, status_code=503)
        workers = sum(m.num_workers for m in models)
        return JSONResponse({"status": "ok" if workers else "no worker", "workers": workers},
                            status_code=200 if workers else 503)

    async def metrics_text(self, _request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(self, request: Request) -> Response:
        path = request.url.path
        message = _NOT_SUPPORTED.get(path, f"no route {request.method} {path}; slotmesh serves "
                                           "/v1/completions, /v1/chat/completions, /v1/models")
        return JSONResponse(error_body(message, "not_found_error", None, "not_found"),
                            status_code=404)

    # -- generation ------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion, "completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat, "chat_completions")

    async def _generate(self, request: Request, parse: Callable, endpoint: str) -> Response:
        timer = self.metrics.timer(endpoint)
        req: GatewayRequest | None = None
        try:
            token = self._check_token(request)
            req = parse(await _json_body(request), self.config.default_max_tokens)
            model, max_model_len = await self._model(req.model)
            if max_model_len:
                req = req.fit_context(max_model_len)
            head = ResponseHead(id=f"{'chatcmpl' if req.is_chat else 'cmpl'}-"
                                   f"{uuid.uuid4().hex}", created=int(time.time()),
                                model=model, is_chat=req.is_chat,
                                num_logprobs=req.num_logprobs)
            streams = await self._open_all(req, head.id, token)
        except Exception as e:  # noqa: BLE001 - every failure is an OpenAI error answer
            return self._error(e, req, timer)
        if req.stream:
            def cleanup() -> None:
                _cancel(streams)
                timer.finish(499)  # a no-op when the body ran to its end

            return _EventStream(self._events(head, req, streams, timer), cleanup)
        return await self._whole_answer(request, head, req, streams, timer)

    async def _whole_answer(self, request: Request, head: ResponseHead, req: GatewayRequest,
                            streams: list[RouterStream], timer) -> Response:
        """A non-streaming answer; a client that hangs up meanwhile cancels the streams."""
        collect = asyncio.create_task(self._collect(streams, timer))
        hangup = asyncio.create_task(_disconnected(request))
        await asyncio.wait({collect, hangup}, return_when=asyncio.FIRST_COMPLETED)
        hangup.cancel()
        if not collect.done():  # the client went away: stop generating for it
            collect.cancel()
            _cancel(streams)
            timer.finish(499)
            return Response(status_code=499)
        try:
            choices = collect.result()
        except Exception as e:  # noqa: BLE001
            return self._error(e, req, timer)
        timer.finish(200)
        return JSONResponse(head.response(choices, req.n))

    async def _open_all(self, req: GatewayRequest, response_id: str,
                        token: str | None) -> list[RouterStream]:
        """One Generate stream per choice, each past its first chunk; if any is refused,
        the others are cancelled and the first refusal is raised."""
        messages = [request_to_pb(GenerationRequest(
            request_id=f"{response_id}-{i * req.n + j}", prompt=prompt,
            params=req.choice_params(j)))
            for i, prompt in enumerate(req.prompts) for j in range(req.n)]
        results = await asyncio.gather(*(self.upstream.open(m, token) for m in messages),
                                       return_exceptions=True)
        streams = [r for r in results if isinstance(r, RouterStream)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            _cancel(streams)
            raise failed[0]
        return streams

    async def _collect(self, streams: list[RouterStream], timer) -> list[Choice]:
        choices = [Choice(index=i) for i in range(len(streams))]

        async def drain(choice: Choice, stream: RouterStream) -> None:
            async for chunk in stream.chunks():
                timer.on_tokens(len(chunk.token_ids))
                choice.add(chunk)
                _raise_if_failed(chunk)

        try:
            await asyncio.gather(*(drain(c, s) for c, s in zip(choices, streams, strict=True)))
        finally:
            _cancel(streams)
        return choices

    async def _events(self, head: ResponseHead, req: GatewayRequest,
                      streams: list[RouterStream], timer) -> AsyncIterator[str]:
        """The SSE body: role chunks (chat), the choices' chunks as they come, the usage
        chunk when asked, then [DONE]. A failure mid-stream is an error event."""
        choices = [Choice(index=i) for i in range(len(streams))]
        status = 200
        try:
            if head.is_chat:
                for i in range(len(streams)):
                    yield _sse(head.role_chunk(i))
            try:
                async for index, chunk in _merged(streams):
                    timer.on_tokens(len(chunk.token_ids))
                    choices[index].add(chunk)
                    if chunk.text or chunk.finish_reason or (head.num_logprobs is not None
                                                             and chunk.token_ids):
                        yield _sse(head.chunk(index, chunk))
            except Exception as e:  # noqa: BLE001 - a failure after the 200: an event
                status, body = http_error(e, is_chat=req.is_chat)
                yield _sse(body)
            else:
                if req.include_usage:
                    yield _sse(head.usage_chunk(choices, req.n))
            yield "data: [DONE]\n\n"
        except BaseException:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            _cancel(streams)
            timer.finish(status)

    # -- helpers ---------------------------------------------------------------------------

    def _check_token(self, request: Request) -> str | None:
        """The caller's bearer token (forwarded to the router). With the tokens file
        here too, an unknown token is refused before the router is called."""
        header = request.headers.get("authorization", "")
        token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
        if self._auth is not None and self._auth.authenticate(
                [("authorization", header)]) is None:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        return token or None

    async def _served_models(self, refresh: bool) -> list[ServedModel]:
        now = time.monotonic()
        if refresh or now - self._models_at > self.config.models_ttl_s:
            self._models = await self.upstream.served_models()
            self._models_at = now
        return self._models

    async def _model(self, requested: str | None) -> tuple[str, int]:
        """The served model the request is for, with its context (0: unknown): 404 for
        another name, 503 for none."""
        try:
            models = await self._served_models(refresh=False)
            if requested is not None and requested not in {m.name for m in models}:
                models = await self._served_models(refresh=True)  # a worker may be new
        except RpcError as e:
            if e.code.name not in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
                raise
            # the gateway's own token may not list workers: no model check then
            log.warning("cannot list the router's workers (%s); model names go unchecked", e)
            return requested or "unknown", 0
        by_name = {m.name: m for m in models}
        if not by_name:
            raise UnavailableError("no worker available")
        if requested is None:
            return models[0].name, models[0].max_model_len
        if requested not in by_name:
            raise ModelNotFoundError(requested, list(by_name))
        return requested, by_name[requested].max_model_len

    def _error(self, error: Exception, req: GatewayRequest | None = None,
               timer=None) -> Response:
        status, body = http_error(
            error, is_chat=req.is_chat if req else False,
            max_tokens_field=req.max_tokens_field if req else "max_tokens")
        if status >= 500:
            log.log(logging.ERROR if status == 500 else logging.INFO, "%s: %s", status,
                    body["error"]["message"], exc_info=error if status == 500 else None)
        if timer is not None:
            timer.finish(status)
        return JSONResponse(body, status_code=status)


async def _merged(streams: list[RouterStream]) -> AsyncIterator[tuple[int, object]]:
    """(choice index, chunk) of every stream in arrival order; the first failure raises.
    One stream (n=1, one prompt: the common case) is read directly, several through a
    queue fed by one task each."""
    if len(streams) == 1:
        async for chunk in streams[0].chunks():
            _raise_if_failed(chunk)
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                remaining -= 1
                continue
            yield index, chunk
    finally:
        for task in tasks:
            task.cancel()


async def _pump(index: int, stream: RouterStream, queue: asyncio.Queue) -> None:
    """Feed one choice's chunks to the merged stream: (index, chunk, None) per chunk,
    then (index, None, None) at its end or (index, None, error) when it failed."""
    try:
        async for chunk in stream.chunks():
            _raise_if_failed(chunk)
            await queue.put((index, chunk, None))
    except Exception as e:  # noqa: BLE001 - handed to the response
        await queue.put((index, None, e))
        return
    await queue.put((index, None, None))


def _cancel(streams: list[RouterStream]) -> None:
    """End every Generate call (a no-op on one that finished): the router cancels the
    worker call and the worker aborts the sequence, freeing its blocks."""
    for s in streams:
        s.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _raise_if_failed(chunk) -> None:
    if chunk.finish_reason == "error":
        raise RpcError(grpc.StatusCode.INTERNAL, f"generation failed on the worker: {chunk.error}")


async def _json_body(request: Request) -> object:
    """The parsed body, at most the gRPC message limit (16 MiB) read."""
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > MAX_MESSAGE_BYTES:
            raise InvalidRequestError("body", f"larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        return json.loads(data)
    except ValueError as e:
        raise InvalidRequestError("body", f"not valid JSON: {e}") from None
