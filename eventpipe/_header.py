"""The ``head`` file: the single commit point of a log.

Thirty-two bytes at position 0 of ``<log>/head``::

    magic "EPH1" | head u64 | active segment base u64 | committed bytes u64 | crc32 u32

A writer, holding the writer lock, writes event bytes into the active segment first and rewrites
the header second; readers read the header first and segment bytes up to ``committed`` second.
So bytes past ``committed`` (a torn write by a killed writer, a batch cut short by a full disk)
are never seen by readers, and a batch becomes visible all at once.

The header is rewritten in place with one small ``pwrite`` inside one page, which a signal
cannot tear. A concurrent reader may still copy it while it changes (Linux gives no atomicity
between buffered reads and writes), so readers check the CRC and re-read on a mismatch.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import NamedTuple

from .errors import CorruptLogError

__all__ = ["HEADER_SIZE", "Header", "pack_header", "read_header"]

_FORMAT = struct.Struct("<4sQQQ")
_CRC = struct.Struct("<I")
MAGIC = b"EPH1"
HEADER_SIZE = _FORMAT.size + _CRC.size

# Concurrent rewrites take well under a microsecond; a few retries separate a torn copy from
# real corruption without ever blocking a reader for long.
_TORN_RETRIES = 100


class Header(NamedTuple):
    """The committed state of a log."""

    head: int  # next offset to assign == number of events ever appended
    segment_base: int  # first offset of the active (last) segment
    committed: int  # bytes of the active segment that belong to committed events


def pack_header(h: Header) -> bytes:
    body = _FORMAT.pack(MAGIC, h.head, h.segment_base, h.committed)
    return body + _CRC.pack(zlib.crc32(body))


def _unpack(raw: bytes) -> Header | None:
    if len(raw) != HEADER_SIZE:
        return None
    body = raw[: _FORMAT.size]
    if _CRC.unpack_from(raw, _FORMAT.size)[0] != zlib.crc32(body):
        return None
    magic, head, base, committed = _FORMAT.unpack(body)
    if magic != MAGIC or base > head:
        return None
    return Header(head, base, committed)


def read_header(fd: int, path: str, *, retries: int = _TORN_RETRIES) -> Header:
    """Read and check the header from ``fd``.

    Raises CorruptLogError when the bytes stay invalid over ``retries`` reads (so they are not
    merely a copy torn by a concurrent rewrite).
    """
    raw = b""
    for _ in range(retries):
        raw = os.pread(fd, HEADER_SIZE, 0)
        h = _unpack(raw)
        if h is not None:
            return h
    raise CorruptLogError(
        f"log header is invalid ({len(raw)} bytes, checksum or magic mismatch)", path=path
    )


def decode_header(raw: bytes) -> Header | None:
    """Decode header bytes, or None when they are not a valid header."""
    return _unpack(raw)
