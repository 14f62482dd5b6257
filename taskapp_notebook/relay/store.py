"""The relay's durable record of leases: one SQLite database (stdlib ``sqlite3``).

A relay started with a state file (``--state PATH``, ``RelayConfig.state_path``) finds its
leases again after a restart: same lease ids, public URLs and tokens, so an agent that
reconnects with its agent token is served again and callers holding the old URL and worker
token get through. Without a state file the same code runs on an in-memory database.

No token is stored, not even hashed: each lease keeps a random 32-byte salt, and its route,
agent and worker tokens are HMAC-SHA256 of that salt under the API key that created the
lease (:func:`.leases.derive_tokens`). The relay knows its API keys, so it re-derives the
tokens at start; a copy of the file without the keys yields nothing that authenticates.
Leases of a key the relay no longer has are dropped at start (removing a key revokes its
leases). The file is created ``0600`` and locked (``locking_mode=EXCLUSIVE``) while a relay
uses it, so two relays cannot share one file.

Tables: ``leases`` (one row per live lease) and ``tombstones`` (SHA-256 digests of the
route and agent tokens of ended leases, so their URLs answer 410 instead of 404).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import TaskAppError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id TEXT PRIMARY KEY,
    owner BLOB NOT NULL,
    salt BLOB NOT NULL,
    client_instance_id TEXT NOT NULL,
    local_target TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
    token_digest BLOB PRIMARY KEY,
    reason TEXT NOT NULL,
    ended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tombstones_by_age ON tombstones (ended_at);
"""


class StateFileError(TaskAppError, RuntimeError):
    """The relay's state file cannot be opened, read or locked."""


@dataclass(frozen=True)
class LeaseRow:
    """What the database keeps of one lease (no tokens: they are derived from ``salt``)."""

    lease_id: str
    owner: bytes
    salt: bytes
    client_instance_id: str
    local_target: dict[str, Any]
    metadata: dict[str, Any]
    created_at: float
    expires_at: float


class LeaseDatabase:
    """Leases and tombstones in SQLite; ``path=None`` is an in-memory database."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        where = ":memory:" if self.path is None else self.path
        try:
            if self.path is not None:
                # Salts are key material: readable by the relay's user only.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db: sqlite3.Connection | None = sqlite3.connect(
                where, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateFileError(
                f"Cannot open the relay state file {where!r}: {exc}. "
                "Check the path and its permissions, or run without --state."
            ) from None
        try:
            self._setup()
        except sqlite3.OperationalError as exc:
            self.close()
            if "locked" in str(exc):
                raise StateFileError(
                    f"The relay state file {where!r} is in use by another relay; "
                    "give each relay its own file."
                ) from None
            raise StateFileError(f"Cannot use the relay state file {where!r}: {exc}.") from None
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StateFileError(
                f"The relay state file {where!r} is not a relay state database ({exc}); "
                "move it away or pass another path."
            ) from None

    def _setup(self) -> None:
        db = self._conn()
        db.execute("PRAGMA busy_timeout = 0")
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("BEGIN EXCLUSIVE")  # takes the lock now and keeps it (EXCLUSIVE mode)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateFileError("the relay state database is closed")
        return self._db

    @property
    def closed(self) -> bool:
        return self._db is None

    # -- leases ---------------------------------------------------------------------------

    def leases(self) -> list[LeaseRow]:
        rows = self._conn().execute(
            "SELECT lease_id, owner, salt, client_instance_id, local_target, metadata, "
            "created_at, expires_at FROM leases ORDER BY created_at"
        )
        out = []
        for lease_id, owner, salt, client, target, metadata, created, expires in rows:
            try:
                row = LeaseRow(
                    str(lease_id),
                    bytes(owner),
                    bytes(salt),
                    str(client),
                    json.loads(target),
                    json.loads(metadata),
                    float(created),
                    float(expires),
                )
            except (TypeError, ValueError) as exc:
                raise StateFileError(
                    f"The relay state file {self.path!r} has a damaged lease row "
                    f"({lease_id!r}: {exc}); restore a backup or move the file away."
                ) from None
            out.append(row)
        return out

    def add(self, row: LeaseRow) -> None:
        self._write(
            "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.lease_id,
                row.owner,
                row.salt,
                row.client_instance_id,
                json.dumps(row.local_target),
                json.dumps(row.metadata),
                row.created_at,
                row.expires_at,
            ),
        )

    def set_expiry(self, lease_id: str, expires_at: float) -> None:
        self._write("UPDATE leases SET expires_at = ? WHERE lease_id = ?", (expires_at, lease_id))

    def remove(
        self, lease_id: str, tombstones: Iterable[bytes], reason: str, ended_at: float
    ) -> None:
        """Delete a lease and remember its token digests as ended for ``reason``."""
        db = self._conn()
        try:
            with db:
                db.execute("BEGIN")
                db.execute("DELETE FROM leases WHERE lease_id = ?", (lease_id,))
                db.executemany(
                    "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)",
                    [(d, reason, ended_at) for d in tombstones],
                )
        except sqlite3.Error as exc:
            raise StateFileError(f"writing the relay state file failed: {exc}") from None

    # -- tombstones -----------------------------------------------------------------------

    def tombstones(self, limit: int) -> list[tuple[bytes, str]]:
        """The newest ``limit`` tombstones, oldest first."""
        rows = self._conn().execute(
            "SELECT token_digest, reason FROM "
            "(SELECT * FROM tombstones ORDER BY ended_at DESC LIMIT ?) ORDER BY ended_at",
            (limit,),
        )
        return [(bytes(d), reason) for d, reason in rows]

    def prune_tombstones(self, keep: int) -> None:
        self._write(
            "DELETE FROM tombstones WHERE token_digest NOT IN "
            "(SELECT token_digest FROM tombstones ORDER BY ended_at DESC LIMIT ?)",
            (keep,),
        )

    # -- lifecycle ------------------------------------------------------------------------

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        db = self._conn()
        try:
            with db:
                db.execute("BEGIN")
                db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StateFileError(f"writing the relay state file failed: {exc}") from None

    def close(self) -> None:
        """Close the database (releases the file lock). Idempotent."""
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as exc:  # closing never fails the relay's stop
                logger.warning("Closing the relay state database failed: %s", exc)
