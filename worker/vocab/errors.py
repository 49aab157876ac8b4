"""Domain errors. One interceptor at the gRPC edge (services/rpc/plumbing.py) maps each class to
one status code; nothing inside raises gRPC errors."""

from __future__ import annotations


class SlotmeshError(Exception):
    """Base class of every error slotmesh raises on purpose."""


class InvalidRequestError(SlotmeshError, ValueError):
    """A request field is out of range. `field` names it; the message gives the range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def renamed(self, field: str) -> InvalidRequestError:
        """The same complaint about `field`: an edge names its own field for an inner one."""
        return InvalidRequestError(field, self.message)


class ModelLoadError(SlotmeshError):
    """A model file or directory is missing, corrupt, truncated or unsupported."""


class UnknownModelError(InvalidRequestError):
    """A model name that is neither a known PyPI-shipped model nor a path."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            "model", f"unknown model {name!r}; known names: {', '.join(known)}, or a path"
        )


class CapacityError(SlotmeshError):
    """The KV pool or the queue cannot take a request, even after preemption."""


class NotFoundError(SlotmeshError):
    """No running request (or worker) has the given id."""


class UnavailableError(SlotmeshError):
    """No worker can take the request, a worker went away, or a required store is down."""


class PreconditionError(SlotmeshError):
    """The request is well-formed but cannot apply here (e.g. a snapshot of another model)."""


class DataLossError(SlotmeshError):
    """Data arrived damaged: a snapshot whose checksum or structure does not hold."""


class PermissionDeniedError(SlotmeshError):
    """The caller or the data lacks the cluster's credentials (e.g. an unauthenticated
    snapshot on a cluster that requires a MAC)."""
