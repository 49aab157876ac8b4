"""gRPC plumbing shared by the router and the worker's edge: servers, channels, the error
interceptor (`plumbing`), protobuf ⇄ dataclass conversion (`convert`, the only field-by-field
reader of protobuf), Prometheus metrics, the `Periodic` task helper and the health probe."""
