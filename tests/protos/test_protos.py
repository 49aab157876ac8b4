"""The contract: generated code is fresh, every message and field is commented, and the
router side imports no torch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from protos.generate import PROTO_DIR, ROOT, proto_files, stale_files


def test_generated_code_is_fresh() -> None:
    assert stale_files() == [], "run: python -m protos.generate"


def test_every_message_field_and_rpc_is_commented() -> None:
    decl = re.compile(r"^\s*(message|enum|service|rpc|oneof)\s+\w+|^\s*(optional\s+|repeated\s+)?"
                      r"[\w.]+\s+\w+\s*=\s*\d+;")
    missing = []
    for path in proto_files():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not decl.match(line):
                continue
            if not lines[i - 1].strip().startswith("//"):
                missing.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not missing, "uncommented declarations:\n" + "\n".join(missing)
    assert {p.name for p in proto_files()} == {"common.proto", "router.proto", "worker.proto"}
    assert all("package slotmesh.v1;" in p.read_text() for p in proto_files())
    assert (ROOT / PROTO_DIR / "router_pb2.pyi").exists()


@pytest.mark.slow  # a fresh interpreter
def test_router_and_client_import_no_torch() -> None:
    code = ("import sys, services.router.server, services.client.clients, services.local.cluster, "
            "services.cli.main, services.gateway.server, services.gateway.command; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
