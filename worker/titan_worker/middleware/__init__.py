"""Call middleware: what happens around a method call, one feature per module.

A method's chain is built once, when the worker starts: each module's
``build(spec, ctx)`` returns its middleware for that method, or None when the
method does not use the feature. A middleware is ``async def (call,
call_next) -> Outcome``: it may answer by itself (a cache hit, a refusal),
wrap the rest (a span, a timer) or act on the outcome (a cache put).

To add a feature: an options class and its decorator in
``titan_broker/_service/decorators.py``, a module here with ``FEATURE`` and
``build``, and its place in ``LAYERS``.
"""

from __future__ import annotations

from collections.abc import Callable

from titan_broker._errors import ConfigError
from titan_broker._service import MethodSpec

from ..call import Middleware, Next
from ..context import WorkerContext
from . import arguments as arguments
from . import cache as cache
from . import deadline as deadline
from . import invalidation as invalidation
from . import metric as metric
from . import rate_limit as rate_limit
from . import retry as retry
from . import trace as trace

Factory = Callable[[MethodSpec, WorkerContext], Middleware | None]

LAYERS = (trace, metric, retry, arguments, rate_limit, cache, invalidation, deadline)
"""Outermost first. A trace wraps everything, so refusals and cache hits get a span; a metric
counts and times all that it wraps, hits and refusals included, each attempt of a retried call
too; a retry sees only what the method raised (never a refusal); arguments are checked before a
rate limit spends a token on them; the deadline is nearest the method, so it bounds the run."""

SERVED_ELSEWHERE = frozenset({"periodic"})
"""Features that do not act around a call: @periodic's ticks are the worker's scheduler's."""


def chain(spec: MethodSpec, ctx: WorkerContext, endpoint: Next) -> Next:
    """The handler of ``spec``'s calls: its middleware around ``endpoint``.

    Raises ConfigError when the method has a feature no middleware serves.
    """
    served = {layer.FEATURE for layer in LAYERS if layer.FEATURE is not None} | SERVED_ELSEWHERE
    unknown = sorted(set(spec.features) - served)
    if unknown:
        raise ConfigError(f"{spec.name}() has features this worker cannot serve: {', '.join(unknown)}")
    handler = endpoint
    for layer in reversed(LAYERS):
        middleware = layer.build(spec, ctx)
        if middleware is not None:
            handler = _wrap(middleware, handler)
    return handler


def _wrap(middleware: Middleware, rest: Next) -> Next:
    # Hands back the middleware's own awaitable: no extra coroutine frame per layer and call.
    return lambda call: middleware(call, rest)
