"""``gpu-tasks route``: where entities' requests go (shard = queue, and the GPU that owns
it now)."""

from __future__ import annotations

import click
from rich.table import Table

from gpu_tasks.cli.base import emit_json, handle_errors, json_option, print_wide, settings_of


@click.command()
@click.argument("entities", nargs=-1, required=True)
@json_option("Print a JSON list.")
@click.pass_context
@handle_errors
def route(ctx: click.Context, entities: tuple[str, ...], as_json: bool) -> None:
    """Print the shard, queue and owning GPU of each ENTITY."""
    from dataclasses import replace

    from gpu_tasks.control.shardmap import ShardMapStore
    from gpu_tasks.protocol.routing import EntityRouter, validate_entity_id

    for entity in entities:
        validate_entity_id(entity)
    shard_map = ShardMapStore(settings_of(ctx).redis_client()).load()
    router = EntityRouter(lambda: shard_map.shard_count)
    routes = [router.route(e) for e in entities]
    routes = [replace(r, owner=shard_map.shards[r.shard_index].owner) for r in routes]
    if as_json:
        emit_json([r.as_dict() for r in routes])
        return
    table = Table("entity", "shard = queue", "owner")
    for r in routes:
        table.add_row(r.entity_id, r.shard, r.owner or "[red]none[/]")
    print_wide(table)
