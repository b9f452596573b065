"""What every ``gpu-tasks`` command shares: the settings on the click context, the error
handling that turns our errors and Redis's into one line, the output helpers (the rich
console, ``--json``), and the shared parameter types and options.

Commands import what they show lazily, inside themselves: ``gpu-tasks --help`` and a
command that needs little stay quick to start.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
from rich.console import Console

from gpu_tasks.errors import ConfigError, GpuTasksError
from gpu_tasks.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
console = Console()


# -- context ------------------------------------------------------------------------------


def settings_of(ctx: click.Context) -> Settings:
    """The settings the root command made from the environment and its flags."""
    settings: Settings = ctx.find_root().obj
    return settings


def app_of(settings: Settings) -> Any:
    """The Celery app, configured from ``settings``."""
    from gpu_tasks.app import app, configure

    configure(settings)
    return app


def require_worker_extra(command: str) -> None:
    """Name the extra to install instead of failing on a numpy import deep inside."""
    import importlib.util

    if importlib.util.find_spec("numpy") is None:
        raise ConfigError(
            f"`gpu-tasks {command}` runs GPU workers, which need the worker extra: "
            "pip install 'gpu-tasks[worker]' (or '.[worker]' in a checkout; "
            "'gpu-tasks[cuda]' on hosts with NVIDIA GPUs)"
        )


# -- errors -------------------------------------------------------------------------------


def handle_errors(fn: F) -> F:
    """Turn our errors, and Redis being unreachable, into one clear line and exit 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except GpuTasksError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        except (redis.ConnectionError, redis.TimeoutError,
                redis.exceptions.NoPermissionError) as exc:
            raise click.ClickException(redis_error_line(exc)) from None

    return wrapper  # type: ignore[return-value]


def redis_error_line(exc: BaseException) -> str:
    """The line a command's Redis error ends it with (the address without the password)."""
    from gpu_tasks import settings as settings_module
    from gpu_tasks.connection.failures import describe

    settings = settings_module.current()
    shown = settings.redis_url_shown
    failure = describe(exc)
    if failure.kind == "login":
        return (f"{failure.what(shown, settings.redis_timeout_s)}: "
                f"{type(failure.cause).__name__}: {failure.cause}")
    if failure.kind == "permission":
        return f"{failure.what(shown, settings.redis_timeout_s)}: {failure.cause}"
    return (f"cannot reach Redis at {shown} (within GPU_TASKS_REDIS_TIMEOUT_S): "
            f"{type(exc).__name__}: {exc}")


# -- output -------------------------------------------------------------------------------


def emit_json(data: Any) -> None:
    """``--json``: one indented JSON document on standard output."""
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def print_wide(renderable: Any) -> None:
    """Print to the terminal at its width; piped, at whatever width the content needs."""
    if console.is_terminal:
        console.print(renderable)
    else:
        Console(width=10_000, color_system=None).print(renderable)


def text_columns(rows: list[list[str]]) -> str:
    """``rows`` as left-aligned columns two spaces apart, nothing cut."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f}"


# -- parameters ---------------------------------------------------------------------------


# click 8.5 makes ParamType generic; subscripting it would break the click 8.1 that
# pyproject allows, so the type arguments stay unsaid.
class JSONObject(click.ParamType):  # type: ignore[type-arg]
    """A JSON object given on the command line, as a dict; anything else is a usage error
    that names the option (exit 2)."""

    name = "json object"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        hint = " / ".join(param.opts) if param is not None else None
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", ctx, param_hint=hint) from None
        if not isinstance(data, dict):
            raise click.BadParameter("must be a JSON object", ctx, param_hint=hint)
        return data


REBALANCE_BY = click.Choice(["count", "memory"])
"""``--by``: shares by shard count, or in proportion to device memory."""


def json_option(text: str = "Print one JSON document.") -> Callable[[F], F]:
    """``--json``: print JSON for scripts instead of tables (the ``as_json`` parameter)."""
    return click.option("--json", "as_json", is_flag=True, help=text)
