"""The contract: generated code is fresh, every message and field is commented, the layout
is buf's (`protos/` the proto root, `buf lint` clean), the wheel ships the .proto files, and
the router side imports no torch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from protos.generate import (
    PACKAGE_DIR,
    PROTO_DIR,
    PROTO_ROOT,
    ROOT,
    proto_files,
    python_imports,
    stale_files,
)


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


def test_layout_follows_the_proto_root() -> None:
    """What buf's PACKAGE_DIRECTORY_MATCH and import rules ask, checked without buf: each
    file's package is its folder under protos/, and every import of ours names a file
    relative to protos/ (so `protoc -I protos` resolves it, whatever the language)."""
    for path in proto_files():
        text = path.read_text()
        package = re.search(r"^package ([\w.]+);", text, re.MULTILINE)[1]
        assert Path(*package.split(".")) == path.parent.relative_to(PROTO_ROOT) == PACKAGE_DIR
        for imported in re.findall(r'^import "([^"]+)";', text, re.MULTILINE):
            if imported.startswith("google/"):
                continue
            assert not imported.startswith("protos/"), f"{path.name}: import {imported}"
            assert (PROTO_ROOT / imported).is_file(), f"{path.name}: import {imported}"


def test_generated_modules_register_the_proto_root_names() -> None:
    """Descriptors (what server reflection hands grpcurl) carry slotmesh/v1/… names, while
    the Python modules stay protos.slotmesh.v1.*."""
    from protos.slotmesh.v1 import common_pb2, router_pb2, worker_pb2

    assert router_pb2.DESCRIPTOR.name == "slotmesh/v1/router.proto"
    assert [d.name for d in worker_pb2.DESCRIPTOR.dependencies] == ["slotmesh/v1/common.proto"]
    assert common_pb2.GenerateRequest.__module__ == "protos.slotmesh.v1.common_pb2"


def test_python_imports_rewrites_only_what_it_knows() -> None:
    generated = ("from slotmesh.v1 import common_pb2 as slotmesh_dot_v1_dot_common__pb2\n"
                 "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'slotmesh.v1.x_pb2', _g)\n")
    assert python_imports(generated) == (
        "from protos.slotmesh.v1 import common_pb2 as slotmesh_dot_v1_dot_common__pb2\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'protos.slotmesh.v1.x_pb2', _g)\n")
    with pytest.raises(RuntimeError, match=r"import slotmesh\.v1\.common_pb2"):
        python_imports("import slotmesh.v1.common_pb2\n")


@pytest.mark.slow  # the buf binary
def test_buf_lint_is_clean() -> None:
    buf = Path(sys.executable).parent / "buf"
    assert buf.exists(), "buf comes with the dev extras (buf-bin)"
    out = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow  # builds the wheel in a subprocess
def test_wheel_ships_the_protos_and_they_compile_from_its_proto_root(tmp_path) -> None:
    source = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info behind
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("worker", "services", "kernels", "protos"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # build isolation: the build gets pyproject's setuptools>=77, whatever the venv holds
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "--quiet", "-w", str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("slotmesh-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".proto")}
    assert shipped == {f"{PROTO_DIR.as_posix()}/{p.name}" for p in proto_files()}

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    from grpc_tools import protoc

    argv = ["protoc", f"-I{site / 'protos'}", f"--descriptor_set_out={tmp_path / 'set.pb'}",
            "slotmesh/v1/router.proto", "slotmesh/v1/worker.proto"]
    assert protoc.main(argv) == 0
