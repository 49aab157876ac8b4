"""The Python SDK: `Client` (blocking) and `AsyncClient` for a router or a worker.

    from services.client import Client
"""

from services.client.clients import AsyncClient, Client, Completion, RetryPolicy, RpcError

__all__ = ["AsyncClient", "Client", "Completion", "RetryPolicy", "RpcError"]
