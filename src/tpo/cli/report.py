"""``tpo report``: one self-contained HTML page of reward curves, run comparisons and every trajectory."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from ._common import with_errors


@click.command("report")
@click.argument("outputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--output-file",
    "-o",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("report.html"),
    show_default=True,
    help="The HTML file to write.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="TEXT",
    help="A name for each output, in order (default: the method, e.g. 'TPO D2-N5'). Repeatable.",
)
@click.option("--title", default=None, help="The page title (default: the runs' names).")
@click.option(
    "--judge",
    "judgements",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="VERDICTS",
    help="A `tpo judge` output to show beside the rewards. Repeatable.",
)
@with_errors
def report_command(
    outputs: tuple[Path, ...], out: Path, labels: tuple[str, ...], title: str | None, judgements: tuple[Path, ...]
) -> None:
    """Write an HTML report of one or more `tpo batch` outputs.

    The page opens offline in any browser: reward against step (mean ± std and best so
    far, and the spread of each step's answers), a width/depth comparison when several runs
    are given (reward against width and depth for a sweep), reward against cumulative
    compute with best-of-n as a curve and the comparison at matched cost, the verdicts of
    `tpo judge` (--judge), and every prompt's trajectory (answers with rewards and lineage,
    chosen and rejected answers, critiques, feedback, failures), searchable by id or text.
    """
    from ..analysis.report import write_report

    path = write_report(
        list(outputs), out, labels=list(labels) if labels else None, title=title, judgements=list(judgements)
    )
    size_kb = path.stat().st_size / 1024
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"Wrote {escape(str(path))} ({size_kb:,.0f} KB)")
