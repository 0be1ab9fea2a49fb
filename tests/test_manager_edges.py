"""The manager and its pools at the edges: options vs keywords, the pool's rules, and its shape."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from titan_broker import ConfigError, ProcessManager, WorkerOptions
from titan_broker._processes.policies import (
    AutoScale,
    Autoscaler,
    CrashHistory,
    PoolSettings,
    RestartPolicy,
    replacement_reason,
    worker_options,
)

from .conftest import ROOT, SERVICES, managed_workers
from .test_registry import record

POOLED = str(SERVICES / "pooled.py")

pytestmark = pytest.mark.anyio


async def _concurrency(pm: ProcessManager, service: str) -> int:
    [worker] = pm.workers
    raw = await pm.client.redis.hget(pm.client.keys.worker(service, worker.worker_id), "concurrency")
    assert raw is not None
    return int(raw)


# -- concurrency: the keyword, options, the default ------------------------------------------


async def test_spawn_keeps_the_concurrency_of_its_options(pm: ProcessManager) -> None:
    await pm.spawn(POOLED, options=WorkerOptions(concurrency=4))
    assert await _concurrency(pm, "pooled") == 4  # was overridden by the keyword's default of 16


async def test_the_concurrency_keyword_wins_over_the_default(pm: ProcessManager) -> None:
    await pm.spawn(POOLED, concurrency=3, options=WorkerOptions(heartbeat_ttl=6.0))
    assert await _concurrency(pm, "pooled") == 3


async def test_a_conflicting_concurrency_is_refused_before_anything_starts(pm: ProcessManager) -> None:
    with pytest.raises(ConfigError) as info:
        await pm.pool(POOLED, concurrency=3, options=WorkerOptions(concurrency=4))
    assert "concurrency=3" in str(info.value) and "WorkerOptions(concurrency=4)" in str(info.value)
    assert managed_workers() == [] and pm.pools == []


def test_worker_options_resolution() -> None:
    assert worker_options(None, None) == WorkerOptions()
    assert worker_options(None, 5).concurrency == 5
    explicit = WorkerOptions(concurrency=4, grace_period=2.0)
    assert worker_options(explicit, None) is explicit
    assert worker_options(explicit, 4) is explicit  # the same value twice is no conflict
    assert worker_options(WorkerOptions(grace_period=2.0), 8) == WorkerOptions(
        concurrency=8, grace_period=2.0
    )
    with pytest.raises(ConfigError, match="concurrency=8 conflicts"):
        worker_options(explicit, 8)


# -- the pool's list in the manager ----------------------------------------------------------


async def test_a_pool_closed_by_its_user_leaves_the_manager(pm: ProcessManager) -> None:
    pool = await pm.pool(POOLED)
    assert pm.pools == [pool] and len(pm.workers) == 1
    assert await pool.proxy.sleep(0) == pool.workers[0].pid
    await pool.close(timeout=10)
    assert pm.pools == [] and pm.workers == [] and pool.workers == []
    assert (await pm.health("pooled")).failed == 0


# -- the rules a pool acts on ----------------------------------------------------------------


def test_crash_history_backs_off_then_gives_up() -> None:
    history = CrashHistory(RestartPolicy(max_restarts=3, window=10.0, backoff=0.5, max_backoff=1.5))
    assert [history.record(t) for t in (0.0, 1.0, 2.0)] == [0.5, 1.0, 1.5]
    assert history.record(3.0) is None and len(history) == 4  # the 4th crash within 10 s
    # Crashes older than the window no longer count.
    assert history.record(12.5) == 1.0 and len(history) == 2


def test_replacement_reasons_in_order() -> None:
    settings = PoolSettings(recycle_after_calls=10, max_lifetime=60.0, memory_limit=100 * 2**20)
    assert replacement_reason(settings, record(calls=3), 5.0, 2**20) is None
    assert replacement_reason(settings, None, 5.0, 0) is None
    kind, detail = replacement_reason(settings, record(unhealthy_streak=3, calls=99), 99.0, 0) or ("", "")
    assert kind == "unhealthy" and "3 failed health checks" in detail
    assert replacement_reason(settings, record(calls=10), 5.0, 0) == (
        "recycled",
        "served 10 calls (limit 10)",
    )
    assert replacement_reason(settings, record(), 61.0, 0) == ("recycled", "lived 61 s (limit 60 s)")
    assert replacement_reason(settings, record(), 5.0, 200 * 2**20) == (
        "recycled", "RSS 200 MiB over the limit of 100 MiB",
    )  # fmt: skip


def test_autoscaler_grows_at_once_and_shrinks_after_its_cooldown() -> None:
    scaler = Autoscaler(AutoScale(min=1, max=3, target_cpu=0.5, cooldown=5.0), concurrency=4)
    assert scaler.target_backlog == 4
    assert scaler.decide(1, cpu=0.9, backlog=0, now=0.0) == 2  # CPU above target
    assert scaler.decide(2, cpu=0.0, backlog=9, now=1.0) == 3  # backlog above 4 per worker
    assert scaler.decide(3, cpu=2.9, backlog=0, now=2.0) is None  # at max
    assert scaler.decide(3, cpu=0.1, backlog=0, now=3.0) is None  # idle: the cooldown starts
    assert scaler.decide(3, cpu=0.1, backlog=0, now=7.0) is None
    assert scaler.decide(3, cpu=0.1, backlog=0, now=8.0) == 2
    assert scaler.decide(2, cpu=0.8, backlog=0, now=20.0) is None  # 0.8 on one worker would be above
    assert scaler.decide(1, cpu=0.0, backlog=0, now=30.0) is None  # at min


# -- the shape of the house ------------------------------------------------------------------


LAYERS = (
    "_errors",
    "_wire",
    "_config",
    "_redis",
    "_service",
    "_registry",
    "_calling",
    "_processes",
    "testing",
)
"""The floors of ``titan_broker``, ground first: a part imports only from its own floor or the ones below."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The modules of ``titan_broker`` that ``path`` imports (relative or absolute, TYPE_CHECKING too)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            if not base.startswith("titan_broker"):
                continue
            for alias in node.names:  # `from .._wire import protocol` imports the module protocol
                module = f"{base}.{alias.name}"
                found.add(module if (ROOT / module.replace(".", "/")).with_suffix(".py").exists() else base)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in (ROOT / "titan_broker").rglob("*.py")}


def test_titan_broker_has_no_import_cycle() -> None:
    graph = _graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(m for m in graph if m != "titan_broker" and reaches(m, m, set()))
    assert cycles == [], f"modules in an import cycle: {cycles}"
    assert (
        "titan_broker._processes.manager"
        not in graph["titan_broker._processes.pool"] | graph["titan_broker._processes.supervisor"]
    )


def test_each_part_of_titan_broker_imports_only_its_own_floor_or_lower() -> None:
    def floor(module: str) -> int:
        part = module.split(".")[1] if "." in module else ""
        return LAYERS.index(part) if part in LAYERS else len(LAYERS)  # the facade is the roof

    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if floor(target) > floor(module)
    )
    assert upward == [], f"imports that run back up: {upward}"


def test_worker_and_cli_reach_the_library_through_its_named_surfaces() -> None:
    """The worker and the CLI import ``titan_broker``, its two modules or a folder's ``__init__``, never
    a module inside a folder: what they use of each folder is listed in one place, its ``__all__``."""
    deep = sorted(
        f"{path.relative_to(ROOT)}: {node.module}"
        for folder in ("worker", "cli")
        for path in (ROOT / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.startswith("titan_broker.")
        and node.module.count(".") > 1
    )
    assert deep == []
