"""A client's link to each service it calls: where its requests go out and its replies come back.

Every key of a service lives in one hash slot (keys.py), its callers' reply
streams included, so a client speaks to each service on the node that
serves that slot: per service, a Sender (requests, auto-pipelined on a
channel of its own) and a ReplyDispatcher (the reply stream, read on
another channel). Both channels follow the slot's primary through a
failover by themselves (connection.Channel). On one Redis the same holds
with every link on the one server.

A link opens on the first call to its service; concurrent first calls share
one opening, and a caller that gives up does not cancel it for the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio
import anyio.abc
import redis.asyncio as aioredis

from .._errors import RedisUnavailable, TitanError
from .._redis.connection import REDIS_ERRORS, SOCKET_TIMEOUT, AutoPipeline, Channel, Redis, titan_error
from .._redis.topology import Topology
from .._wire.keys import Keys
from .replies import READ_BLOCK_MS, ReplyDispatcher
from .sending import Sender

logger = logging.getLogger(__name__)


MAX_LINKS = 64
"""Links a client keeps open (two connections each): past it, the least recently used idle one closes."""


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass(eq=False)
class Link:
    """One service's sender and reply dispatcher, on channels of their own."""

    service: str
    reply_key: str
    sender: Sender
    dispatcher: ReplyDispatcher
    channels: tuple[Channel, ...]
    used: float = 0.0
    """Event-loop time of the last call that took this link."""
    scope: anyio.CancelScope | None = None
    """Where the dispatcher runs: cancelled when the link closes."""

    @property
    def idle(self) -> bool:
        """No call waits on this link (it may be closed)."""
        return self.dispatcher.idle

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Run the dispatcher, and the sender's withdrawals, in ``tg``."""
        self.sender.tg = tg
        tg.start_soon(self._serve)

    async def _serve(self) -> None:
        with anyio.CancelScope() as self.scope:
            await self.dispatcher.run()

    def abandon(self, keys: Keys, error: Callable[[], TitanError]) -> None:
        """The client closes: withdraw every request still in Redis and fail every waiting call.

        The withdrawals wait for ``clean_up`` (the task group that would run them is gone).
        """
        self.sender.tg = None
        for call_id, placement, streams in self.dispatcher.placements():  # their callers wake after this
            control = keys.stream_control(self.service, call_id) if streams else None
            self.sender.withdraw(placement, 0.0, control, call_id)
        self.dispatcher.fail_all(error)

    async def clean_up(self, redis: Redis) -> None:
        """Withdraw what ``abandon`` left and delete the reply stream; raises redis-py errors."""
        await self.sender.withdraw_pending()
        await redis.delete(*self.dispatcher.own_keys)

    async def aclose(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        await self.sender.pipe.aclose()
        for channel in self.channels:
            await channel.aclose()


def _nobody(service: str) -> str | None:
    return None


class Links:
    """The links of one client, by service (see the module's doc)."""

    def __init__(
        self, topology: Topology, keys: Keys, client_id: str, max_backlog: int, redis: Callable[[], Redis]
    ) -> None:
        self.topology = topology
        self.keys = keys
        self.client_id = client_id
        self.max_backlog = max_backlog
        self._redis = redis
        self._links: dict[str, Link] = {}
        self._opening: dict[str, asyncio.Task[Link]] = {}
        self.tg: anyio.abc.TaskGroup | None = None
        """Where dispatchers and withdrawals run; None while the client is closed."""
        self.user_of: Callable[[str], str | None] = _nobody
        """service -> this client's ACL user when it is registered for the service (its calls go to
        the user's own request streams), else None."""

    def get(self, service: str, now: float | None = None) -> Link | None:
        """The open link of ``service``, marked used ``now`` (event-loop time; read when not given)."""
        link = self._links.get(service)
        if link is not None:
            link.used = anyio.current_time() if now is None else now
        return link

    def run_id(self, service: str) -> str | None:
        """The run_id of the Redis that ``service``'s link talks to, if it is open and knows it."""
        link = self._links.get(service)
        return link.dispatcher.run_id if link is not None else None

    def __iter__(self) -> Iterator[Link]:
        return iter(list(self._links.values()))

    async def open(self, service: str, deadline: float) -> Link:
        """The link to ``service``, opened now if need be, by ``deadline`` (event loop time).

        Raises RedisUnavailable when the service's node cannot be reached in time.
        """
        link = self.get(service)
        if link is not None:
            return link
        task = self._opening.get(service)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(service))
            self._opening[service] = task
            task.add_done_callback(lambda _: self._opening.pop(service, None))
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _cancelling():
                raise TitanError("client closed while connecting") from None
            raise
        except TimeoutError:
            host, port = self.topology.locate(self.keys.calls(service))
            raise RedisUnavailable(
                f"cannot reach the Redis node that serves {service!r} ({host}:{port}) "
                "within the call's timeout"
            ) from None

    async def _open(self, service: str) -> Link:
        if self.tg is None:
            raise TitanError("client is not connected: use 'async with' first")
        slot_key = self.keys.calls(service)
        reply_key = self.keys.reply(service, self.client_id)
        channels: list[Channel] = []
        sender: Sender | None = None
        try:
            sender_channel = await Channel.open(self.topology, slot_key)
            channels.append(sender_channel)
            receiver = await Channel.open(
                self.topology, slot_key, socket_timeout=SOCKET_TIMEOUT + READ_BLOCK_MS / 1000
            )
            channels.append(receiver)
            sender = Sender(self.keys, self.max_backlog, AutoPipeline(sender_channel), self._redis)
            sender.user_of = self.user_of
            await sender.sync_clock()
            dispatcher = ReplyDispatcher(receiver, reply_key)
            await dispatcher.start()
        except BaseException as exc:
            if sender is not None:
                await sender.pipe.aclose()
            for channel in channels:
                await channel.aclose()
            if isinstance(exc, REDIS_ERRORS):
                raise titan_error(
                    exc, f"connect to the Redis node that serves {service!r}", command="XREAD", key=reply_key
                ) from exc
            raise
        link = Link(service, reply_key, sender, dispatcher, tuple(channels), anyio.current_time())
        dispatcher.on_reconnect = lambda: self._reconnected(link)
        if self.tg is None:  # the client closed while this link opened
            await link.aclose()
            raise TitanError("client closed while connecting")
        link.start(self.tg)
        self._links[service] = link
        await self._evict()
        return link

    async def _evict(self) -> None:
        """Past MAX_LINKS, close the links used longest ago that no call waits on."""
        idle = [link for link in self._links.values() if link.idle]
        for link in sorted(idle, key=lambda k: k.used)[: max(0, len(self._links) - MAX_LINKS)]:
            del self._links[link.service]
            try:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._redis().delete(*link.dispatcher.own_keys)
            except REDIS_ERRORS as exc:
                logger.debug("could not delete %s (%s); it expires", link.reply_key, exc)
            await link.aclose()

    async def _reconnected(self, link: Link) -> None:
        """The link's node was lost and is back: drop idle connections, so no call goes out on a dead one."""
        redis = self._redis()
        if isinstance(redis, aioredis.Redis):  # a cluster client refreshes its own connections
            await redis.connection_pool.disconnect(inuse_connections=False)
        await link.sender.pipe.reset()

    def detach(self) -> list[Link]:
        """Forget every link (the client closes); the caller closes them."""
        for task in self._opening.values():
            task.cancel()
        links, self._links = list(self._links.values()), {}
        return links
