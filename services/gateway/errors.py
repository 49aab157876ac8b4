"""Failures → OpenAI's error JSON with an HTTP status, from the one error table.

A domain error raised here gets its gRPC status from `services/rpc/plumbing.status_of`
(the table the gRPC servers answer with) and a router's refusal arrives with its status;
either way the status picks the HTTP code below, so the HTTP and the gRPC API can never
disagree about what a failure is. INVALID_ARGUMENT messages start with the field's name
("max_tokens: must be >= 1"), which becomes `param` in OpenAI's names.
"""

from __future__ import annotations

import re

import grpc

from services.client.clients import RpcError
from services.gateway.protocol import openai_param
from services.rpc.plumbing import status_of
from worker.vocab.errors import InvalidRequestError, NotFoundError

# gRPC status → (HTTP status, OpenAI error type)
_HTTP_OF: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
}
_INTERNAL = (500, "internal_error")
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class ModelNotFoundError(NotFoundError):
    """A request names a model the cluster does not serve."""

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(f"model: the model {model!r} does not exist; this cluster serves "
                         f"{', '.join(served) or 'no model right now'}")


def http_error(error: Exception, *, is_chat: bool = False,
               max_tokens_field: str = "max_tokens") -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) of a failure."""
    if isinstance(error, RpcError):
        code, message = error.code, error.message
    else:
        code, message = status_of(error)
    status, kind = _HTTP_OF.get(code, _INTERNAL)
    param = None
    if isinstance(error, InvalidRequestError):
        param = error.field
    elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        match = _FIELD.match(message)
        param = match.group(1) if match else None
    if param is not None:
        param = openai_param(param, is_chat=is_chat, max_tokens_field=max_tokens_field)
    return status, error_body(message, kind, param, _code(error, code))


def _code(error: Exception, code: grpc.StatusCode) -> str:
    if isinstance(error, ModelNotFoundError):
        return "model_not_found"
    return code.name.lower()


def error_body(message: str, kind: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
