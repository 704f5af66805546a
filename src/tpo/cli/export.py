"""``tpo export``: write a batch output in the format an evaluator reads (AlpacaEval, Arena-Hard-Auto, JSONL)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from ..evaluate import read_results
from ..export import ARENA_HARD_VERSIONS, FORMATS, export_results
from ._common import with_errors


@click.command("export")
@click.argument("output", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), required=True,
              help="alpaca-eval: the JSON list `alpaca_eval --model_outputs` reads; arena-hard: an Arena-Hard-Auto "
                   "answer file; jsonl: id, prompt and answer per line.")
@click.option("--output-file", "-o", "out", type=click.Path(path_type=Path), required=True,
              help="Where to write. For arena-hard: the answer file (model_answer/NAME.jsonl, which names the model) "
                   "or a directory to write MODEL.jsonl into.")
@click.option("--model-name", default=None, metavar="NAME",
              help="The model's name in the export (AlpacaEval's generator, Arena-Hard's model). "
                   "Default: the policy and method, e.g. Llama-3.1-8B-Instruct-tpo-d2-n5.")
@click.option("--arena-hard-version", type=click.Choice(ARENA_HARD_VERSIONS), default="auto", show_default=True,
              help="Arena-Hard-Auto layout. auto: v2 when the prompts' metadata has 'uid', v0.1 when it has 'question_id'.")
@click.option("--strict", is_flag=True,
              help="Stop with an error (and write nothing) when a prompt did not finish, instead of skipping it.")
@with_errors
def export_command(output: Path, fmt: str, out: Path, model_name: str | None, arena_hard_version: str, strict: bool) -> None:
    """Export the final answers in OUTPUT (a `tpo batch` output) for another evaluator.

    Prompts that failed are skipped with a warning (their ids are listed); --strict makes
    them an error instead.
    """
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    results, warnings = read_results(output)
    report = export_results(
        results, fmt, out, model_name=model_name, strict=strict, arena_hard_version=arena_hard_version
    )
    for note in [*warnings, *report.warnings]:
        console.print(f"[yellow]Warning:[/yellow] {escape(note)}")
    if report.skipped:
        ids = ", ".join(pid for pid, _ in report.skipped[:10])
        more = f" and {len(report.skipped) - 10} more" if len(report.skipped) > 10 else ""
        console.print(f"[yellow]Warning:[/yellow] skipped {len(report.skipped)} prompt(s) that did not finish: "
                      f"{escape(ids)}{more} (--strict makes this an error)")
    what = fmt if report.arena_hard_version is None else f"{fmt} {report.arena_hard_version}"
    name = f" as {report.model_name!r}" if report.model_name else ""
    console.print(f"Wrote {report.exported} answer(s){escape(name)} in {what} format to {escape(str(report.path))}")
