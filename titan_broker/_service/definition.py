"""What a service is, read off its class: name, version, public methods, their signatures and the
types their arguments and results cross the wire as.

Also loads a service file, enforcing the rule of exactly one @process class per file.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import ConfigError, ServiceFileError
from .._wire.values import Parameters, WireType, result_type
from .decorators import (
    FEATURES_ATTR,
    HEALTH_ATTR,
    PROCESS_ATTR,
    PUBLIC_ATTR,
    SHUTDOWN_ATTR,
    CacheOptions,
    MetricOptions,
    PeriodicOptions,
    ProcessInfo,
    PublicOptions,
    RateLimitOptions,
    RetryOptions,
    TraceOptions,
)


def _shown(value: Any) -> Any:
    """An option's value as the registry (JSON) shows it: a function or class by its name."""
    return getattr(value, "__qualname__", repr(value)) if callable(value) else value


@dataclass(frozen=True)
class MethodSpec:
    """One @public method."""

    name: str
    signature: inspect.Signature
    """Without ``self``; used to check arguments before the method runs."""
    is_async: bool
    max_deliveries: int | None = None
    """Overrides the service's limit when set."""
    features: Mapping[str, Any] = field(default_factory=dict)
    """The options of each feature decorator on the method (@cache, @rate_limit, ...), by name."""
    streaming: bool = False
    """An async generator: its items are streamed to the caller."""
    parameters: Parameters = field(init=False, repr=False, compare=False)
    """Binds a call's arguments and decodes each into its parameter's annotation."""
    returns: WireType | None = field(init=False, repr=False, compare=False)
    """The type of the result (of each item, when it streams); None when the annotation checks nothing."""

    def __post_init__(self) -> None:
        # Made once here, used for every call; raises ConfigError for a type that cannot cross the wire.
        object.__setattr__(self, "parameters", Parameters(self.signature))
        object.__setattr__(self, "returns", result_type(self.signature.return_annotation, self.streaming))

    @property
    def cache(self) -> CacheOptions | None:
        return self.features.get(CacheOptions.feature)

    @property
    def rate_limit(self) -> RateLimitOptions | None:
        return self.features.get(RateLimitOptions.feature)

    @property
    def metric(self) -> MetricOptions | None:
        return self.features.get(MetricOptions.feature)

    @property
    def trace(self) -> TraceOptions | None:
        return self.features.get(TraceOptions.feature)

    @property
    def retry(self) -> RetryOptions | None:
        return self.features.get(RetryOptions.feature)

    @property
    def periodic(self) -> PeriodicOptions | None:
        return self.features.get(PeriodicOptions.feature)

    def decorators(self) -> dict[str, dict[str, Any]]:
        """The decorators on this method with their options, for the registry."""
        found: dict[str, dict[str, Any]] = {}
        for label, options in self.features.items():
            if options is not None:
                found[label] = {
                    k: [_shown(i) for i in v] if isinstance(v, tuple) else _shown(v)
                    for k, v in vars(options).items()
                    if v is not None and v != ()
                }
        return found

    @property
    def display(self) -> str:
        """``add(a: float, b: float) -> float``."""
        return f"{self.name}{self.signature}"

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description for the registry."""
        params = [
            {
                "name": p.name,
                "kind": p.kind.name.lower(),
                "annotation": _annotation(p.annotation),
                **({"default": repr(p.default)} if p.default is not p.empty else {}),
            }
            for p in self.signature.parameters.values()
        ]
        return {
            "name": self.name,
            "signature": self.display,
            "params": params,
            "returns": _annotation(self.signature.return_annotation),
            "async": self.is_async,
            "streaming": self.streaming,
            "decorators": self.decorators(),
        }


def _annotation(ann: Any) -> str | None:
    if ann is inspect.Parameter.empty:
        return None
    return ann if isinstance(ann, str) else inspect.formatannotation(ann)


@dataclass(frozen=True)
class ServiceDefinition:
    """A @process class and what the runtime needs to serve it."""

    cls: type
    info: ProcessInfo
    methods: dict[str, MethodSpec]
    health_check: str | None
    on_shutdown: tuple[str, ...]
    has_init: bool

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    def max_deliveries(self, method: str | None) -> int:
        """How often a call of ``method`` may be delivered before it is dead-lettered."""
        spec = self.methods.get(method) if method else None
        if spec is not None and spec.max_deliveries is not None:
            return spec.max_deliveries
        return self.info.max_deliveries


def _signature(fn: Any) -> inspect.Signature:
    try:
        sig = inspect.signature(fn, eval_str=True)
    except Exception:  # an annotation naming something only imported under TYPE_CHECKING
        sig = _resolved_one_by_one(fn)
    params = list(sig.parameters.values())[1:]  # drop self
    return sig.replace(parameters=params)


def _resolved_one_by_one(fn: Any) -> inspect.Signature:
    """The signature with each string annotation evaluated on its own: one that names something
    unknown at run time stays a string (and checks nothing), the others still check."""
    sig = inspect.signature(fn)
    scope = getattr(inspect.unwrap(fn), "__globals__", {})

    def resolve(annotation: Any) -> Any:
        if not isinstance(annotation, str):
            return annotation
        holder = types.SimpleNamespace(__annotations__={"it": annotation})
        try:
            return typing.get_type_hints(holder, globalns=scope, include_extras=True)["it"]
        except Exception:
            return annotation

    params = [p.replace(annotation=resolve(p.annotation)) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=resolve(sig.return_annotation))


def describe(cls: type) -> ServiceDefinition:
    """Read a @process class; raise ConfigError when it is not one or a marked method is unusable."""
    info = getattr(cls, PROCESS_ATTR, None)
    if not isinstance(info, ProcessInfo):
        raise ConfigError(f"{cls.__qualname__} is not a service: decorate it with @process(name=...)")
    methods: dict[str, MethodSpec] = {}
    health: list[str] = []
    shutdown: list[str] = []
    for attr, fn in inspect.getmembers(cls, inspect.isfunction):
        where = f"{cls.__qualname__}.{attr}"
        if getattr(fn, PUBLIC_ATTR, False):
            if attr.startswith("_") or attr == "init":
                raise ConfigError(f"{where} cannot be @public: names starting with '_' and init stay private")
            if inspect.isgeneratorfunction(fn):
                raise ConfigError(f"{where} is a generator: make it 'async def' to stream its items")
            opts = getattr(fn, PUBLIC_ATTR)
            limit = opts.max_deliveries if isinstance(opts, PublicOptions) else None
            try:
                methods[attr] = MethodSpec(
                    attr,
                    _signature(fn),
                    inspect.iscoroutinefunction(fn),
                    limit,
                    features=dict(getattr(fn, FEATURES_ATTR, {})),
                    streaming=inspect.isasyncgenfunction(fn),
                )
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if getattr(fn, HEALTH_ATTR, False):
            health.append(attr)
        if getattr(fn, SHUTDOWN_ATTR, False):
            if not inspect.iscoroutinefunction(fn):
                raise ConfigError(f"{where} is @on_shutdown and must be 'async def'")
            shutdown.append(attr)
    for spec in methods.values():
        if spec.periodic is not None:
            required = [
                p.name for p in spec.signature.parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]  # fmt: skip
            if required or spec.streaming:
                why = (
                    f"takes required arguments ({', '.join(required)})" if required else "streams its results"
                )
                raise ConfigError(
                    f"{cls.__qualname__}.{spec.name} is @periodic but {why}: nobody passes or reads them"
                )
        if spec.streaming and spec.cache is not None:
            raise ConfigError(f"{cls.__qualname__}.{spec.name} streams its results: it cannot be @cache'd")
        unknown = [m for m in (spec.cache.invalidated_by if spec.cache else ()) if m not in methods]
        if unknown:
            raise ConfigError(
                f"{cls.__qualname__}.{spec.name}: @cache(invalidated_by=...) names {', '.join(unknown)}, "
                f"which {'is' if len(unknown) == 1 else 'are'} not @public methods of the class"
            )
    if len(health) > 1:
        raise ConfigError(
            f"{cls.__qualname__} has several @health_check methods ({', '.join(health)}); keep one"
        )
    init = getattr(cls, "init", None)
    if init is not None and not inspect.iscoroutinefunction(init):
        raise ConfigError(f"{cls.__qualname__}.init must be 'async def init(self, **dependencies)'")
    return ServiceDefinition(
        cls=cls,
        info=info,
        methods=methods,
        health_check=health[0] if health else None,
        on_shutdown=tuple(shutdown),
        has_init=init is not None,
    )


@functools.cache
def result_types(cls: type) -> Mapping[str, WireType]:
    """What a caller decodes each method's result into, read once per class: method name -> type.

    A @process class's @public methods; any other class (a stub or Protocol
    written for the caller) by its public async methods, whose annotations say
    what the caller expects just as well. Raises ConfigError like ``describe``,
    or naming the method whose return annotation cannot cross the wire.
    """
    if isinstance(getattr(cls, PROCESS_ATTR, None), ProcessInfo):
        methods = describe(cls).methods
        return {name: spec.returns for name, spec in methods.items() if spec.returns is not None}
    found: dict[str, WireType] = {}
    for attr, fn in inspect.getmembers(cls, inspect.isfunction):
        streaming = inspect.isasyncgenfunction(fn)
        if attr.startswith("_") or not (streaming or inspect.iscoroutinefunction(fn)):
            continue
        try:
            returns = result_type(_signature(fn).return_annotation, streaming)
        except ConfigError as exc:
            raise ConfigError(f"{cls.__qualname__}.{attr} cannot type a proxy's results: {exc}") from None
        if returns is not None:
            found[attr] = returns
    return found


def load_service_file(path: str | Path) -> ServiceDefinition:
    """Import a service file and return its one @process class.

    The file's folder goes first on sys.path, as when running a script, so it
    can import its neighbours. Raises ServiceFileError naming the file.
    """
    file = Path(path).resolve()
    shown = str(path)
    if not file.is_file():
        raise ServiceFileError(
            shown, "file not found (give the path to a .py file holding one @process class)"
        )
    module_name = f"titan_service_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ServiceFileError(shown, "not a Python module (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ServiceFileError(shown, f"import failed: {type(exc).__name__}: {exc}") from exc
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == module_name and hasattr(obj, PROCESS_ATTR)
    ]
    if not found:
        raise ServiceFileError(
            shown,
            "no @process class found; decorate exactly one class with @process(name=..., version=...)",
        )
    if len(found) > 1:
        names = ", ".join(c.__name__ for c in found)
        raise ServiceFileError(
            shown,
            f"{len(found)} @process classes found ({names}); keep one per file and move the others",
        )
    try:
        return describe(found[0])
    except ConfigError as exc:
        raise ServiceFileError(shown, str(exc)) from exc
