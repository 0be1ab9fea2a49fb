"""``titan dashboard`` in a real browser: Debian's headless Chromium driven by Playwright.

One test walks an operator's session: the page shows a spawned service and its
workers, calls show up without a reload, a job appears with its state, a
killed worker goes grey, replaying a dead letter is refused before the token is
given and works after, and Redis stopping then coming back is shown and
recovered from. A screenshot of the page is saved in the test's temporary
folder (and to $TITAN_DASHBOARD_SCREENSHOT when set: docs/images/dashboard.png).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import redis as sync_redis

from titan_broker import Client
from titan_broker._wire.keys import Keys
from titan_broker.testing._local_redis import LocalRedis

from .conftest import CALCULATOR, FAST_FAILOVER, SERVICES, Workers
from .test_dashboard import TOKEN, Dashboard, dead_letter

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
WAIT_MS = 15_000

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
playwright_sync = pytest.importorskip("playwright.sync_api")

T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread of its own: Playwright's sync API owns this thread's event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=60)


def with_client(url: str, namespace: str, work: Callable[[Client], Any]) -> Any:
    async def main() -> Any:
        async with Client(url, namespace=namespace) as client:
            return await work(client)

    return in_thread(lambda: anyio.run(main))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    """A Redis of this test's own, to stop and start again on the same port."""
    (tmp_path / "redis").mkdir()
    server = LocalRedis(dir=str(tmp_path / "redis")).start()
    yield server
    server.close()


def test_an_operator_session_in_chromium(
    redis_server: LocalRedis, namespace: str, tmp_path: Path, workers: Workers
) -> None:
    url = redis_server.url
    keys = Keys(namespace)
    workers.url = url
    log = tmp_path / "runs.log"
    dep = ("--dep", f"log={json.dumps(str(log))}")
    for _ in range(3):
        workers.start(CALCULATOR, *FAST_FAILOVER)
    workers.start(SERVICES / "tasks.py", *dep, *FAST_FAILOVER)
    workers.start(SERVICES / "ticker.py", *dep, *FAST_FAILOVER)
    for name, count in (("calculator", 3), ("tasks", 1), ("ticker", 1)):
        workers.wait_registered(name, count)
    board = Dashboard(url, namespace, "--token", TOKEN)
    try:
        with playwright_sync.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1680, "height": 1180})
                page.set_default_timeout(WAIT_MS)
                session(page, board, url, namespace, keys, workers, redis_server, tmp_path)
            finally:
                browser.close()
    finally:
        board.close()


def session(
    page: Any, board: Dashboard, url: str, namespace: str, keys: Keys, workers: Workers,
    redis_server: LocalRedis, tmp_path: Path,
) -> None:  # fmt: skip
    expect = playwright_sync.expect
    page.goto(board.url)
    services = page.locator("#services tbody")
    expect(services.locator("tr[data-svc='calculator']")).to_be_visible()
    expect(page.locator("#conn")).to_have_text("live")
    calculator_rows = page.locator("#workers tbody tr:not(.gone)", has_text="calculator")
    expect(calculator_rows).to_have_count(3)
    page.evaluate("window.__loaded_once = true")  # gone if the page reloads

    # Calls made now show in the workers' counters and the service's rate, without a reload.
    def calls(client: Client) -> Any:
        async def run() -> None:
            with anyio.move_on_after(4):
                while True:
                    async with anyio.create_task_group() as tg:
                        for i in range(20):
                            tg.start_soon(client.call, "calculator", "add", (i, 1))
                    await anyio.sleep(0.05)

        return run()

    with_client(url, namespace, calls)
    page.wait_for_function(
        """() => [...document.querySelectorAll('#workers tbody tr:not(.gone)')]
             .filter(r => r.textContent.includes('calculator'))
             .reduce((a, r) => a + Number(r.querySelector('td.calls').textContent), 0) >= 100"""
    )
    assert page.evaluate("window.__loaded_once") is True, "the page reloaded"

    # A submitted job appears with its state; a delayed one stays queued.
    def submit(client: Client) -> Any:
        async def run() -> tuple[str, str, str]:
            done = await client.submit("tasks", "add", (2, 3))
            failed = await client.submit("tasks", "flaky", (5, "f"))
            queued = await client.submit("tasks", "add", (1, 1), delay=600)
            await client.job(done).result(timeout=10)
            return done, failed, queued

        return run()

    done, _failed, queued = with_client(url, namespace, submit)
    expect(page.locator(f"#jobs-latest tr[data-job='{done}']")).to_contain_text("done")
    expect(page.locator(f"#jobs-latest tr[data-job='{queued}']")).to_contain_text("queued")
    expect(page.locator("#jobs-failed tbody")).to_contain_text("ConnectionError")
    expect(page.locator("#schedules tbody")).to_contain_text("ticker.tick")
    page.fill("#job-id", done)
    page.click("#job-find button")
    expect(page.locator("#job-kv")).to_contain_text("done")

    # A dead letter: replay refused before the token is given, done after.
    with sync_redis.Redis.from_url(url) as client:
        dead_letter(client, keys, "calculator", "browser-1", 20, 22)
    services.locator("tr[data-svc='calculator']").click()
    expect(page.locator("#dead-letters")).to_contain_text("add")
    page.wait_for_timeout(2500)  # let the charts gather a few points for the screenshot
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("TITAN_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, os.environ["TITAN_DASHBOARD_SCREENSHOT"])
    page.locator("#dead-letters button", has_text="replay").first.click()
    expect(page.locator("#dl-msg")).to_contain_text("refused (403)")
    with sync_redis.Redis.from_url(url) as client:
        assert client.xlen(keys.dead("calculator")) == 1
    page.fill("#token", TOKEN)
    page.click("#unlock")
    expect(page.locator("#mode")).to_have_text("actions unlocked")
    page.locator("#dead-letters button", has_text="replay").first.click()
    expect(page.locator("#dl-msg")).to_contain_text('"replayed":1')
    expect(page.locator("#dead-letters")).to_contain_text("none")
    expect(services.locator("tr[data-svc='calculator'] td").nth(8)).to_have_text("0")

    # A killed worker goes grey, then the page says how many are left.
    victim = workers.procs[0]
    workers.kill(victim)
    expect(page.locator(f"#workers tbody tr.gone:has(td:text-is('{victim.pid}'))")).to_be_visible()
    expect(calculator_rows).to_have_count(2)
    expect(page.locator("#events")).to_contain_text("gone")

    # Redis stops: the page says so within seconds; it comes back: the page recovers by itself.
    stopped = threading.Event()
    redis_server.stop()
    stopped.set()
    expect(page.locator("#banner")).to_contain_text("Redis unreachable", timeout=5_000)
    expect(page.locator("#conn")).to_have_text("Redis unreachable")
    redis_server.start()
    expect(page.locator("#conn")).to_have_text("live", timeout=20_000)
    expect(page.locator("#banner")).to_be_hidden()
    expect(services.locator("tr[data-svc='calculator']")).to_be_visible()
    assert page.evaluate("window.__loaded_once") is True, "the page reloaded"
    page.screenshot(path=str(tmp_path / "dashboard-after.png"), full_page=True)
