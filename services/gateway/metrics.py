"""The gateway's Prometheus metrics, served at its own /metrics (same port as the API).

Latencies are measured from the HTTP request's arrival, so they include the gateway's
own share on top of the router's `slotmesh_router_*` figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.rpc.metrics import LatencyHistograms, StreamTimer


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = LatencyHistograms.create(self.registry, "slotmesh_gateway")
        self.requests = Counter("slotmesh_gateway_requests",
                                "HTTP generation requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.in_flight = Gauge("slotmesh_gateway_requests_in_flight",
                               "Generation requests being answered", registry=self.registry)
        self.tokens = Counter("slotmesh_gateway_generation_tokens",
                              "Tokens returned over HTTP", registry=self.registry)

    def timer(self, endpoint: str) -> RequestTimer:
        self.in_flight.inc()
        return RequestTimer(metrics=self, endpoint=endpoint,
                            stream=StreamTimer(self.latency))


@dataclass(slots=True, kw_only=True)
class RequestTimer:
    """One request's latencies and its outcome, counted once."""

    metrics: GatewayMetrics
    endpoint: str
    stream: StreamTimer
    finished: bool = field(default=False)

    def on_tokens(self, num_tokens: int) -> None:
        self.stream.on_tokens(num_tokens)
        self.metrics.tokens.inc(num_tokens)

    def finish(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.endpoint, str(status)).inc()
        if status == 200:
            self.stream.on_finish()
