"""``titan acl worker|caller|operator|observer``: the Redis ACL rule of each role, printed or applied."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from typing import Annotated

import anyio
import typer
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from rich.markup import escape

from titan_broker._config import redact, resolve_namespace, resolve_url
from titan_broker._errors import ConfigError, TitanError
from titan_broker._redis import discover
from titan_broker._wire import Keys
from titan_broker._wire import acl as rules

from .common import (
    EXIT_REDIS,
    EXIT_USAGE,
    Command,
    JsonOption,
    NamespaceOption,
    RedisOption,
    _Settings,
    app,
    err,
    out,
    print_json,
)

acl_app = typer.Typer(
    help="Print (or --apply) the Redis ACL rule of a role: a service's workers, a caller, operator, observer",
    no_args_is_help=True,
)
app.add_typer(acl_app, name="acl")

UserOption = Annotated[
    str | None, typer.Option("--user", metavar="NAME", help="ACL user name (default: per role).")
]
PasswordEnvOption = Annotated[
    str | None,
    typer.Option(
        "--password-env", metavar="VAR", help="Add the password held by $VAR (printed as its SHA-256 only)."
    ),
]
ApplyOption = Annotated[
    bool,
    typer.Option(
        "--apply",
        help="Run ACL SETUSER on the Redis of --redis (every primary of a cluster); a caller's user is "
        "first added to each service's registered users.",
    ),
]


def _password(var: str | None) -> str | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"--password-env {var}: ${var} is not set or empty")
    return value


async def _apply(url: str, keys: Keys, rule: rules.Rule, password: str | None) -> int:
    """Register the user with the services it calls (their ``users`` sets: its requests go to streams
    of its own), then send the rule to every primary of the Redis at ``url``; return how many.
    Registered first, so that a caller with the rule before (the shared stream allowed) moves to its
    own streams before the new rule refuses the shared one."""
    topology = await discover(url)
    client = topology.client()
    try:
        for service in rule.registers:
            await client.sadd(keys.users(service), rule.user)
        if isinstance(client, RedisCluster):
            done = await client.execute_command(*rule.command(password), target_nodes=RedisCluster.PRIMARIES)
            return len(done) if isinstance(done, dict) else len(client.get_primaries())
        await client.execute_command(*rule.command(password))  # type: ignore[no-untyped-call]
        return 1
    except (rexc.RedisError, OSError) as exc:
        raise TitanError(f"cannot apply the {rule.role} rule on {redact(url)}: {exc}") from exc
    finally:
        await client.aclose()


def _emit(
    ctx: typer.Context,
    rule_of: Callable[[Keys], rules.Rule],
    namespace: str | None,
    password_env: str | None,
    apply: bool,
    as_json: bool,
    redis: str | None,
) -> None:
    try:
        found = ctx.find_object(_Settings)
        keys = Keys(resolve_namespace(namespace or (found.namespace if found else None)))
        rule = rule_of(keys)
        password = _password(password_env)
        if apply:
            url = resolve_url(redis or (found.url if found else None))
            count = anyio.run(_apply, url, keys, rule, password)
            err.print(
                f"applied the {rule.role} rule of user {rule.user!r} on {count} node(s)", highlight=False
            )
    except ValueError as exc:  # a user name no rule can be written for
        err.print(f"[red]error:[/] {escape(str(exc))}; name the user with --user NAME", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    except ConfigError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    except TitanError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_REDIS) from None
    if as_json:
        print_json([rule.as_json() | {"setuser": rule.command(password)}])
    else:
        out.print(escape(shlex.join(rule.command(password))), highlight=False, soft_wrap=True)


def _user(given: str | None, default: str) -> str:
    """The --user given (an empty one is refused by the rule, not replaced), else the role's default."""
    return default if given is None else given


@acl_app.command(cls=Command)
def worker(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The service its workers serve.")],
    user: UserOption = None,
    password_env: PasswordEnvOption = None,
    calls: Annotated[
        list[str] | None,
        typer.Option("--calls", metavar="OTHER", help="A service its methods call (repeat)."),
    ] = None,
    apply: ApplyOption = False,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """The rule for the workers of SERVICE: every key of SERVICE, nothing of another service.

    With --calls OTHER and --apply, the user is also added to each OTHER's registered users, as a
    caller's is (see titan acl caller)."""
    _emit(
        ctx,
        lambda keys: rules.worker_rule(keys, service, _user(user, f"{service}-worker"), tuple(calls or ())),
        namespace, password_env, apply, as_json, redis,
    )  # fmt: skip


@acl_app.command(cls=Command)
def caller(
    ctx: typer.Context,
    services: Annotated[list[str], typer.Argument(metavar="SERVICE...", help="The services it calls.")],
    user: UserOption = None,
    password_env: PasswordEnvOption = None,
    apply: ApplyOption = False,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """The rule for a caller of SERVICE...: calls, streams, jobs; its own requests and replies only.

    With --apply, the user is also added to each SERVICE's registered users (the set
    <ns>:{SERVICE}:users): its calls then go to request streams of its own, which the rule
    allows (and no other user's)."""
    _emit(
        ctx,
        lambda keys: rules.caller_rule(keys, tuple(services), _user(user, "titan-caller")),
        namespace, password_env, apply, as_json, redis,
    )  # fmt: skip


@acl_app.command(cls=Command)
def operator(
    ctx: typer.Context,
    user: UserOption = None,
    password_env: PasswordEnvOption = None,
    apply: ApplyOption = False,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """The rule for the CLI's and the dashboard's actions: replay and purge dead letters, cancel, purge."""
    _emit(
        ctx,
        lambda keys: rules.operator_rule(keys, _user(user, "titan-operator")),
        namespace, password_env, apply, as_json, redis,
    )  # fmt: skip


@acl_app.command(cls=Command)
def observer(
    ctx: typer.Context,
    user: UserOption = None,
    password_env: PasswordEnvOption = None,
    apply: ApplyOption = False,
    as_json: JsonOption = False,
    redis: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """The read-only rule: titan services, workers, health, queues, stats, top, jobs; the dashboard."""
    _emit(
        ctx,
        lambda keys: rules.observer_rule(keys, _user(user, "titan-observer")),
        namespace, password_env, apply, as_json, redis,
    )  # fmt: skip
