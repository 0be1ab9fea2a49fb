"""What the annotations say arrives: values decoded into parameter and return types, checked.

A ``WireType`` is made once per annotation, when a service class is read
(``definition.MethodSpec``), and turns plain data, as ``codec.unpack`` gives
it, into the annotated type: a worker decodes each argument into its
parameter's annotation before the method runs (``Parameters``), and checks
each result against the return annotation before it is sent; a caller with
the service class decodes the result into it. msgspec does the decoding
(``msgspec.convert``, which validates as it goes); pydantic models go through
their own ``model_validate``; unions msgspec cannot tell apart by the wire
alone (``str | datetime``, two dataclasses) are tried member by member.

A value that does not fit raises ``Mismatch``, which says where and why; an
annotation that cannot cross the wire at all (a socket, a class that is not a
dataclass, TypedDict, NamedTuple, msgspec Struct or pydantic model) is a
ConfigError when the class is read, not a surprise at the first call.
"""

from __future__ import annotations

import collections.abc
import datetime
import decimal
import enum
import inspect
import re
import sys
import types
import typing
import uuid
from typing import Any

import msgspec
import msgspec.inspect as mi

from .._errors import ConfigError
from .codec import to_builtins
from .protocol import safe_repr

_EXACT = frozenset(
    {int, float, str, bytes, bool, type(None), datetime.datetime, datetime.date, datetime.time,
     datetime.timedelta, uuid.UUID, decimal.Decimal}
)  # fmt: skip
"""Annotations a value of exactly that type fits as it is (the fast path of every plain call)."""
_UNCHECKED = (Any, object)
_STREAMS = {collections.abc.AsyncIterator, collections.abc.AsyncIterable, collections.abc.AsyncGenerator}
_SEQUENCES: dict[Any, type] = {
    list: list, collections.abc.Sequence: list, collections.abc.MutableSequence: list,
    set: set, collections.abc.Set: set, collections.abc.MutableSet: set, frozenset: frozenset,
}  # fmt: skip
"""Containers decoded item by item when msgspec refuses their item type, and what each becomes."""
_MAPPINGS = {dict, collections.abc.Mapping, collections.abc.MutableMapping}


_SAYS_NOTHING_MORE = re.compile(r"Expected `[^`]*`, got `[^`]*`")
"""msgspec's problem for a value of the wrong type, which "must be X, got Y" says already."""


class Mismatch(Exception):
    """A value does not fit its annotation: ``problem`` at ``path`` (``.field``, ``[2]``; "" for the
    value itself)."""

    def __init__(self, problem: str, path: str = "") -> None:
        super().__init__(problem, path)
        self.problem = problem
        self.path = path

    def explain(self, what: str, root: str, expected: str, value: Any) -> str:
        """``argument 'x' must be Point, got dict ({'x': 1}): Object missing required field `y```."""
        message = f"{what} must be {expected}, got {_sent(value, expected)}"
        if self.path:
            return f"{message}: {root}{self.path}: {self.problem}"
        if not _SAYS_NOTHING_MORE.fullmatch(self.problem):
            return f"{message}: {self.problem}"
        return message


def _sent(value: Any, expected: str) -> str:
    """What came, for a message: a naive datetime crosses the wire as its RFC 3339 string, so a
    datetime sent where a date (or anything else) is annotated is named for what it was."""
    if isinstance(value, str) and "datetime" not in expected and _is_datetime_text(value):
        return f"a datetime (sent as str {value!r})"
    return f"{type(value).__name__} {preview(value)}"


def _is_datetime_text(value: str) -> bool:
    if len(value) > 40 or "T" not in value:
        return False
    try:
        datetime.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


