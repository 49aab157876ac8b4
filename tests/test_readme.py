"""Every ```python block of the README runs as written, against a real cluster (Redis,
two routers, two workers over loopback) on a tiny random Llama.

The README talks to the router of `slotmesh up` (127.0.0.1:50051), a second replica
(127.0.0.1:50052) and the model smollm2-135m; SUBSTITUTIONS swaps exactly those three
strings for this cluster's addresses and the tiny model's folder, and nothing else: the
rest of each block runs verbatim, each in a fresh namespace, in README order. A block that
cannot run as written (a placeholder path) belongs in inline code, not in a ```python
fence.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cluster_harness import is_idle, tiny_cluster, wait_until

pytestmark = pytest.mark.cluster  # real Redis and server processes

README = Path(__file__).resolve().parent.parent / "README.md"
ROUTER, SECOND_ROUTER, MODEL = "127.0.0.1:50051", "127.0.0.1:50052", '"smollm2-135m"'


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python fence, in order."""
    return [(text.count("\n", 0, m.start()) + 2, m[1])
            for m in re.finditer(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)]


BLOCKS = python_blocks(README.read_text())


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, redis_server, tmp_path_factory):
    # paced steps (>= 10 ms): the README's 256-token stories are still running when its
    # next lines look at, migrate, drain or abort them
    with tiny_cluster(tiny_model_dir("llama"), redis_server.url,
                      tmp_path_factory.mktemp("readme-logs"), min_step_ms=10) as c:
        c.add_router()
        yield c


@pytest.fixture(scope="module")
def substitutions(cluster, tiny_model_dir) -> dict[str, str]:
    return {ROUTER: cluster.router_address, SECOND_ROUTER: cluster.routers[1].address,
            MODEL: repr(str(tiny_model_dir("llama")))}


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(BLOCKS) == README.read_text().count("```python") >= 4  # none missed
    assert all(ROUTER in code or MODEL in code for _, code in BLOCKS)


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs(line, code, cluster, substitutions, capsys) -> None:
    for written, actual in substitutions.items():
        code = code.replace(written, actual)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out, "every README block shows its result"
    for w in cluster.workers:  # a block leaves nothing running behind it
        wait_until(lambda w=w: is_idle(w.address), 10, f"{w.name} idle with all blocks free")
