"""The ``head`` file: the single commit point of a log.

Two identical copies of a 64-byte record, at byte 0 and byte 512 of ``<log>/head``::

    magic "EPH3" | head u64 | active segment base u64 | committed bytes u64
                 | synced bytes u64 | boot u64 | flags u32
                 | time entries u32 | last time u64 | crc32 u32

A writer, holding the writer lock, writes event bytes into the active segment first and rewrites
the header second; readers read the header first and segment bytes up to ``committed`` second.
So bytes past ``committed`` (a torn write by a killed writer, a batch cut short by a full disk)
are never seen by readers, and a batch becomes visible all at once.

``synced`` is how many bytes of the active segment are known to be on disk (fsynced before this
header was written), and ``boot`` identifies the kernel boot that wrote the header. Together
they tell recovery what it may cut: while the boot is the same, the page cache never lost a
byte, so every committed byte is there and damage is damage (reported, never cut); after a
reboot only ``synced..committed`` may legitimately be missing (a power loss under
``sync="none"/"interval"``). ``flags`` has ``ROLLING`` set while a writer creates new segments,
so a writer killed mid-roll is the only case that needs a listing to find what it left.
``tcount`` is how many entries of the active segment's time index are committed and ``tlast``
the latest time any entry holds (see ``_timeindex``): the floor for the next append's time.

Both copies are written by one ``pwrite`` inside one page, which a signal cannot tear. A
concurrent reader may still copy the bytes while they change (Linux gives no atomicity between
buffered reads and writes), so readers check the CRC and re-read on a mismatch; a copy that
stays invalid (a flipped bit on disk) is replaced by the other one.

Logs written before this format hold an ``EPH2`` record (no times: they read as
``tcount=0, tlast=0``) or one 32-byte ``EPH1`` record (no ``synced``, ``boot`` or ``flags``
either; read as ``synced=0, boot=0``); the next writer upgrades them.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import NamedTuple

from .errors import CorruptLogError

__all__ = [
    "HEADER_SIZE",
    "ROLLING",
    "Header",
    "boot_id",
    "decode_header",
    "encode_header",
    "read_header",
]

_RECORD = struct.Struct("<4sQQQQQIIQ")  # the part the CRC covers
_WHOLE = struct.Struct("<4sQQQQQIIQI")
_V2 = struct.Struct("<4sQQQQQII")
_V1 = struct.Struct("<4sQQQI")
MAGIC = b"EPH3"
MAGIC_V2 = b"EPH2"
MAGIC_V1 = b"EPH1"
RECORD_SIZE = _WHOLE.size  # 64
BODY_SIZE = _RECORD.size
COPY_AT = 512  # the second copy: another disk sector than the first
HEADER_SIZE = COPY_AT + RECORD_SIZE  # what a reader reads, and a writer writes, at byte 0
ROLLING = 1  # flags: a writer is creating segments past the active one

pack_body = _RECORD.pack
unpack_record = _WHOLE.unpack
_crc32 = zlib.crc32
_PAD = bytes(COPY_AT - RECORD_SIZE)

# Concurrent rewrites take well under a microsecond; a few retries separate a torn copy from
# real corruption without ever blocking a reader for long.
_TORN_RETRIES = 100


class Header(NamedTuple):
    """The committed state of a log."""

    head: int  # next offset to assign == number of events ever appended
    segment_base: int  # first offset of the active (last) segment
    committed: int  # bytes of the active segment that belong to committed events
    synced: int = 0  # bytes of the active segment known to be durable
    boot: int = 0  # the boot that wrote this header (0: unknown)
    flags: int = 0
    tcount: int = 0  # committed entries in the active segment's time index
    tlast: int = 0  # the latest time stored (ns since the epoch; 0: none yet)


def encode_header(h: Header) -> bytes:
    """The bytes a writer puts at byte 0 of ``head``: both copies of ``h``."""
    body = pack_body(MAGIC, h.head, h.segment_base, h.committed, h.synced, h.boot, h.flags,
                     h.tcount, h.tlast)
    record = body + _crc32(body).to_bytes(4, "little")
    return record + _PAD + record


def _decode_record(raw: bytes) -> Header | None:
    magic = raw[:4]
    if magic == MAGIC and len(raw) >= RECORD_SIZE:
        fields: tuple[int | bytes, ...] = unpack_record(raw[:RECORD_SIZE])
    elif magic == MAGIC_V2 and len(raw) >= _V2.size:
        fields = _V2.unpack(raw[: _V2.size])
    elif magic == MAGIC_V1 and len(raw) >= _V1.size:
        fields = _V1.unpack(raw[: _V1.size])
    else:
        return None
    crc = fields[-1]
    h = Header(*fields[1:-1])  # type: ignore[arg-type]  # the formats' ints, in order
    if (crc != _crc32(raw[: _SIZES[magic] - 4]) or h.segment_base > h.head
            or h.synced > h.committed):
        return None
    return h


_SIZES = {MAGIC: RECORD_SIZE, MAGIC_V2: _V2.size, MAGIC_V1: _V1.size}


def decode_header(raw: bytes) -> Header | None:
    """Decode the bytes at the start of ``head`` (first copy, else second), None if neither
    is a valid header."""
    h = _decode_record(raw)
    if h is None and len(raw) >= HEADER_SIZE:
        h = _decode_record(raw[COPY_AT:])
    return h


def read_header(fd: int, path: str, *, retries: int = _TORN_RETRIES) -> Header:
    """Read and check the header from ``fd``.

    Tries the first copy ``retries`` times (a copy torn by a concurrent rewrite heals at once),
    then the second. Raises CorruptLogError when neither is valid.
    """
    raw = b""
    for _ in range(retries):
        raw = os.pread(fd, HEADER_SIZE, 0)
        h = _decode_record(raw)
        if h is not None:
            return h
    for _ in range(retries):
        raw = os.pread(fd, HEADER_SIZE, 0)
        h = decode_header(raw)
        if h is not None:
            return h
    raise CorruptLogError(
        f"log header is invalid ({len(raw)} bytes; checksum or magic mismatch in both copies)",
        path=path,
    )


_boot: int | None = None


def boot_id() -> int:
    """This kernel boot's identity (64 bits of /proc/sys/kernel/random/boot_id), 0 if unknown."""
    global _boot
    if _boot is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                _boot = int(f.read().strip().replace(b"-", b"")[:16], 16)
        except (OSError, ValueError):
            _boot = 0
    return _boot
