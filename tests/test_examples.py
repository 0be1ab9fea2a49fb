"""The example services: the SQLite user database and the Pillow image processor."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from processes.database import Database, User
from processes.image_processor import ImageProcessor
from titan_broker import HealthStatus, ProcessManager, RateLimited, RemoteError

from .conftest import ROOT

pytestmark = pytest.mark.anyio

DATABASE = ROOT / "processes" / "database.py"
IMAGES = ROOT / "processes" / "image_processor.py"


def png(width: int = 64, height: int = 48, color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


async def test_database_crud_search_and_stats(pm: ProcessManager, tmp_path: Path) -> None:
    db = await pm.spawn(DATABASE, Database, dependencies={"config": {"path": str(tmp_path / "users.db")}})
    before = datetime.now(UTC)
    ada = await db.create_user("Ada Lovelace", "ada@example.org")
    grace = await db.create_user("Grace Hopper", "Grace@Navy.mil")
    assert type(ada) is User and ada.id == 1 and grace.name == "Grace Hopper"
    assert before - timedelta(seconds=1) <= ada.created_at <= datetime.now(UTC)
    assert ada.created_at.tzinfo is not None
    assert await db.get_user(1) == ada
    with pytest.raises(RemoteError, match="no user with id 99"):
        await db.get_user(99)
    assert [u.id for u in await db.get_all_users()] == [1, 2]
    assert [u.name for u in await db.search_users("HOPPER")] == ["Grace Hopper"]
    assert [u.name for u in await db.search_users("navy.MIL")] == ["Grace Hopper"]
    updated = await db.update_user(1, name="Ada King")
    assert updated.name == "Ada King" and updated.created_at == ada.created_at
    assert (await db.get_user(1)).name == "Ada King"  # the cached read was invalidated
    assert await db.delete_user(2) is True
    with pytest.raises(RemoteError, match="no user with id 2"):
        await db.get_user(2)
    stats = await db.get_database_stats()
    assert stats["users"] == 1 and stats["connected"] and stats["queries"] > 5


async def test_database_streams_users_created_since_a_datetime(pm: ProcessManager) -> None:
    db = await pm.spawn(DATABASE, Database)
    ada = await db.create_user("Ada", "ada@example.org")
    grace = await db.create_user("Grace", "grace@navy.mil")
    assert [u async for u in db.users_since(ada.created_at)] == [ada, grace]
    assert [u async for u in db.users_since(grace.created_at)] in ([grace], [ada, grace])  # same instant
    assert [u async for u in db.users_since(datetime.now(UTC) + timedelta(hours=1))] == []
    naive_utc = grace.created_at.replace(tzinfo=None) + timedelta(hours=1)
    assert [u async for u in db.users_since(naive_utc)] == []  # naive is taken as UTC


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda db: db.create_user("   ", "x@y.z"), "name is required"),
        (lambda db: db.create_user("Bob", "not-an-email"), "is not an email address"),
        (lambda db: db.create_user("Dup", "ada@example.org"), "already exists"),
        (lambda db: db.update_user(42, name="Nobody"), "no user with id 42"),
        (lambda db: db.delete_user(42), "no user with id 42"),
    ],
)
async def test_database_bad_input_gets_clear_errors(pm: ProcessManager, call: Any, message: str) -> None:
    db = await pm.spawn(DATABASE, Database)
    await db.create_user("Ada", "ada@example.org")
    with pytest.raises(RemoteError, match=message):
        await call(db)
    assert (await db.get_database_stats())["users"] == 1


async def test_database_create_is_rate_limited(pm: ProcessManager) -> None:
    db = await pm.spawn(DATABASE, Database)
    refused = 0
    for i in range(130):
        try:
            await db.create_user(f"user {i}", f"user{i}@example.org")
        except RateLimited:
            refused += 1
    assert refused > 0


async def test_database_health_and_shutdown_closes_the_connection(pm: ProcessManager, tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    db = await pm.spawn(DATABASE, Database, dependencies={"config": {"path": str(path), "slow_query_ms": 0}})
    await db.create_user("Ada", "ada@example.org")
    health = await pm.health("database")
    # A threshold of 0 ms makes every query "slow": degraded, not unhealthy.
    assert health.status == HealthStatus.DEGRADED
    assert health.workers[0]["checks"]["connected"] is True
    await pm.shutdown()
    # @on_shutdown closed the connection cleanly: the WAL was checkpointed and removed.
    assert path.exists() and not await anyio.Path(f"{path}-wal").exists()


async def test_image_processor_operations(pm: ProcessManager) -> None:
    images = await pm.spawn(IMAGES, ImageProcessor)
    job = {
        "image": png(200, 100),
        "operations": [
            {"op": "resize", "width": 100, "height": 50},
            {"op": "crop", "box": [0, 0, 50, 50]},
            {"op": "rotate", "degrees": 90},
            {"op": "filter", "name": "grayscale"},
            {"op": "compress", "quality": 60},
        ],
    }
    result = await images.process_image(job)
    assert (result["width"], result["height"], result["format"]) == (50, 50, "JPEG")
    assert Image.open(io.BytesIO(result["image"])).format == "JPEG"
    assert size_of(await images.generate_thumbnail(png(400, 200), 64)) == (64, 32)
    assert size_of(await images.apply_filter(png(), "blur")) == (64, 48)
    with pytest.raises(RemoteError, match="unknown filter 'sepia'"):
        await images.apply_filter(png(), "sepia")
    with pytest.raises(RemoteError, match="not an image"):
        await images.generate_thumbnail(b"not an image")
    stats = await images.get_stats()
    assert stats["processed"] == 3 and stats["errors"] == 2 and stats["average_ms"] > 0


async def test_image_batch_streams_each_result_as_it_finishes(pm: ProcessManager) -> None:
    images = await pm.spawn(IMAGES, ImageProcessor)
    jobs = [{"id": i, "image": png(64 * (i + 1), 64), "operations": [{"op": "filter", "name": "blur"}]}
            for i in range(5)]  # fmt: skip
    jobs.append({"id": "bad", "image": b"junk", "operations": []})
    results = [r async for r in images.process_batch(jobs)]
    assert sorted(str(r["id"]) for r in results) == ["0", "1", "2", "3", "4", "bad"]
    bad = next(r for r in results if r["id"] == "bad")
    assert "not an image" in bad["error"]
