"""Every ```python block of the README runs as written, against a real cluster (Redis,
two routers, two workers, the HTTP gateway, over loopback) on a tiny random Llama.

The README talks to the router of `slotmesh up` (127.0.0.1:50051), a second replica
(127.0.0.1:50052), the gateway of `slotmesh serve` (http://127.0.0.1:8000/v1) and the
model smollm2-135m. The substitutions swap exactly those strings for this cluster's
addresses and nothing else: the rest of each block runs verbatim, each in a fresh
namespace, in README order. The tiny model's folder is named smollm2-135m, so the gateway
serves it under the README's name; blocks that load the model in-process get the folder's
path in its place. A block that cannot run as written (a placeholder path) belongs in
inline code, not in a ```python fence.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.cluster_harness import is_idle, tiny_cluster, wait_until

pytestmark = pytest.mark.cluster  # real Redis and server processes

README = Path(__file__).resolve().parent.parent / "README.md"
ROUTER, SECOND_ROUTER, MODEL = "127.0.0.1:50051", "127.0.0.1:50052", '"smollm2-135m"'
GATEWAY = "http://127.0.0.1:8000/v1"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python fence, in order."""
    return [(text.count("\n", 0, m.start()) + 2, m[1])
            for m in re.finditer(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)]


BLOCKS = python_blocks(README.read_text())


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama in a folder named as the README's model (the name it is served by)."""
    path = tmp_path_factory.mktemp("readme-model") / "smollm2-135m"
    shutil.copytree(tiny_model_dir("llama"), path)
    return path


@pytest.fixture(scope="module")
def cluster(model_dir, redis_server, tmp_path_factory):
    # paced steps (>= 10 ms): the README's 256-token stories are still running when its
    # next lines look at, migrate, drain or abort them
    with tiny_cluster(model_dir, redis_server.url, tmp_path_factory.mktemp("readme-logs"),
                      min_step_ms=10, http_port=0) as c:
        c.add_router()
        yield c


@pytest.fixture(scope="module")
def substitutions(cluster, model_dir) -> dict[str, str]:
    return {ROUTER: cluster.router_address, SECOND_ROUTER: cluster.routers[1].address,
            GATEWAY: cluster.gateway_url, MODEL: repr(str(model_dir))}


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(BLOCKS) == README.read_text().count("```python") >= 4  # none missed
    assert all(ROUTER in code or MODEL in code for _, code in BLOCKS)


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs(line, code, cluster, substitutions, capsys) -> None:
    over_http = GATEWAY in code  # then the model goes by its served name, the README's
    for written, actual in substitutions.items():
        if not (written == MODEL and over_http):
            code = code.replace(written, actual)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out, "every README block shows its result"
    for w in cluster.workers:  # a block leaves nothing running behind it
        wait_until(lambda w=w: is_idle(w.address), 10, f"{w.name} idle with all blocks free")
