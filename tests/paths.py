"""Where tests find the PyPI-shipped model files: the same cache the CLI uses, so the
README's two commands fetch each model once. $SLOTMESH_TEST_CACHE overrides it."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the repository root, wherever a test sits


def model_cache_dir() -> Path:
    path = Path(os.environ.get("SLOTMESH_TEST_CACHE") or Path.home() / ".cache" / "slotmesh")
    path.mkdir(parents=True, exist_ok=True)
    return path
