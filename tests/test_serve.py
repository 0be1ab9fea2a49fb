"""``titan_broker.testing``: serve() in the test's process, its helpers, and the pytest plugin, the way a
user of the library meets them (the example of docs/testing.md is run as it stands, from a folder
outside the repository, under the anyio plugin and under pytest-asyncio)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from titan_broker import CallTimeout, ProcessManager, RateLimited, RemoteError, TitanError, with_options
from titan_broker.testing import serve, served

from .conftest import ROOT, SERVICES, eventually

pytestmark = pytest.mark.anyio

DOC = ROOT / "docs" / "testing.md"


def _example_files() -> dict[str, str]:
    """The example's files: each ```python block of the page whose first line is ``# <name>.py``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return {m.group(1): block for block in blocks if (m := re.match(r"# (\w+\.py)\n", block))}


def _run_user_tests(folder: Path, plugin_off: str, *options: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TITAN_REDIS_URL")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", f"no:{plugin_off}", "-p", "no:cacheprovider",
         "--rootdir", str(folder), *options, str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip


@pytest.mark.timeout(180)
@pytest.mark.parametrize("runner", ["anyio", "asyncio", "asyncio-auto"])
def test_the_documented_example_passes_from_a_folder_of_its_own(tmp_path: Path, runner: str) -> None:
    files = _example_files()
    assert set(files) == {"inventory.py", "shop.py", "test_shop.py"}, "the page's example changed shape"
    for name, text in files.items():
        if name.startswith("test_") and runner.startswith("asyncio"):
            text = text.replace("pytest.mark.anyio", "pytest.mark.asyncio")
        (tmp_path / name).write_text(text)
    if runner == "anyio":
        result = _run_user_tests(tmp_path, "asyncio")
    else:  # pytest-asyncio alone, in its strict mode (the default) and its auto mode
        mode = "auto" if runner == "asyncio-auto" else "strict"
        result = _run_user_tests(tmp_path, "anyio", "-o", f"asyncio_mode={mode}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout, result.stdout
    assert "requested async @pytest.fixture" not in result.stdout, result.stdout


async def test_a_service_file_serves_with_several_workers_sharing_the_queue() -> None:
    from tests.services.pooled import Pooled

    async with serve(SERVICES / "pooled.py", Pooled, workers=3, concurrency=2) as pooled:
        ids = {w.worker_id for w in served(pooled).workers}
        assert len(ids) == 3
        assert await served(pooled).client.live_workers("pooled") == 3


async def test_start_up_errors_and_misuse_name_the_thing_at_fault() -> None:
    with pytest.raises(TitanError, match=r"Calculator\.init\(\) raised"):
        from processes.calculator import Calculator

        async with serve(Calculator, dependencies={"no_such": 1}):
            pass
    from processes.calculator import Calculator

    async with serve(Calculator) as calc:
        with pytest.raises(TitanError, match=r"no @periodic method of that name .*none"):
            await served(calc).tick("add")
    with pytest.raises(TitanError, match=r"not given by a serve\(\) that is still open"):
        served(calc)
    with pytest.raises(TitanError, match="workers=0"):
        serve(Calculator, workers=0)


async def test_streaming_deadlines_health_and_shutdown_behave_as_in_a_worker_process() -> None:
    from tests.services.lifecycle import Lifecycle

    log: list[str] = []
    async with serve(Lifecycle, dependencies={"log": log}) as svc:
        assert [i async for i in svc.count(3)] == [0, 1, 2]
        with pytest.raises(CallTimeout):
            await with_options(svc, timeout=0.2).nap(0.6)
        assert await svc.nap(0.01) == 0.01
        async with ProcessManager(served(svc).url, namespace=served(svc).namespace) as pm:
            health = await pm.health("lifecycle")
            assert health.status == "healthy", health

            async def measured() -> bool:  # published with the next heartbeat
                (record,) = await pm.workers_of("lifecycle")
                return bool(record.metrics)

            await eventually(measured, 5, "the @metric summary in the registry")
        assert log == []
    assert log == ["closed"]


async def test_rate_limits_reset_and_caches_clear() -> None:
    from tests.services.limits import Limits

    async with serve(Limits) as limits:
        assert (await limits.shared(), await limits.own("ann")) == ("ok", "ann")
        with pytest.raises(RateLimited):
            await limits.shared()
        with pytest.raises(RateLimited):
            await limits.own("ann")
        assert await served(limits).reset_rate_limits() == ["own", "shared"]
        assert (await limits.shared(), await limits.own("ann")) == ("ok", "ann")

        assert (await limits.counted(), await limits.counted()) == (1, 1)
        assert await served(limits).clear_caches() == ["counted"]
        assert await limits.counted() == 2


async def test_join_reports_what_is_left_and_due_now_drains_a_delayed_call() -> None:
    from processes.calculator import Calculator

    async with serve(Calculator) as calc:
        async with anyio.create_task_group() as tg:
            results: list[float] = []

            async def later() -> None:
                results.append(await with_options(calc, delay=3600).add(1, 2))

            tg.start_soon(later)
            keys, redis = served(calc).client.keys, served(calc).client.redis
            await eventually(lambda: redis.zcard(keys.delayed("calculator")), 5, "the call to be delayed")
            with pytest.raises(TitanError, match=r"1 delayed call\(s\) \(the next due in 3[0-9.]+ s"):
                await served(calc).join(timeout=0.3)
            assert await served(calc).due_now(at_least=1) == 1
        assert results == [3.0]
        await served(calc).join()
        with pytest.raises(RemoteError, match="Division by zero"):
            await calc.divide(1, 0)
        assert await served(calc).dead_letters() == []


def test_every_public_name_of_the_testing_package_says_what_it_is() -> None:
    import titan_broker.testing as testing
    from titan_broker.testing import _plugin

    names = [getattr(testing, name) for name in testing.__all__]
    fixtures = [_plugin.titan_redis_url, _plugin.titan_namespace, _plugin.titan_client, _plugin.titan_manager]
    helpers = [getattr(testing.Served, n) for n in ("join", "tick", "due_now", "dead_letters", "clear_caches",
               "reset_rate_limits", "proxy", "client", "url", "service")]  # fmt: skip
    undocumented = [repr(obj) for obj in names + fixtures + helpers if not (obj.__doc__ or "").strip()]
    assert undocumented == []
