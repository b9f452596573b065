"""Watching a deployment: ``gpu-tasks exporter`` (Prometheus metrics, from
:mod:`gpu_tasks.monitor.metrics`) and ``gpu-tasks flower`` (Flower, set up by
:mod:`gpu_tasks.monitor.flower`). Both check the Redis login before they serve."""

from __future__ import annotations

import click

from gpu_tasks.cli.base import handle_errors, settings_of
from gpu_tasks.errors import ConfigError


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9487, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.pass_context
@handle_errors
def exporter(ctx: click.Context, port: int, address: str) -> None:
    """Serve Prometheus metrics at http://ADDRESS:PORT/metrics: per GPU its backlog and the
    oldest request's age, consuming or not, lease, shards, memory, task outcomes; the
    shard map's epoch, handoffs, shards with no owner or no consumer. Each scrape takes one
    status snapshot. Runs until SIGTERM or Ctrl-C."""
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError("`gpu-tasks exporter` needs prometheus-client, in the ops extra: "
                          "pip install 'gpu-tasks[ops]'")
    from gpu_tasks.connection.failures import check_login
    from gpu_tasks.local.signals import stop_on_signals
    from gpu_tasks.monitor.metrics import serve

    settings = settings_of(ctx)
    check_login(settings.redis_client())
    try:
        with stop_on_signals() as stop:
            serve(settings.redis_client(), address, port, stop, on_ready=lambda: click.echo(
                f"serving metrics at http://{address}:{port}/metrics", err=True))
    except OSError as exc:  # the port is taken, or the address is not this host's
        raise click.ClickException(f"cannot listen on {address}:{port}: {exc}") from None


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on ('' or 0.0.0.0: every interface).")
@click.option("--basic-auth", metavar="USER:PASS",
              help="Credentials for the pages and the REST API (default: "
                   "$GPU_TASKS_FLOWER_BASIC_AUTH; a flag shows in `ps`, the setting does not).")
@click.option("--no-auth", is_flag=True,
              help="No authentication: allowed on a loopback address only.")
@click.pass_context
@handle_errors
def flower(ctx: click.Context, port: int, address: str, basic_auth: str | None,
           no_auth: bool) -> None:
    """Run Flower for this deployment: authenticated, REST API on, task history kept in
    <data dir>/flower.db across restarts. Replaces this process (for systemd)."""
    import os
    from pathlib import Path

    from gpu_tasks.connection.failures import check_login
    from gpu_tasks.monitor.flower import flower_argv, flower_env, resolve_auth

    settings = settings_of(ctx)
    settings.require_redis_url()
    auth = resolve_auth(settings, basic_auth, no_auth, address)
    check_login(settings.redis_client())
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    argv = flower_argv(settings, port=port, address=address)
    host = f"[{address}]" if ":" in address else (address or "0.0.0.0")
    click.echo(f"Flower on http://{host}:{port}, Redis "
               f"{settings.redis_url_shown}; credentials: {auth.shown}", err=True)
    os.execve(argv[0], argv, flower_env(settings, auth))
