import anyio

from titan_broker import process, public


@process(name="small-backlog", max_backlog=5)
class SmallBacklog:
    @public
    async def wait(self, seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds
