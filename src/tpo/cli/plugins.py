"""``tpo backends``: what policy backends and reward models are installed, and what each supports."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ..registry import BACKENDS_GROUP, REWARDS_GROUP, list_plugins


@click.command("backends")
def backends_command() -> None:
    """List the installed policy backends and reward models with their capabilities."""
    console = Console()
    for group, title in ((BACKENDS_GROUP, "Policy backends"), (REWARDS_GROUP, "Reward models")):
        table = Table(title=title, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("supports")
        table.add_column("description")
        for info in list_plugins(group):
            if info.error:
                table.add_row(info.name, "[red]unavailable[/red]", info.error)
                continue
            caps = ", ".join(k.replace("supports_", "") for k, v in info.capabilities.items() if v) or "-"
            table.add_row(info.name, caps, info.description)
        console.print(table)
