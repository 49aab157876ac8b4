"""Sequence files (services/cli/seq_files.py): every way a file can be cut or lie about its
parts gets a message that says so, never Python's struct wording; and the exit codes."""

from __future__ import annotations

import struct

import pytest

from services.cli.flags import EXIT_FAILED, EXIT_REFUSED, exit_code_of
from services.cli.seq_files import FILE_MAGIC, pack_parts, unpack_parts
from worker.vocab.errors import SlotmeshError


def test_parts_round_trip() -> None:
    parts = [b"snapshot", b"", b"checkpoint" * 100]
    assert unpack_parts(pack_parts(parts)) == parts
    assert unpack_parts(b"a bare snapshot") == [b"a bare snapshot"]


@pytest.mark.parametrize(("data", "says"), [
    (FILE_MAGIC, "cut before its part count"),
    (FILE_MAGIC + struct.pack("<I", 2**32 - 1), "claims 4294967295 parts in 12 bytes"),
    (FILE_MAGIC + struct.pack("<I", 1) + b"\x05\x00\x00", "claims 1 parts"),
    (FILE_MAGIC + struct.pack("<IQ", 1, 10) + b"abc", "part 1 of 1 runs past the end"),
    (FILE_MAGIC + struct.pack("<IQ", 2, 4) + b"abcd" + b"\x00" * 4, "cut before part 2 of 2"),
    (pack_parts([b"abc"]) + b"tail", "parts and size disagree"),
    (FILE_MAGIC + struct.pack("<I", 0), "parts and size disagree"),
])
def test_damaged_files_are_named(data: bytes, says: str) -> None:
    with pytest.raises(SlotmeshError) as e:
        unpack_parts(data)
    assert str(e.value).startswith("file: not a complete sequence file")
    assert says in str(e.value) and "unpack" not in str(e.value)


def test_exit_codes_split_refusals_from_failures() -> None:
    for name in ("INVALID_ARGUMENT", "DATA_LOSS", "FAILED_PRECONDITION", "PERMISSION_DENIED",
                 "UNAUTHENTICATED", "NOT_FOUND", "ALREADY_EXISTS", "OUT_OF_RANGE"):
        assert exit_code_of(name) == EXIT_REFUSED, name
    for name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL",
                 "UNKNOWN", "CANCELLED"):
        assert exit_code_of(name) == EXIT_FAILED, name
