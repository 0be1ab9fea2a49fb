"""Call services whose workers run elsewhere (other containers, other hosts): `python -m examples.remote`.

Start the workers first, anywhere that reaches the same Redis, e.g.:
    titan-worker run processes/calculator.py
    titan-worker run processes/database.py --dep 'config={"path": "/tmp/users.db"}'
    titan-worker run processes/image_processor.py
This is the caller in compose.yaml. It waits up to --wait seconds for each service.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import anyio
from PIL import Image
from rich.console import Console

if __package__ in (None, ""):  # run as a script (python examples/x.py): the project's root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processes.calculator import Calculator
from processes.database import Database
from processes.image_processor import ImageProcessor
from titan_broker import ProcessManager, RemoteError, with_options

console = Console()


async def wait_for(pm: ProcessManager, service: str, seconds: float) -> None:
    with anyio.fail_after(seconds):
        while not await pm.workers_of(service):  # noqa: ASYNC110 - the registry lives in Redis
            await anyio.sleep(0.2)


async def main(wait: float) -> None:
    async with ProcessManager() as pm:
        for service in ("calculator", "database", "image-processor"):
            await wait_for(pm, service, wait)
        calc = with_options(await pm.connect("calculator", Calculator), timeout=10)
        console.print(f"calculator: 6 * 7 = {await calc.multiply(6, 7)}")
        db = with_options(await pm.connect("database", Database), timeout=10)
        try:
            user = await db.create_user("Remote Caller", "remote@example.org")
        except RemoteError as exc:
            console.print(f"database: {exc.message}")
            [user] = await db.search_users("remote@example.org")
        console.print(f"database: user {user.id} is {(await db.get_user(user.id)).name}")
        images = with_options(await pm.connect("image-processor", ImageProcessor), timeout=30)
        picture = io.BytesIO()
        Image.new("RGB", (640, 480), "teal").save(picture, format="PNG")
        thumb = await images.generate_thumbnail(picture.getvalue(), 96)
        size = Image.open(io.BytesIO(thumb)).size
        console.print(f"image-processor: thumbnail of {len(thumb)} bytes, {size}")
        for info in await pm.services():
            console.print(f"  {info.name}: {len(info.workers)} worker(s) on {sorted(info.hosts)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for each service")
    anyio.run(main, parser.parse_args().wait)
