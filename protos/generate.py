"""Regenerate the committed Python code from the .proto files.

    python -m protos.generate            # rewrite protos/slotmesh/v1/*_pb2*.py(i)
    python -m protos.generate --check    # exit 1 if the committed code is stale

Protos are compiled from the repository root (`-I .`), so generated modules import each
other as `protos.slotmesh.v1.*` with no path tricks. grpcio-tools is pinned in the dev
extra so the output is byte-stable.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos/slotmesh/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((ROOT / PROTO_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto under protos/slotmesh/v1 into out_root; return the files."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    sources = [str(p.relative_to(ROOT)) for p in proto_files()]
    argv = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *sources]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(argv)}")
    return sorted(p for p in (out_root / PROTO_DIR).iterdir() if p.name.endswith(
        GENERATED_SUFFIXES))


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
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
