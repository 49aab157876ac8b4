"""`python -m services.rpc.health_probe [--service NAME] HOST:PORT`: one grpc.health.v1 Check,
printing the status (SERVING, NOT_SERVING, or why the check failed) and exiting 0 when
SERVING and 1 otherwise (NOT_SERVING, unknown service, unreachable).

The containers' HEALTHCHECK uses it (Kubernetes probes gRPC health natively, but not
over TLS: a TLS server needs this probe as an exec probe). It reads the same
$SLOTMESH_TLS_* variables as the server it probes (or --tls-* flags), so in the server's
own container it dials with TLS, presenting the server's certificate where mutual TLS
requires one. It imports only grpc and the health stubs, so it costs no torch import in
the worker image and works in the slim router image.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.rpc.plumbing import blocking_channel
from services.security.tls import ChannelTls, add_tls_flags, tls_config
from worker.vocab.errors import InvalidRequestError


def check(address: str, service: str = "", timeout_s: float = 3.0,
          tls: ChannelTls | None = None) -> bool:
    return status(address, service, timeout_s, tls) == "SERVING"


def status(address: str, service: str = "", timeout_s: float = 3.0,
           tls: ChannelTls | None = None) -> str:
    """The health status's name, or the gRPC error that kept the check from an answer."""
    with blocking_channel(address, tls=tls) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.rpc.health_probe",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--service", default="",
                   help='health entry: "" = ready (default), "liveness" = alive, or a '
                        "service name")
    p.add_argument("--timeout", type=float, default=3.0)
    add_tls_flags(p, server=False)
    args = p.parse_args(argv)
    try:
        config = tls_config(args, server=False)
    except InvalidRequestError as e:
        print(f"health_probe: error: {e}", file=sys.stderr)
        return 2
    tls = config.channel() if config is not None else None
    answer = status(args.address, args.service, args.timeout, tls)
    print(f"{args.address} {args.service or '(ready)'}: {answer}", flush=True)
    return 0 if answer == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
