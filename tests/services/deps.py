from typing import Any

from titan_broker import process, public


@process(name="deps")
class Deps:
    async def init(self, config: dict[str, Any], label: str = "none") -> None:
        self.config = config
        self.label = label

    @public
    async def seen(self) -> dict[str, Any]:
        return {"config": self.config, "label": self.label}
