"""The projection the database-consumer tests fold (issue 13), for SQLite and PostgreSQL alike:
``totals`` (one row per key: sum, count, last offset) and ``applied`` (one row per handled event,
no key: an event applied twice shows as a duplicate). Run by ``eventpipe consume --handler
tests/_dbhandler.py:apply`` in the kill -9 soaks, and in-process elsewhere."""

from __future__ import annotations

import sqlite3
from typing import Any

SCHEMA = ("CREATE TABLE IF NOT EXISTS totals (k TEXT PRIMARY KEY, total BIGINT NOT NULL, "
          "n BIGINT NOT NULL, last BIGINT NOT NULL)",
          "CREATE TABLE IF NOT EXISTS applied (o BIGINT NOT NULL)")


def _p(conn: Any) -> str:
    return "?" if isinstance(conn, sqlite3.Connection) else "%s"


def create_schema(conn: Any) -> None:
    for sql in SCHEMA:
        conn.execute(sql)
    conn.commit()


def apply(conn: Any, event: Any, offset: int) -> None:
    p = _p(conn)
    if event.get("fail"):
        raise ValueError(f"refusing event {offset}")
    conn.execute(f"INSERT INTO totals (k, total, n, last) VALUES ({p}, {p}, 1, {p}) "
                 "ON CONFLICT (k) DO UPDATE SET total = totals.total + excluded.total, "
                 "n = totals.n + 1, last = excluded.last", (event["k"], event["v"], offset))
    conn.execute(f"INSERT INTO applied (o) VALUES ({p})", (offset,))


def fold(events: list[Any]) -> dict[str, tuple[int, int, int]]:
    """What ``totals`` must hold after ``events`` (those marked to fail left out)."""
    out: dict[str, tuple[int, int, int]] = {}
    for offset, e in enumerate(events):
        if e.get("fail"):
            continue
        total, n, _ = out.get(e["k"], (0, 0, 0))
        out[e["k"]] = (total + e["v"], n + 1, offset)
    return out


def wipe(conn: Any, consumer: str, offset: int) -> None:
    """A reset hook that starts the projection over: valid for a reset to offset 0 only."""
    if offset != 0:
        raise ValueError("this read model can only be rebuilt from offset 0")
    conn.execute("DELETE FROM totals")
    conn.execute("DELETE FROM applied")
