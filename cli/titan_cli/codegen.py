"""``titan codegen typescript``: TypeScript declarations of the services in the registry.

Each service becomes an interface for the Node client (``client.service<Calculator>("calculator")``)
written from the signatures its workers registered: one method per ``@public`` method, a
``Promise`` of its result, or an ``AsyncIterable`` of its items when it streams. Types map as
PROTOCOL.md's Values table says a JavaScript client sees them. A class an annotation names
(dataclass, TypedDict, NamedTuple, Enum, msgspec Struct, pydantic model) is read by importing its
module, so run the command where the services' code is importable (the current directory is on
the path); one that cannot be imported, and any type without a wire form, is ``unknown``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import keyword
import os
import re
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from titan_broker._calling import Client
from titan_broker._errors import TitanError
from titan_broker._registry import ServiceInfo, list_services
from titan_broker._service import load_service_file

from .common import EXIT_USAGE, Command, NamespaceOption, RedisOption, UnknownService, app, err, out, run

codegen_app = typer.Typer(
    help="Generate code for callers in other languages.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(codegen_app, name="codegen")

HEADER = """\
// TypeScript declarations of titan-broker services, written by `titan codegen typescript`
// from the signatures their workers registered. Regenerate rather than edit.
import type { Kw } from "titan-broker";
"""

_TS_RESERVED = frozenset(
    {
        "break", "case", "catch", "class", "const", "continue", "debugger", "default", "delete", "do",
        "else", "enum", "export", "extends", "false", "finally", "for", "function", "if", "import",
        "in", "instanceof", "new", "null", "return", "super", "switch", "this", "throw", "true", "try",
        "typeof", "var", "void", "while", "with", "as", "implements", "interface", "let", "package",
        "private", "protected", "public", "static", "yield", "await", "any", "boolean", "number",
        "string", "symbol", "unknown", "never", "object", "bigint", "undefined",
    }
)  # fmt: skip
_IDENTIFIER = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")


@dataclass
class Node:
    """A type, parsed from an annotation string or read off a type object."""

    name: str
    """A dotted name (``int``, ``datetime.datetime``, ``processes.database.User``), or one of
    ``|`` (a union of ``args``), ``[]`` (a bare list of ``args``), ``...``, ``None``, ``literal``."""
    args: list[Node] = field(default_factory=list)
    value: Any = None
    """A literal's value."""
    obj: Any = None
    """The type object itself, when it was read off one (a class's fields)."""


# --- annotation strings -> Node --------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|(?P<num>-?\d+(?:\.\d+)?)|"
                    r"(?P<name>[^\W\d][\w.]*)|(?P<op>\.\.\.|[\[\],|]))")  # fmt: skip


