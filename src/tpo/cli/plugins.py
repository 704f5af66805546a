"""``tpo backends``: what policy backends and reward models are installed, and what each supports."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..registry import BACKENDS_GROUP, REWARDS_GROUP, PluginInfo, list_plugins


@click.command("backends")
@click.option("--verbose", "-v", is_flag=True, help="Also list each plugin's options: type, constraint and default.")
def backends_command(verbose: bool) -> None:
    """List the installed policy backends and reward models with their capabilities."""
    console = Console()
    for group, title in ((BACKENDS_GROUP, "Policy backends"), (REWARDS_GROUP, "Reward models")):
        table = Table(title=title, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("supports")
        table.add_column("description")
        infos = list_plugins(group)
        for info in infos:
            if info.error:
                table.add_row(escape(info.name), "[red]unavailable[/red]", escape(info.error))
                continue
            caps = ", ".join(k.replace("supports_", "") for k, v in info.capabilities.items() if v) or "-"
            table.add_row(escape(info.name), caps, escape(info.description))  # plugin text is not markup
        console.print(table)
        if verbose:
            kind = "policy" if group == BACKENDS_GROUP else "reward"
            for info in infos:
                if not info.error:
                    console.print(_options_table(info, kind))


def _options_table(info: PluginInfo, kind: str) -> Table | str:
    """The options of one plugin, or a line saying it declares none."""
    if not info.options:
        return f"[bold]{escape(info.name)}[/bold] ({kind}): no declared options\n"
    table = Table(title=escape(f"{info.name} ({kind}) options"), title_justify="left")
    for column in ("option", "type", "constraint", "default", "help"):
        table.add_column(column, style="bold" if column == "option" else None)
    for o in info.options:
        table.add_row(escape(o.name), o.kind, escape(o.constraint or "-"), escape(_default(o.default)), escape(o.help))
    return table


def _default(value: Any) -> str:
    """A default as it would be written on the command line; ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
