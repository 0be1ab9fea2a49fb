"""Checking a call's arguments against the method's signature before it runs.

Arity and names are checked by ``Signature.bind``; basic types by the
annotations: the builtins that msgpack carries (int, float, str, bytes, bool,
list, dict, tuple, None), unions and Optional, Literal, and the element
types of list/dict/tuple/Sequence/Mapping. Anything else (a class of the
service's own, a name only imported for type checking) is not checked.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from typing import Any

from .protocol import safe_repr

_SIMPLE: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),  # as in mypy, an int is acceptable where a float is expected
    complex: (int, float, complex),
    str: (str,),
    bytes: (bytes,),
    bytearray: (bytes, bytearray),
    bool: (bool,),
    list: (list,),
    dict: (dict,),
    tuple: (list, tuple),  # msgpack has no tuple: they arrive as arrays
}
_SEQUENCES = {list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection}
_MAPPINGS = {dict, collections.abc.Mapping, collections.abc.MutableMapping}


def check_arguments(
    name: str, signature: inspect.Signature, args: list[Any], kwargs: dict[str, Any]
) -> str | None:
    """None when the arguments fit ``signature``; else a message naming the argument at fault."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"{name}{signature}: {exc}"
    for pname, value in bound.arguments.items():
        param = signature.parameters[pname]
        ann = param.annotation
        if ann is inspect.Parameter.empty or isinstance(ann, str):
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            items = [(f"*{pname}[{i}]", v) for i, v in enumerate(value)]
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            items = [(f"**{pname}[{safe_repr(k, 40)}]", v) for k, v in value.items()]
        else:
            items = [(pname, value)]
        for label, item in items:
            if not matches(item, ann):
                return (
                    f"{name}{signature}: argument {label!r} must be {_show(ann)}, "
                    f"got {type(item).__name__} {_preview(item)}"
                )
    return None


def matches(value: Any, ann: Any) -> bool:
    """Whether ``value`` (as msgpack decodes it) fits the annotation ``ann``."""
    if ann is Any or ann is object or isinstance(ann, (str, typing.TypeVar)):
        return True
    if ann is None or ann is type(None):
        return value is None
    simple = _SIMPLE.get(ann)
    if simple is not None:
        if isinstance(value, bool) and ann in (float, complex):
            return False  # True where a number is expected is a bug, whatever isinstance says
        return isinstance(value, simple)
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is typing.Annotated:
        return matches(value, args[0])
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(matches(v, args[0]) for v in value)
    if origin in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        if len(args) != 2:
            return True
        return all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    return True  # a type msgpack cannot carry as such: not ours to judge


def _show(ann: Any) -> str:
    return ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")


def _preview(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 128:  # repr() refuses ints over 4,300 digits
        return f"(an integer of {value.bit_length()} bits)"
    text = safe_repr(value, 43)
    return f"({text[:40]}...)" if len(text) > 43 else f"({text})"
