"""What the test environment must not hold.

slotmesh's top-level package `kernels` shares its import name with Hugging Face's
`kernels` distribution. transformers 5.25 requires that distribution and, finding it
installed, imports `kernels` (integrations/hub_kernels.py) — which resolves to slotmesh's
package and fails every `from_pretrained`. pyproject's dev extra keeps transformers below
5.25, so the distribution is never installed.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from tests.paths import REPO


def test_hugging_faces_kernels_distribution_is_not_installed() -> None:
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("kernels")
    import kernels

    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"  # slotmesh's
    import transformers.integrations.hub_kernels  # noqa: F401  (imports cleanly)