def parse(text: str) -> Node:
    """The Node of an annotation string (``list[processes.database.User] | None``); raises ValueError."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"cannot read the annotation {text!r} at {text[pos:]!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    node, rest = _union(tokens, 0)
    if rest != len(tokens):
        raise ValueError(f"cannot read the annotation {text!r}")
    return node


def _union(tokens: list[tuple[str, str]], i: int) -> tuple[Node, int]:
    members = []
    node, i = _atom(tokens, i)
    members.append(node)
    while i < len(tokens) and tokens[i] == ("op", "|"):
        node, i = _atom(tokens, i + 1)
        members.append(node)
    return (members[0] if len(members) == 1 else Node("|", members)), i


def _atom(tokens: list[tuple[str, str]], i: int) -> tuple[Node, int]:
    if i >= len(tokens):
        raise ValueError("the annotation ends too early")
    kind, text = tokens[i]
    if kind == "str":
        return Node("literal", value=json.loads(text) if text.startswith('"') else _py_str(text)), i + 1
    if kind == "num":
        return Node("literal", value=float(text) if "." in text else int(text)), i + 1
    if (kind, text) == ("op", "..."):
        return Node("..."), i + 1
    if (kind, text) == ("op", "["):  # a bare list, as in Callable[[int], str]
        items, i = _items(tokens, i + 1)
        return Node("[]", items), i
    if kind != "name":
        raise ValueError(f"unexpected {text!r} in the annotation")
    node = Node(text)
    i += 1
    if i < len(tokens) and tokens[i] == ("op", "["):
        node.args, i = _items(tokens, i + 1)
        if node.name.rsplit(".", 1)[-1] == "Literal":
            node = Node("|", [a if a.name == "literal" else _literal_name(a) for a in node.args])
    return node, i


def _literal_name(node: Node) -> Node:
    """``Literal[None]`` or ``Literal[True]``: written as names."""
    values = {"None": None, "True": True, "False": False}
    return (
        Node("literal", value=values[node.name]) if node.name in values else Node("literal", value=node.name)
    )


def _items(tokens: list[tuple[str, str]], i: int) -> tuple[list[Node], int]:
    items: list[Node] = []
    while i < len(tokens) and tokens[i] != ("op", "]"):
        node, i = _union(tokens, i)
        items.append(node)
        if i < len(tokens) and tokens[i] == ("op", ","):
            i += 1
    if i >= len(tokens):
        raise ValueError("an annotation's '[' is not closed")
    return items, i + 1


def _py_str(text: str) -> str:
    body = text[1:-1]
    return body.encode().decode("unicode_escape") if "\\" in body else body


# --- type objects -> Node --------------------------------------------------------------------------


def from_type(tp: Any) -> Node:
    """The Node of a type object (a class's field annotation)."""
    if tp is None or tp is type(None):
        return Node("None")
    if isinstance(tp, str):
        try:
            return parse(tp)
        except ValueError:
            return Node("typing.Any")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return Node("|", [Node("literal", value=a.value if isinstance(a, enum.Enum) else a) for a in args])
    if origin is typing.Annotated:
        return from_type(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return Node("|", [from_type(a) for a in args])
    if origin is typing.ClassVar or origin is typing.Final:
        return from_type(args[0]) if args else Node("typing.Any")
    if _is_required_marker(origin):
        return from_type(args[0])
    if origin is not None:
        return Node(
            _dotted(origin), [Node("...") if a is Ellipsis else from_type(a) for a in args], obj=origin
        )
    if tp is typing.Any:
        return Node("typing.Any")
    if isinstance(tp, type):
        return Node(_dotted(tp), obj=tp)
    return Node("typing.Any")


def _is_required_marker(origin: Any) -> bool:
    return (
        origin in (getattr(typing, "Required", None), getattr(typing, "NotRequired", None))
        and origin is not None
    )


def _dotted(cls: Any) -> str:
    module = getattr(cls, "__module__", "")
    name = getattr(cls, "__qualname__", getattr(cls, "__name__", repr(cls)))
    return name if module == "builtins" else f"{module}.{name}"


# --- Node -> TypeScript ----------------------------------------------------------------------------

_SCALARS = {
    "int": "number | bigint",
    "float": "number",
    "complex": "unknown",
    "str": "string",
    "bool": "boolean",
    "bytes": "Uint8Array",
    "bytearray": "Uint8Array",
    "memoryview": "Uint8Array",
    "None": "null",
    "NoneType": "null",
    "datetime.datetime": "Date",
    "datetime.date": "string",
    "datetime.time": "string",
    "datetime.timedelta": "string",
    "uuid.UUID": "string",
    "decimal.Decimal": "string",
    "typing.Any": "unknown",
    "Any": "unknown",
    "object": "unknown",
}
_ARRAYS = {
    "list", "set", "frozenset", "typing.List", "typing.Set", "typing.FrozenSet", "typing.Sequence",
    "typing.MutableSequence", "typing.AbstractSet", "typing.Iterable", "typing.Collection",
    "collections.abc.Sequence", "collections.abc.MutableSequence", "collections.abc.Set",
    "collections.abc.MutableSet", "collections.abc.Iterable", "collections.abc.Collection",
    "collections.deque", "typing.Deque",
}  # fmt: skip
_MAPS = {
    "dict", "typing.Dict", "typing.Mapping", "typing.MutableMapping", "collections.abc.Mapping",
    "collections.abc.MutableMapping", "collections.OrderedDict", "collections.defaultdict",
}  # fmt: skip
_STREAMS = {
    "collections.abc.AsyncIterator", "collections.abc.AsyncGenerator", "collections.abc.AsyncIterable",
    "typing.AsyncIterator", "typing.AsyncGenerator", "typing.AsyncIterable",
}  # fmt: skip


class Writer:
    """Turns Nodes into TypeScript, collecting the declarations of the classes they name."""

    def __init__(self) -> None:
        self.declarations: dict[str, str] = {}
        """TypeScript name -> its declaration, in the order first met."""
        self._names: dict[str, str] = {}
        """Dotted Python name -> TypeScript name."""
        self._visiting: set[str] = set()

    def ts(self, node: Node) -> str:
        name = node.name
        if name == "|":
            members: list[str] = []
            for member in node.args:
                text = self.ts(member)
                for part in _split_union(text):
                    if part not in members:
                        members.append(part)
            return " | ".join(members) if members else "never"
        if name == "literal":
            return json.dumps(node.value) if node.value is not None else "null"
        if name in ("...", "[]"):
            return "unknown"
        short = name.removeprefix("typing.")
        if name in _SCALARS:
            return _SCALARS[name]
        if short == "Optional" and node.args:
            return self.ts(Node("|", [node.args[0], Node("None")]))
        if name in _ARRAYS:
            return f"Array<{self.ts(node.args[0])}>" if node.args else "unknown[]"
        if name in ("tuple", "typing.Tuple"):
            if len(node.args) == 2 and node.args[1].name == "...":
                return f"Array<{self.ts(node.args[0])}>"
            if not node.args:
                return "unknown[]"
            return "[" + ", ".join(self.ts(a) for a in node.args) + "]"
        if name in _MAPS:
            value = self.ts(node.args[1]) if len(node.args) == 2 else "unknown"
            return f"Record<string, {value}>"
        if name in _STREAMS:
            return f"AsyncIterable<{self.ts(node.args[0])}>" if node.args else "AsyncIterable<unknown>"
        if "." in name or node.obj is not None:
            return self._named(node)
        return "unknown"

    def _named(self, node: Node) -> str:
        cls = node.obj if isinstance(node.obj, type) else _import(node.name)
        if cls is None:
            return "unknown"
        dotted = _dotted(cls)
        if dotted in _SCALARS:
            return _SCALARS[dotted]
        if dotted in self._names:
            return self._names[dotted]
        if isinstance(cls, type) and issubclass(cls, enum.Enum):
            values = [
                json.dumps(m.value) if isinstance(m.value, str | int | float | bool) else "unknown"
                for m in cls
            ]
            return self._declare(
                dotted, cls, lambda ts_name: f"export type {ts_name} = {' | '.join(values) or 'never'};"
            )
        fields = _fields(cls)
        if fields is None:
            return "unknown"
        if _is_namedtuple(cls):
            return self._declare(
                dotted, cls,
                lambda ts_name: f"export type {ts_name} = [{', '.join(self.ts(from_type(t)) for _, t, _ in fields)}];",  # noqa: E501
            )  # fmt: skip

        def interface(ts_name: str) -> str:
            lines = [f"export interface {ts_name} {{"]
            for fname, ftype, optional in fields:
                lines.append(f"  {_prop(fname)}{'?' if optional else ''}: {self.ts(from_type(ftype))};")
            lines.append("}")
            return "\n".join(lines)

        return self._declare(dotted, cls, interface)

    def _declare(self, dotted: str, cls: type, build: typing.Callable[[str], str]) -> str:
        ts_name = self.unique(getattr(cls, "__name__", "Type"))
        self._names[dotted] = ts_name
        self.declarations[ts_name] = ""  # reserved: a recursive reference finds the name
        doc = cls.__doc__ if not (cls.__doc__ or "").startswith(f"{cls.__name__}(") else None  # generated
        self.declarations[ts_name] = _doc(doc, "") + build(ts_name)
        return ts_name

    def unique(self, base: str) -> str:
        base = re.sub(r"\W", "_", base) or "Type"
        name, n = base, 2
        while name in self.declarations:
            name, n = f"{base}{n}", n + 1
        return name


def _split_union(text: str) -> list[str]:
    """The top-level members of a union written as text (``number | bigint`` -> two)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<[{(":
            depth += 1
        elif ch in ">]})":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


SERVICE_MODULE = "titan_service_"
"""``titan-worker run FILE`` imports FILE as module ``titan_service_<its stem>`` (definition.py)."""


def _import(dotted: str) -> Any:
    """The object a dotted name names, importing the longest module prefix that imports; None if none.

    A class of a service file (``titan_service_<stem>.User``) is found by loading ``<stem>.py`` from
    under the current directory (given with ``--source``, or the first one found that defines it).
    """
    parts = dotted.split(".")
    if parts[0].startswith(SERVICE_MODULE) and parts[0] not in sys.modules:
        _load_service_file(parts[0], parts[1] if len(parts) > 1 else "")
    # Only modules already loaded (the service files, what they import, the standard library's):
    # a name read from Redis never decides what is imported.
    for cut in range(len(parts) - 1, 0, -1):
        obj: Any = sys.modules.get(".".join(parts[:cut]))
        if obj is None:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


_SKIP = frozenset(
    {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache", "dist"}
)


def _load_service_file(module: str, name: str, root: Path | None = None) -> None:
    """Load the service file a worker imported as ``module``: the first ``<stem>.py`` under ``root``
    (three levels at most) that defines ``name``."""
    stem = module.removeprefix(SERVICE_MODULE)
    root = root or Path.cwd()
    candidates = sorted(
        p for depth in ("", "*/", "*/*/", "*/*/*/") for p in root.glob(f"{depth}{stem}.py")
        if not _SKIP.intersection(p.relative_to(root).parts)
    )  # fmt: skip
    for path in candidates:
        try:
            load_service_file(path)
        except TitanError:
            continue
        if hasattr(sys.modules.get(module), name):
            return
        sys.modules.pop(module, None)


def _is_namedtuple(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def _fields(cls: Any) -> list[tuple[str, Any, bool]] | None:
    """(name, type, optional) of each field of a dataclass, TypedDict, NamedTuple, msgspec Struct or
    pydantic model; None for any other class."""
    if not isinstance(cls, type):
        return None
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:
        hints = dict(getattr(cls, "__annotations__", {}))
    if dataclasses.is_dataclass(cls):
        return [
            (f.name, hints.get(f.name, Any),
             f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
            for f in dataclasses.fields(cls)
        ]  # fmt: skip
    if typing.is_typeddict(cls):
        optional: frozenset[str] = getattr(cls, "__optional_keys__", frozenset())
        return [(name, tp, name in optional) for name, tp in hints.items()]
    if _is_namedtuple(cls):
        defaults = getattr(cls, "_field_defaults", {})
        return [(name, hints.get(name, Any), name in defaults) for name in cls._fields]  # type: ignore[attr-defined]
    struct_fields = getattr(cls, "__struct_fields__", None)
    if struct_fields is not None:  # msgspec Struct
        n_defaults = len(getattr(cls, "__struct_defaults__", ()))
        return [
            (name, hints.get(name, Any), i >= len(struct_fields) - n_defaults)
            for i, name in enumerate(struct_fields)
        ]
    model_fields = getattr(cls, "model_fields", None)
    if isinstance(model_fields, dict):  # pydantic v2
        return [(name, hints.get(name, Any), not info.is_required()) for name, info in model_fields.items()]
    return None


def _prop(name: str) -> str:
    return name if _IDENTIFIER.match(name) else json.dumps(name)


def _param(name: str) -> str:
    name = re.sub(r"\W", "_", name) if not name.isidentifier() else name
    return f"{name}_" if name in _TS_RESERVED or keyword.iskeyword(name) else name


def _doc(doc: str | None, indent: str) -> str:
    if not doc or not doc.strip():
        return ""
    lines = [line.rstrip() for line in doc.strip().replace("*/", "* /").splitlines()]
    if len(lines) == 1:
        return f"{indent}/** {lines[0].strip()} */\n"
    body = "\n".join(f"{indent} * {line.strip()}".rstrip() for line in lines)
    return f"{indent}/**\n{body}\n{indent} */\n"


def _annotation(text: str | None) -> Node:
    if text is None:
        return Node("typing.Any")
    try:
        return parse(text)
    except ValueError:
        return Node("typing.Any")


def _method(writer: Writer, method: dict[str, Any]) -> str:
    """One method of a service's interface."""
    positional: list[str] = []
    rest: str | None = None
    keywords: list[str] = []
    any_keywords = False
    required_keywords = False
    optional_seen = False
    for p in method.get("params", []):
        name, kind, ts = str(p.get("name")), str(p.get("kind")), writer.ts(_annotation(p.get("annotation")))
        has_default = "default" in p
        if kind in ("positional_only", "positional_or_keyword"):
            optional_seen = optional_seen or has_default
            positional.append(f"{_param(name)}{'?' if optional_seen else ''}: {ts}")
        elif kind == "var_positional":
            rest = ts
        elif kind == "keyword_only":
            keywords.append(f"{_prop(name)}{'?' if has_default else ''}: {ts}")
            required_keywords = required_keywords or not has_default
        elif kind == "var_keyword":
            any_keywords = True
    kw_type = None
    if keywords or any_keywords:
        members = [*keywords, *(["[name: string]: unknown"] if any_keywords else [])]
        kw_type = f"Kw<{{ {'; '.join(members)} }}>"
    params = list(positional)
    if rest is not None:
        rest_tuple = f"Array<{rest}>"
        if kw_type is not None:
            rest_tuple = f"Array<{rest}> | [...Array<{rest}>, {kw_type}]"
        params.append(f"...args: {rest_tuple}")
    elif kw_type is not None:
        params.append(f"kw{'' if required_keywords and not optional_seen else '?'}: {kw_type}")
    returns = _annotation(method.get("returns"))
    if method.get("streaming"):
        item = returns.args[0] if returns.name in _STREAMS and returns.args else Node("typing.Any")
        result = f"AsyncIterable<{writer.ts(item)}>"
    else:
        result = f"Promise<{writer.ts(returns)}>"
    signature = str(method.get("signature", ""))
    doc = f"  /** `{signature.replace('*/', '* /')}` */\n"
    return f"{doc}  {_prop(str(method['name']))}({', '.join(params)}): {result};"


def interface_name(service: str) -> str:
    """``image-processor`` -> ``ImageProcessor``."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", service) if w]
    name = "".join(w[:1].upper() + w[1:] for w in words) or "Service"
    return f"S{name}" if name[0].isdigit() else name


def typescript(services: list[ServiceInfo]) -> str:
    """The declarations of ``services``: the interfaces of the classes they use, then one per service."""
    writer = Writer()
    blocks: list[str] = []
    for service in services:
        methods = [_method(writer, m) for m in sorted(service.methods, key=lambda m: str(m.get("name")))]
        name = interface_name(service.name)
        if name in writer.declarations:
            name = writer.unique(f"{name}Service")
        writer.declarations[name] = ""
        proxy = f"client.service<{name}>({json.dumps(service.name)})"
        usage = f"Service `{service.name}` {service.version}: `{proxy}`."
        doc = _doc(f"{service.description.strip()}\n\n{usage}" if service.description.strip() else usage, "")
        blocks.append(doc + f"export interface {name} {{\n" + "\n".join(methods) + "\n}")
    types = [text for text in writer.declarations.values() if text]
    return HEADER + "\n" + "\n\n".join([*types, *blocks]) + "\n"


def _selected(found: list[ServiceInfo], names: list[str]) -> Iterator[ServiceInfo]:
    by_name = {s.name: s for s in found}
    for name in names or sorted(by_name):
        if name not in by_name:
            raise UnknownService(f"service {name!r} is not in the registry (start a worker of it first)")
        yield by_name[name]


@codegen_app.command("typescript", cls=Command)
def typescript_command(
    ctx: typer.Context,
    services: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[SERVICE]...", help="Services to declare (default: every one in the registry)."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", help="Write to this file (default: stdout)."),
    ] = None,
    sources: Annotated[
        list[Path] | None,
        typer.Option(
            "--source",
            "-s",
            metavar="FILE",
            help="A service file whose classes to read (else found by name here).",
        ),
    ] = None,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Write TypeScript declarations of services for the Node client, from their registered signatures."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # where the services' own modules (their classes) are found
    for source in sources or []:
        try:
            load_service_file(source)
        except TitanError as exc:  # names the file and what is wrong with it
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None

    async def read(client: Client) -> list[ServiceInfo]:
        return list(
            _selected(await list_services(client.redis, client.keys, live_only=False), services or [])
        )

    text = typescript(run(ctx, read, redis, namespace))
    if output is None:
        out.file.write(text)
    else:
        output.write_text(text)
        err.print(f"wrote {output}", highlight=False)
