"""Opening an input whatever its compression: gzip, bz2 and xz are recognized by their first bytes (never by the
file's name), parquet too; a truncated or corrupt compressed stream is one :class:`DataError` line naming the file.
Used by the Criteo reader (the terabyte logs ship as ``day_N.gz``) and the schema-driven table reader."""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path
from typing import BinaryIO

from recsys_transfer.errors import DataError

_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"PAR1": "parquet"}
_OPENERS = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}


def detect_compression(path: Path) -> str:
    """``gzip``, ``bz2``, ``xz``, ``parquet`` or ``none``, from the file's first bytes."""
    with Path(path).open("rb") as f:
        head = f.read(8)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise DataError(path, "zstd-compressed input is not supported; decompress it (zstd -d) or use gzip")
    return "none"


class _Checked:
    """A decompressing stream whose read errors (truncated or corrupt data) are one-line DataErrors."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise DataError(self.path, f"cannot decompress: {exc}") from None

    def readline(self) -> bytes:
        try:
            return self.f.readline()
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise DataError(self.path, f"cannot decompress: {exc}") from None

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "_Checked":
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def open_stream(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when its first bytes say gzip, bz2 or xz (a buffered stream: ``read(n)``
    returns fewer than ``n`` bytes only at its end)."""
    kind = detect_compression(path)
    if kind in _OPENERS:
        return _Checked(_OPENERS[kind](path, "rb"), path)  # type: ignore[return-value]
    return Path(path).open("rb")
