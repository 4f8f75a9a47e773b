"""A read model of orders in SQLite, kept by a consumer, queried by another process meanwhile.

``apply`` is the handler: it turns each order event into a change of the ``orders`` table. The
consumer commits those changes and its own position in one transaction (every 200 events or
0.2 s here), so the table always holds exactly the events before the stored position: kill it
at any instant and restart it, and nothing is applied twice or lost. Any process can query the
table while the consumer writes (SQLite's WAL: readers see the last commit).

From the command line, the same consumer is::

    eventpipe consume /var/lib/eventpipe/orders --name orders-view \\
        --handler examples/orders_read_model.py:apply --sqlite /var/lib/app/orders.db

    python examples/orders_read_model.py    # a writer, the consumer and a reader, in seconds
"""

from __future__ import annotations

import sqlite3
from typing import Any

SCHEMA = """CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY, customer TEXT NOT NULL, items INTEGER NOT NULL DEFAULT 0,
    total_cents INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL, updated_offset INTEGER)"""


def apply(conn: sqlite3.Connection, event: dict[str, Any], offset: int) -> None:
    """One event into the read model, inside the consumer's transaction."""
    kind = event["type"]
    if kind == "placed":
        conn.execute(SCHEMA)  # a no-op after the first time: the model makes its own table
        conn.execute("INSERT INTO orders (id, customer, status, updated_offset) "
                     "VALUES (?, ?, 'open', ?)", (event["order"], event["customer"], offset))
    elif kind == "item_added":
        conn.execute("UPDATE orders SET items = items + 1, total_cents = total_cents + ?, "
                     "updated_offset = ? WHERE id = ?",
                     (event["price_cents"], offset, event["order"]))
    elif kind in ("paid", "shipped"):
        conn.execute("UPDATE orders SET status = ?, updated_offset = ? WHERE id = ?",
                     (kind, offset, event["order"]))


def _events(n_orders: int, seed: int) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n_orders):
        order = f"o{seed}-{i}"
        out.append({"type": "placed", "order": order, "customer": f"c{rng.randrange(50)}"})
        out += [{"type": "item_added", "order": order, "price_cents": rng.randrange(100, 5000)}
                for _ in range(rng.randrange(1, 5))]
        out.append({"type": "paid", "order": order})
        if rng.random() < 0.5:
            out.append({"type": "shipped", "order": order})
    return out


def _reader(db: str, rounds: int) -> None:
    """Another process: queries the read model while the consumer writes it."""
    import time

    seen = []
    for _ in range(rounds):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT count(*), coalesce(sum(total_cents), 0) FROM orders "
                               "WHERE status != 'open'").fetchone()
            seen.append(row[0])
        except sqlite3.OperationalError:
            seen.append(0)  # no table yet: the first event is not applied
        finally:
            conn.close()
        time.sleep(0.1)
    grew = seen == sorted(seen) and seen[-1] > seen[0]
    print(f"reader process: paid orders seen over time {seen[0]} .. {seen[-1]}, "
          f"{'never going back' if grew else 'NOT monotonic'}", flush=True)


def main() -> int:
    import multiprocessing
    import os
    import tempfile
    import threading
    import time

    from eventpipe import DbConsumer, EventLog, SqliteStore

    with tempfile.TemporaryDirectory() as tmp:
        path, db = os.path.join(tmp, "orders"), os.path.join(tmp, "orders.db")
        with EventLog(path) as log:
            log.append_many(_events(200, 0))
            consumer = DbConsumer(log, "orders-view", apply, store=SqliteStore(db),
                                  commit_every=200, commit_interval=0.2, poll_interval=0.05)
            runner = threading.Thread(target=consumer.run)
            runner.start()
            reader = multiprocessing.get_context("spawn").Process(target=_reader,
                                                                  args=(db, 12))
            reader.start()
            for batch in range(1, 11):  # a writer keeps placing orders meanwhile
                log.append_many(_events(30, batch))
                time.sleep(0.1)
            reader.join()
            while consumer.offset < log.head:
                time.sleep(0.05)
            consumer.stop()
            runner.join()
            consumer.close()
            # The read model is a fold of the log, and the position says how far.
            expected: dict[str, tuple[str, int, int]] = {}
            for record in log.read(0):
                e = record.event
                if e["type"] == "placed":
                    expected[e["order"]] = ("open", 0, 0)
                elif e["type"] == "item_added":
                    s, n, t = expected[e["order"]]
                    expected[e["order"]] = (s, n + 1, t + e["price_cents"])
                else:
                    _, n, t = expected[e["order"]]
                    expected[e["order"]] = (e["type"], n, t)
            conn = sqlite3.connect(db)
            rows = {i: (s, n, t) for i, s, n, t in conn.execute(
                "SELECT id, status, items, total_cents FROM orders")}
            position = conn.execute("SELECT next_offset FROM eventpipe_positions WHERE "
                                    "consumer = 'orders-view'").fetchone()[0]
            by_status = dict(conn.execute(
                "SELECT status, count(*) FROM orders GROUP BY status ORDER BY status"))
            conn.close()
            print(f"{log.head} events, {len(rows)} orders: {by_status}")
            print(f"position {position} = head {log.head}: "
                  f"{'read model matches a fold of the log' if rows == expected else 'MISMATCH'}")
            return 0 if rows == expected and position == log.head else 1


if __name__ == "__main__":
    raise SystemExit(main())
