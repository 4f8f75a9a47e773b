"""PostgreSQL as a database consumer's store (issue 13): ``eventpipe[postgres]`` (psycopg 3).

``DbConsumer(log, name, handler, store=PostgresStore("dbname=app host=/run/postgresql"))``:
the handler gets a ``psycopg.Connection`` with a transaction open, and the consumer's position
is a row of ``eventpipe_positions`` (created if missing) committed in that transaction. The core
of eventpipe never imports this module.
"""

from __future__ import annotations

import re
from typing import Any

from ._dbstate import DEFAULT_TABLE, StateStore
from .errors import ConfigError

__all__ = ["PostgresStore"]


class PostgresStore(StateStore):
    """A PostgreSQL database, reached with libpq connection text or a URI (``dsn``).

    The read model may be shared by many hosts. The name lock is per host; across hosts the
    position row is the guard: a commit whose row another process moved meanwhile fails with
    PositionConflictError and is rolled back. ``connect_kwargs`` go to ``psycopg.connect``.
    """

    param = "%s"
    kind = "postgres"
    _create_sql = (
        "CREATE TABLE IF NOT EXISTS {table} (consumer TEXT PRIMARY KEY, log_id TEXT NOT NULL, "
        "next_offset BIGINT NOT NULL, fingerprint BIGINT, dead_letter_from BIGINT, "
        "updated_at DOUBLE PRECISION NOT NULL)")

    def __init__(self, dsn: str, *, table: str = DEFAULT_TABLE, **connect_kwargs: Any) -> None:
        super().__init__(table)
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError("PostgresStore needs psycopg 3: pip install 'eventpipe[postgres]'",
                              option="postgres") from None
        self.dsn = dsn
        self.connect_kwargs = connect_kwargs

    @property
    def where(self) -> str:
        return f"PostgreSQL database {_without_password(self.dsn)!r}"

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=False, **self.connect_kwargs)

    def begin(self) -> None:
        """psycopg opens a transaction at the first statement: nothing to send."""

    def open(self) -> None:
        if self.conn is None:
            import psycopg

            self.conn = self.connect()
            try:
                self.conn.execute(self._create_sql.format(table=self.table))
                self.conn.commit()
            except psycopg.errors.UniqueViolation:
                self.conn.rollback()  # created by another process at the same moment


def _without_password(dsn: str) -> str:
    dsn = re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
