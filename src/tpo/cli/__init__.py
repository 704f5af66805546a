"""The ``tpo`` command line: each command parses options, calls the library, and renders the result."""

from __future__ import annotations

import click

from .. import __version__
from .batch import batch_command
from .eval import eval_command
from .export import export_command
from .judge import judge_command
from .plugins import backends_command
from .report import report_command
from .run import run_command
from .serve import serve_command
from .sweep import sweep_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="tpo")
def cli() -> None:
    """Test-Time Preference Optimization: better answers from a reward model, at inference time.

    Start with `tpo run "your question"`: it runs TPO on a small bundled model, offline.
    """


cli.add_command(run_command)
cli.add_command(batch_command)
cli.add_command(backends_command)
cli.add_command(export_command)
cli.add_command(eval_command)
cli.add_command(report_command)
cli.add_command(judge_command)
cli.add_command(sweep_command)
cli.add_command(serve_command)


def main() -> None:
    """Entry point of the ``tpo`` script."""
    cli(prog_name="tpo")


__all__ = ["cli", "main"]
