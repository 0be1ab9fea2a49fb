"""A user database service on SQLite: CRUD, search, stats, a cached read and a rate-limited write.

Users cross the wire as ``User`` dataclasses with a ``datetime`` ``created_at``:
a caller with the class (``pm.connect("database", Database)``) gets ``User``
objects back, and mypy knows ``await db.get_user(7)`` is one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio

from titan_broker import Health, cache, health_check, metric, on_shutdown, process, public, rate_limit


class NotFound(LookupError):
    """No user has that id."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    email: str
    created_at: datetime
    """When the user was created, in UTC."""


def _user(row: dict[str, Any]) -> User:
    """A row of the users table as a User (the table keeps created_at as seconds since the epoch)."""
    created = datetime.fromtimestamp(row["created_at"], UTC)
    return User(row["id"], row["name"], row["email"], created)


@process(name="database", version="1.0.0")
class Database:
    """Users in a SQLite database; the path and options come from init(config=...)."""

    async def init(self, config: dict[str, Any] | None = None) -> None:
        config = config or {}
        self.path = str(config.get("path", ":memory:"))
        self.slow_query_ms = float(config.get("slow_query_ms", 100.0))
        self.lock = threading.Lock()  # one connection, used from the worker's threads
        self.db: sqlite3.Connection | None = sqlite3.connect(
            self.path, check_same_thread=False, timeout=float(config.get("busy_timeout", 5.0))
        )
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS users ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,"
            " email TEXT NOT NULL UNIQUE COLLATE NOCASE, created_at REAL NOT NULL)"
        )
        self.db.commit()
        self.queries = 0
        self.last_query_ms = 0.0

    async def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Run one statement in a worker thread: sqlite3 blocks, the event loop must not."""
        return await anyio.to_thread.run_sync(self._query_now, sql, params)

    def _query_now(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        if self.db is None:
            raise ConnectionError("the database connection is closed")
        started = time.perf_counter()
        with self.lock:
            rows = self.db.execute(sql, params).fetchall()
            self.db.commit()
        self.queries += 1
        self.last_query_ms = (time.perf_counter() - started) * 1000
        return [dict(row) for row in rows]

    @staticmethod
    def _check(name: str | None = None, email: str | None = None) -> None:
        if name is not None and not name.strip():
            raise ValueError("name is required and cannot be blank")
        if email is not None and "@" not in email:
            raise ValueError(f"email {email!r} is not an email address")

    @public
    @rate_limit(rps=50, burst=100)
    @metric
    async def create_user(self, name: str, email: str) -> User:
        self._check(name, email)
        try:
            [row] = await self._query(
                "INSERT INTO users (name, email, created_at) VALUES (?, ?, ?) RETURNING *",
                (name.strip(), email.strip(), time.time()),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a user with email {email!r} already exists") from None
        return _user(row)

    @public
    @cache(ttl=60, invalidated_by=["update_user", "delete_user"])
    @metric
    async def get_user(self, user_id: int) -> User:
        rows = await self._query("SELECT * FROM users WHERE id = ?", (user_id,))
        if not rows:
            raise NotFound(f"no user with id {user_id}")
        return _user(rows[0])

    @public
    async def get_all_users(self, limit: int = 100, offset: int = 0) -> list[User]:
        rows = await self._query("SELECT * FROM users ORDER BY id LIMIT ? OFFSET ?", (limit, offset))
        return [_user(row) for row in rows]

    @public
    async def users_since(self, since: datetime) -> AsyncIterator[User]:
        """Users created at or after ``since`` (a naive datetime is taken as UTC), oldest first, streamed."""
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        # Half a microsecond of slack: created_at is stored to the float, shown to the microsecond, so a
        # user's own created_at must find it.
        rows = await self._query(
            "SELECT * FROM users WHERE created_at >= ? ORDER BY created_at, id", (since.timestamp() - 5e-7,)
        )
        for row in rows:
            yield _user(row)

    @public
    @metric
    async def update_user(self, user_id: int, name: str | None = None, email: str | None = None) -> User:
        self._check(name, email)
        try:
            rows = await self._query(
                "UPDATE users SET name = COALESCE(?, name), email = COALESCE(?, email)"
                " WHERE id = ? RETURNING *",
                (name.strip() if name else None, email.strip() if email else None, user_id),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a user with email {email!r} already exists") from None
        if not rows:
            raise NotFound(f"no user with id {user_id}")
        return _user(rows[0])

    @public
    async def delete_user(self, user_id: int) -> bool:
        if not await self._query("DELETE FROM users WHERE id = ? RETURNING id", (user_id,)):
            raise NotFound(f"no user with id {user_id}")
        return True

    @public
    @metric
    async def search_users(self, query: str) -> list[User]:
        """Users whose name or email contains ``query``, ignoring case."""
        pattern = f"%{query.strip().lower()}%"
        rows = await self._query(
            "SELECT * FROM users WHERE lower(name) LIKE ? OR lower(email) LIKE ? ORDER BY id",
            (pattern, pattern),
        )
        return [_user(row) for row in rows]

    @public
    async def get_database_stats(self) -> dict[str, Any]:
        [row] = await self._query("SELECT COUNT(*) AS users FROM users")
        return {
            "path": self.path,
            "users": row["users"],
            "queries": self.queries,
            "last_query_ms": round(self.last_query_ms, 3),
            "connected": self.db is not None,
        }

    @health_check
    async def health(self) -> Health:
        if self.db is None:
            return Health("unhealthy", checks={"connected": False})
        started = time.perf_counter()
        await self._query("SELECT 1")
        ping_ms = (time.perf_counter() - started) * 1000
        slow = max(ping_ms, self.last_query_ms) > self.slow_query_ms
        return Health(
            "degraded" if slow else "healthy",
            checks={"connected": True, "ping_ms": round(ping_ms, 3)},
            details={"last_query_ms": round(self.last_query_ms, 3), "threshold_ms": self.slow_query_ms},
        )

    @on_shutdown
    async def close(self) -> None:
        if self.db is not None:
            with self.lock:
                self.db.close()
            self.db = None
