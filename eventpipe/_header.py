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

__all__ = ["HEADER_SIZE", "Header", "decode_header", "pack_header", "read_header"]

_FORMAT = struct.Struct("<4sQQQ")
_WHOLE = struct.Struct("<4sQQQI")
MAGIC = b"EPH1"
HEADER_SIZE = _WHOLE.size
BODY_SIZE = _BODY = _FORMAT.size
pack_body = _FORMAT.pack  # (MAGIC, head, segment_base, committed) -> the bytes the CRC covers
unpack_header = _WHOLE.unpack  # 32 bytes -> (magic, head, segment_base, committed, crc)
_crc32 = zlib.crc32
_new_tuple = tuple.__new__  # skips NamedTuple's Python-level __new__ on the append path

# Concurrent rewrites take well under a microsecond; a few retries separate a torn copy from
# real corruption without ever blocking a reader for long.
_TORN_RETRIES = 100


class Header(NamedTuple):
    """The committed state of a log."""

    head: int  # next offset to assign == number of events ever appended
    segment_base: int  # first offset of the active (last) segment
    committed: int  # bytes of the active segment that belong to committed events


def pack_header(head: int, segment_base: int, committed: int) -> bytes:
    body = _FORMAT.pack(MAGIC, head, segment_base, committed)
    return body + _crc32(body).to_bytes(4, "little")


def decode_header(raw: bytes) -> Header | None:
    """Decode header bytes, or None when they are not a valid header."""
    if len(raw) != HEADER_SIZE:
        return None
    magic, head, base, committed, crc = _WHOLE.unpack(raw)
    if crc != _crc32(raw[:_BODY]) or magic != MAGIC or base > head:
        return None
    h: Header = _new_tuple(Header, (head, base, committed))
    return h


def read_header(fd: int, path: str, *, retries: int = _TORN_RETRIES) -> Header:
    """Read and check the header from ``fd``.

    Raises CorruptLogError when the bytes stay invalid over ``retries`` reads (so they are not
    merely a copy torn by a concurrent rewrite).
    """
    raw = b""
    for _ in range(retries):
        raw = os.pread(fd, HEADER_SIZE, 0)
        h = decode_header(raw)
        if h is not None:
            return h
    raise CorruptLogError(
        f"log header is invalid ({len(raw)} bytes, checksum or magic mismatch)", path=path
    )

