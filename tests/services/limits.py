"""A test service for serve()'s helpers: rate limits in both scopes, a cache that counts its misses."""

from __future__ import annotations

from titan_broker import cache, process, public, rate_limit


@process(name="limits", version="1.0.0")
class Limits:
    async def init(self) -> None:
        self.runs = 0

    @public
    @rate_limit(rps=0.01, burst=1)
    async def shared(self) -> str:
        return "ok"

    @public
    @rate_limit(rps=0.01, burst=1, scope="worker", key=lambda user: user)
    async def own(self, user: str) -> str:
        return user

    @public
    @cache(ttl=3600)
    async def counted(self) -> int:
        self.runs += 1
        return self.runs