class WireType:
    """Decodes plain data into one annotation, checking it; made once, used for every call."""

    __slots__ = ("_exact", "annotation", "shown")

    def __init__(self, annotation: Any) -> None:
        self.annotation = annotation
        self.shown = type_name(annotation)
        self._exact: Any = annotation if annotation in _EXACT or _is_enum(annotation) else _NoValue

    def decode(self, value: Any) -> Any:
        """``value`` as the annotated type; raise Mismatch when it does not fit."""
        if type(value) is self._exact:
            return value
        return self._convert(value)

    def check(self, value: Any) -> None:
        """Raise Mismatch when ``value``, as a method returned it, will not decode into this type at
        the caller; EncodeError when it cannot cross the wire at all.

        It is checked in its plain form, as the caller will decode it: msgspec
        would take a dataclass instance as it is, whatever its fields hold.
        """
        if type(value) is not self._exact:
            self._convert(to_builtins(value))

    def _convert(self, value: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<WireType {self.shown}>"


class _NoValue:
    """The "exact type" of an annotation that has none: no value is of this type."""


class _Converted(WireType):
    """A type msgspec decodes by itself: ``msgspec.convert`` into a one-field array-like Struct, whose
    decoder msgspec builds once and keeps (a bare ``list[X] | None`` would be analysed at every call)."""

    __slots__ = ("_box",)

    def __init__(self, annotation: Any) -> None:
        super().__init__(annotation)
        self._box: Any = msgspec.defstruct("Value", [("value", annotation)], array_like=True)

    def _convert(self, value: Any) -> Any:
        try:
            return msgspec.convert((value,), self._box, dec_hook=_from_plain).value
        except msgspec.ValidationError as exc:
            problem, _, path = str(exc).partition(" - at `$[0]")
            raise Mismatch(problem, path.rstrip("`")) from None


class _Union(WireType):
    """A union msgspec refuses (two members of one wire kind): a value of exactly one member's type
    is that member; else the first member it decodes into, in the order written."""

    __slots__ = ("_members",)

    def __init__(self, annotation: Any, members: list[WireType]) -> None:
        super().__init__(annotation)
        self._members = members

    def _convert(self, value: Any) -> Any:
        kind = type(value)
        for member in self._members:
            if kind is member._exact:
                return value
        for member in self._members:
            try:
                return member.decode(value)
            except Mismatch:
                continue
        raise Mismatch(f"Expected `{self.shown}`, got `{kind.__name__}`")


class _Collection(WireType):
    """A list, set, frozenset or ``tuple[X, ...]`` of a type msgspec refuses, item by item."""

    __slots__ = ("_items", "_make")

    def __init__(self, annotation: Any, items: WireType, make: type) -> None:
        super().__init__(annotation)
        self._items = items
        self._make = make

    def _convert(self, value: Any) -> Any:
        if not isinstance(value, list | tuple | set | frozenset):
            raise Mismatch(f"Expected `array`, got `{type(value).__name__}`")
        decoded = []
        for i, item in enumerate(value):
            try:
                decoded.append(self._items.decode(item))
            except Mismatch as exc:
                raise Mismatch(exc.problem, f"[{i}]{exc.path}") from None
        return self._make(decoded)


class _Tuple(WireType):
    """A fixed-length tuple with a member msgspec refuses, item by item."""

    __slots__ = ("_items",)

    def __init__(self, annotation: Any, items: list[WireType]) -> None:
        super().__init__(annotation)
        self._items = items

    def _convert(self, value: Any) -> Any:
        if not isinstance(value, list | tuple) or len(value) != len(self._items):
            raise Mismatch(f"Expected `array` of length {len(self._items)}, got `{type(value).__name__}`")
        decoded = []
        for i, (item, items) in enumerate(zip(value, self._items, strict=True)):
            try:
                decoded.append(items.decode(item))
            except Mismatch as exc:
                raise Mismatch(exc.problem, f"[{i}]{exc.path}") from None
        return tuple(decoded)


class _Dict(WireType):
    """A dict (or Mapping) with a key or value type msgspec refuses, entry by entry."""

    __slots__ = ("_keys", "_values")

    def __init__(self, annotation: Any, keys: WireType | None, values: WireType | None) -> None:
        super().__init__(annotation)
        self._keys = keys
        self._values = values

    def _convert(self, value: Any) -> Any:
        if not isinstance(value, dict):
            raise Mismatch(f"Expected `object`, got `{type(value).__name__}`")
        decoded = {}
        for key, item in value.items():
            try:
                k = self._keys.decode(key) if self._keys is not None else key
                decoded[k] = self._values.decode(item) if self._values is not None else item
            except Mismatch as exc:
                raise Mismatch(exc.problem, f"[{safe_repr(key, 40)}]{exc.path}") from None
        return decoded


def wire_type(annotation: Any) -> WireType | None:
    """The WireType of an annotation; None when it checks nothing (none, Any, object, a TypeVar, a name
    that could not be resolved). Raises ConfigError for a type that cannot cross the wire."""
    if _unchecked(annotation):
        return None
    try:
        info = mi.type_info(annotation)
    except TypeError as exc:  # msgspec refuses the type: a union it cannot tell apart, or worse
        return _by_hand(annotation, str(exc))
    except Exception as exc:  # a dataclass field naming something undefined, say
        raise ConfigError(f"{type_name(annotation)} cannot be decoded: {exc}") from exc
    foreign = _foreign(info, set())
    if foreign is not None:
        raise ConfigError(
            f"{type_name(annotation)} cannot cross the wire: {foreign.__module__}.{foreign.__qualname__} "
            "is not a "
            "type titan-broker carries (use a dataclass, TypedDict, NamedTuple, msgspec Struct or pydantic "
            "model; PROTOCOL.md, Values, lists the others)"
        )
    return _Converted(annotation)


def _by_hand(annotation: Any, reason: str) -> WireType:
    """A WireType for an annotation msgspec refuses, where a union in it is what it refuses."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return _Union(annotation, [_member(a) for a in args])
    if origin in _SEQUENCES and len(args) == 1:
        return _Collection(annotation, _member(args[0]), _SEQUENCES[origin])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _Collection(annotation, _member(args[0]), tuple)
    if origin is tuple and args:
        return _Tuple(annotation, [_member(a) for a in args])
    if origin in _MAPPINGS and len(args) == 2:
        return _Dict(annotation, wire_type(args[0]), wire_type(args[1]))
    raise ConfigError(
        f"{type_name(annotation)} cannot be decoded unambiguously: {reason} (a union of such types is "
        "decoded at the top level or in a list, tuple, set or dict, not in a field: use a tagged msgspec "
        "Struct, or a field per type)"
    )


def _member(annotation: Any) -> WireType:
    """A WireType for a part of a union or container: one that checks nothing takes any value."""
    found = wire_type(annotation)
    return found if found is not None else _Anything(annotation)


class _Anything(WireType):
    """Any value fits (``Any`` or ``object`` inside a union or container msgspec refuses)."""

    __slots__ = ()

    def _convert(self, value: Any) -> Any:
        return value


def _unchecked(annotation: Any) -> bool:
    return (
        annotation is inspect.Parameter.empty
        or annotation in _UNCHECKED
        or isinstance(annotation, str | typing.TypeVar | typing.ForwardRef)
    )


def _is_enum(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, enum.Enum)


def _children(node: Any) -> list[Any]:
    """The type nodes directly inside a msgspec.inspect node (items, keys, members, fields)."""
    found: list[Any] = []
    for name in node.__struct_fields__:
        child = getattr(node, name)
        for item in child if isinstance(child, tuple) else (child,):
            item = item.type if isinstance(item, mi.Field) else item
            if isinstance(item, mi.Type):
                found.append(item)
    return found


def _foreign(node: Any, seen: set[int]) -> type | None:
    """A class in the type that msgspec does not know and that is not a pydantic model, if any."""
    if id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, mi.CustomType) and node.cls is not object and not _is_model(node.cls):
        return node.cls
    for child in _children(node):
        found = _foreign(child, seen)
        if found is not None:
            return found
    return None


def _is_model(cls: Any) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(cls, type) and issubclass(cls, pydantic.BaseModel)


def _from_plain(kind: Any, value: Any) -> Any:
    """msgspec's hook for the types it does not know: pydantic models validate themselves."""
    if kind is object:
        return value
    if _is_model(kind):
        pydantic = sys.modules["pydantic"]
        try:
            return kind.model_validate(value)
        except pydantic.ValidationError as exc:  # one line per error, without the links
            errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"{kind.__name__}: {errors}") from None
    raise TypeError(f"{type_name(kind)} cannot cross the wire")  # wire_type() refuses such annotations


