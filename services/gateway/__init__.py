"""The OpenAI-compatible HTTP gateway: `/v1/completions`, `/v1/chat/completions`,
`/v1/models`, `/health` and `/metrics` in front of the router's gRPC `Generate` stream.

It owns no sequence state: every choice of a request is one `Router.Generate` stream,
the caller's bearer token goes with it (the router checks tokens and limits), and a
client that hangs up cancels the streams, which aborts the sequences on their workers.
OpenAI JSON is parsed into typed requests (`protocol`), answered from `TokenChunk`s
(`responses`), and every failure — ours or the router's status — becomes OpenAI's error
shape with the HTTP status of the one error table (`errors`).

Why Starlette and not FastAPI: the gateway needs routing, streaming responses and an
ASGI app, which is all Starlette; FastAPI adds pydantic models whose validation errors
are 422s in FastAPI's own shape, while OpenAI clients expect a 400 whose `param` names
the field — so the request checks are ours either way (`protocol.py`, the same
"field: message" errors as the gRPC edge). uvicorn serves it.
"""
