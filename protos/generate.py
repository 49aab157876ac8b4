"""Regenerate the committed Python code from the .proto files.

    python -m protos.generate            # rewrite protos/slotmesh/v1/*_pb2*.py(i)
    python -m protos.generate --check    # exit 1 if the committed code is stale

`protos/` is the proto root (buf's layout): the files import each other as
`slotmesh/v1/common.proto` and any language compiles them with `protoc -I protos
slotmesh/v1/router.proto …`; descriptors (and server reflection) carry those names.
The same folder is the Python package `protos`, so the generated modules live at
`protos.slotmesh.v1.*_pb2`. protoc's Python generators derive an import's module from its
proto path and have no option for a package prefix, so `python_imports` adds it: it
rewrites exactly the generated `from slotmesh.v1 import …` lines and the module name the
message classes get (`__module__`), and fails if protoc ever writes one in another form.
grpcio-tools is pinned in the dev extra so the output is byte-stable.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("slotmesh/v1")  # under PROTO_ROOT: the proto package slotmesh.v1
PROTO_DIR = Path("protos") / PACKAGE_DIR  # under ROOT
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PYTHON_PACKAGE = "protos"  # the Python package that PROTO_ROOT is

_GENERATED_IMPORT = re.compile(r"^from slotmesh\.v1 import (\w+_pb2)( as \w+)?$", re.MULTILINE)
_MESSAGE_MODULE = re.compile(r"^(_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, )"
                             r"'slotmesh\.v1\.(\w+_pb2)'", re.MULTILINE)
_ANY_MODULE_OF_OURS = re.compile(r"^\s*(from|import) slotmesh\b.*$|'slotmesh\.v1\.\w+_pb2'",
                                 re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def python_imports(text: str) -> str:
    """Generated code's imports of slotmesh.v1 modules (and its classes' module), under
    `protos`."""
    text = _GENERATED_IMPORT.sub(rf"from {PYTHON_PACKAGE}.slotmesh.v1 import \1\2", text)
    text = _MESSAGE_MODULE.sub(rf"\1'{PYTHON_PACKAGE}.slotmesh.v1.\2'", text)
    if stray := _ANY_MODULE_OF_OURS.search(text):
        raise RuntimeError(f"protoc wrote an import python_imports does not know: {stray[0]!r}")
    return text


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto under protos/slotmesh/v1 into out_root/slotmesh/v1 (out_root
    plays the proto root); return the generated files."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    argv = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *sources]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(argv)}")
    generated = sorted(p for p in (out_root / PACKAGE_DIR).iterdir()
                       if p.name.endswith(GENERATED_SUFFIXES))
    for path in generated:
        path.write_text(python_imports(path.read_text()))
    return generated


def stale_files() -> list[str]:
    """Generated files that differ from (or are missing beside) the committed ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = {p.name for p in (ROOT / PROTO_DIR).iterdir()
                     if p.name.endswith(GENERATED_SUFFIXES)}
        names = {p.name for p in fresh}
        stale = sorted(committed ^ names)
        stale += [p.name for p in fresh if p.name in committed
                  and not filecmp.cmp(p, ROOT / PROTO_DIR / p.name, shallow=False)]
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PROTO_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(PROTO_ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
