"""A test service slow to start: it blocks while its file is imported, or in init(), as
``$SLOW_START`` says ("import:PATH" or "init:PATH"), after writing PATH to say it got there."""

import os
import time
from pathlib import Path

import anyio

from titan_broker import process, public

_WHERE, _, _MARK = os.environ.get("SLOW_START", "").partition(":")

if _WHERE == "import":
    Path(_MARK).write_text("importing")
    time.sleep(60)  # a heavy import (a model loaded, a cache warmed)


@process(name="slow-start")
class SlowStart:
    async def init(self) -> None:
        if _WHERE == "init":
            await anyio.Path(_MARK).write_text("in init")
            await anyio.sleep(60)  # a slow connection to a database

    @public
    async def ping(self) -> str:
        return "pong"