def stream_item(annotation: Any) -> Any:
    """The type of the items of a streaming method annotated ``AsyncIterator[T]`` (or AsyncIterable,
    AsyncGenerator): T; Any when it says nothing more."""
    if typing.get_origin(annotation) in _STREAMS and typing.get_args(annotation):
        return typing.get_args(annotation)[0]
    return Any


class Parameters:
    """A method's parameters: binds a call's arguments to them and decodes each into its annotation."""

    __slots__ = ("_any", "_by_name", "_more", "_names", "_plain", "_positional", "_rest", "signature")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        kinds = inspect.Parameter
        params = signature.parameters.values()
        typed = {p.name: self._type(p) for p in params}
        positional = [
            p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        ]
        self._names = positional
        self._positional = [typed[name] for name in positional]
        self._by_name = {p.name: typed[p.name] for p in params
                         if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}  # fmt: skip
        self._rest: tuple[str, WireType | None] | None = None
        self._more: tuple[str, WireType | None] | None = None
        for p in params:
            if p.kind is kinds.VAR_POSITIONAL:
                self._rest = (p.name, typed[p.name])
            elif p.kind is kinds.VAR_KEYWORD:
                self._more = (p.name, typed[p.name])
        self._any = any(t is not None for t in typed.values())
        self._plain: tuple[int, int] | None = None
        """How many positional arguments alone always bind (fewest, most), when some number does."""
        if not any(p.kind is kinds.KEYWORD_ONLY and p.default is p.empty for p in params):
            required = sum(1 for p in params if p.name in positional and p.default is p.empty)
            self._plain = (required, len(positional) if self._rest is None else sys.maxsize)

    @staticmethod
    def _type(param: inspect.Parameter) -> WireType | None:
        try:
            return wire_type(param.annotation)
        except ConfigError as exc:
            raise ConfigError(f"parameter {param.name!r}: {exc}") from None

    def decode(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        """Decode the arguments in place; None when they fit, else a message naming the argument at fault.

        The arity and the names are checked by ``Signature.bind``, so that the
        message is Python's own.
        """
        plain = self._plain
        if kwargs or plain is None or not plain[0] <= len(args) <= plain[1]:  # else bind() would pass
            try:
                self.signature.bind(*args, **kwargs)
            except TypeError as exc:
                return f"{method}{self.signature}: {exc}"
        if not self._any:
            return None
        count = len(self._names)
        for i, value in enumerate(args):
            if i < count:
                label, kind = self._names[i], self._positional[i]
            else:
                assert self._rest is not None  # bind() let more arguments through
                label, kind = f"*{self._rest[0]}[{i - count}]", self._rest[1]
            if kind is not None:
                try:
                    args[i] = kind.decode(value)
                except Mismatch as exc:
                    return self._refusal(method, label, kind, value, exc)
        for key, value in kwargs.items():
            if key in self._by_name:
                label, kind = key, self._by_name[key]
            else:
                assert self._more is not None  # bind() let an unknown name through
                label, kind = f"**{self._more[0]}[{safe_repr(key, 40)}]", self._more[1]
            if kind is not None:
                try:
                    kwargs[key] = kind.decode(value)  # same keys: the dict may change while iterated
                except Mismatch as exc:
                    return self._refusal(method, label, kind, value, exc)
        return None

    def _refusal(self, method: str, label: str, kind: WireType, value: Any, exc: Mismatch) -> str:
        root = label.lstrip("*")
        return f"{method}{self.signature}: " + exc.explain(f"argument {label!r}", root, kind.shown, value)


def result_type(return_annotation: Any, streaming: bool) -> WireType | None:
    """The WireType of a method's result (of each item, when it streams); raises ConfigError."""
    annotation = stream_item(return_annotation) if streaming else return_annotation
    try:
        return wire_type(annotation)
    except ConfigError as exc:
        raise ConfigError(f"{'items' if streaming else 'return annotation'}: {exc}") from None


def type_name(annotation: Any) -> str:
    """An annotation as it reads in code: ``list[Point] | None``, ``Literal['a', 'b']``."""
    if annotation is None or annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return (
            f"{name}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]" if args else name
        )
    return str(annotation).replace("typing.", "")


def preview(value: Any) -> str:
    """A short repr of a value for a message, in parentheses."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr() refuses ints over 4,300 digits
        return f"(an integer of {value.bit_length()} bits)"
    text = safe_repr(value, 43)
    return f"({text[:40]}...)" if len(text) > 43 else f"({text})"
