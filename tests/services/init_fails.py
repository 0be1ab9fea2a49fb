from titan_broker import process, public


@process(name="init-fails")
class InitFails:
    async def init(self, dsn: str = "") -> None:
        raise RuntimeError(f"cannot open database {dsn!r}")

    @public
    async def ping(self) -> str:
        return "pong"
