"""Shared fixtures: tiny random models on disk, engines over them, the model cache, Redis.

Markers: a module or test that starts Redis or server processes is marked `cluster`, one
that runs a subprocess or takes long `slow`; every other test is `unit` (added here), so
`pytest -m unit` is the fast in-process set. The redis_server fixture refuses unit tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.paths import model_cache_dir
from tests.tiny_models import make_tiny_model

_NOT_UNIT = ("cluster", "slow")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if not any(item.get_closest_marker(name) for name in _NOT_UNIT):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where the PyPI-shipped GGUF models are fetched to once and reused."""
    return model_cache_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> callable:
    made: dict[tuple[str, int], Path] = {}

    def get(family: str, window: int = 48) -> Path:
        key = (family, window)
        if key not in made:
            made[key] = make_tiny_model(family, tmp_path_factory.mktemp(f"{family}{window}"),
                                        window=window)
        return made[key]

    return get


@pytest.fixture(scope="module")
def redis_server(request):
    """A real redis-server on a free loopback port (installed with apt-get if missing)."""
    from services.local.redis_server import RedisServer

    if request.node.get_closest_marker("cluster") is None:
        raise pytest.UsageError(f"{request.node.nodeid}: uses Redis, so mark it `cluster`")

    server = RedisServer(install=True).start()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _unit_tests_on_one_thread(request):
    """Unit tests run torch on one thread (see one_thread): on the shared two-core machine
    that halves the unit set's time while another suite runs."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models gain nothing from a second, and on a
    shared two-core machine a second thread mostly waits (measured: the smollm2 fine-tune
    test took 15 s on one thread and 50 s on two while another suite ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
