"""`slotmesh gateway`: its flags and the config built from them (once, here)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from services.gateway.config import GatewayConfig
from services.security.tls import add_tls_flags, tls_config


def _default(name: str):
    from dataclasses import fields

    return next(f.default for f in fields(GatewayConfig) if f.name == name)


DESCRIPTION = ("Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
               "/metrics over HTTP (HTTPS with --tls-cert/--tls-key), forwarding each "
               "request to the router's Generate stream. The caller's `Authorization: "
               "Bearer` token goes to the router, which checks it; the gateway's own calls "
               "(ListWorkers, for /v1/models and /health) send $SLOTMESH_TOKEN, which must "
               "be an admin token when the router has a tokens file.")


def add_gateway_parser(sub) -> None:
    p = sub.add_parser("gateway", description=DESCRIPTION,
                       help="serve the OpenAI-compatible HTTP API in front of a router")
    add_gateway_flags(p)


def add_gateway_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default=os.environ.get("SLOTMESH_ROUTER_ADDRESS")
                   or _default("router_address"), metavar="HOST:PORT",
                   help="the router to forward to (default: $SLOTMESH_ROUTER_ADDRESS or "
                        "%(default)s)")
    p.add_argument("--host", default=_default("host"),
                   help="interface to listen on (default: %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=_default("port"),
                   help="HTTP port; 0 = any free port (default: %(default)s)")
    p.add_argument("--auth-tokens-file", type=Path,
                   default=os.environ.get("SLOTMESH_AUTH_TOKENS_FILE") or None,
                   help="the router's tokens file: refuse requests without a valid token "
                        "here already (default: $SLOTMESH_AUTH_TOKENS_FILE; unset: the "
                        "router alone checks)")
    p.add_argument("--default-max-tokens", type=int, default=_default("default_max_tokens"),
                   help="most tokens of a chat completion that gives no max_tokens "
                        "(default: %(default)s; text completions default to 16, as OpenAI's)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="deadline of each generation on the router (default: none)")
    add_tls_flags(p, server=True)
    p.set_defaults(func=cmd_gateway)


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    from services.security.auth import load_tokens

    if args.default_max_tokens < 1:
        from worker.vocab.errors import InvalidRequestError

        raise InvalidRequestError("--default-max-tokens", "must be >= 1")
    tls = tls_config(args, server=True)
    return GatewayConfig(
        host=args.host, port=args.port, router_address=args.router,
        router_token=os.environ.get("SLOTMESH_TOKEN") or None,
        auth_tokens=tuple(load_tokens(args.auth_tokens_file)) if args.auth_tokens_file
        else (),
        default_max_tokens=args.default_max_tokens, request_timeout_s=args.request_timeout,
        tls_cert_file=args.tls_cert if tls else None, tls_key_file=args.tls_key if tls else None,
        tls_ca_file=args.tls_ca, tls_require_client_cert=bool(tls and tls.require_client_cert),
        tls=tls)


def cmd_gateway(args: argparse.Namespace) -> int:
    import asyncio

    from services.gateway.server import serve

    return asyncio.run(serve(gateway_config(args)))
