"""``tpo export``: write a batch output in the format an evaluator reads (AlpacaEval, Arena-Hard-Auto, JSONL)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from ..analysis.export import ARENA_HARD_BENCHMARKS, ARENA_HARD_SCHEMAS, FORMATS, export_results
from ._common import with_errors
from ._terminal import for_terminal


def _split_option(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        raise click.UsageError(
            "--arena-hard-version was split in two: --arena-hard-schema is the file's schema (current, the default, "
            "which arena-hard-auto reads for every benchmark version, v0.1 included; legacy for its checkouts from "
            "before April 2025) and --arena-hard-benchmark the benchmark version (v0.1 or v2.0)",
            ctx=ctx,
        )


@click.command("export")
@click.argument("output", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(FORMATS),
    required=True,
    help="alpaca-eval: the JSON list `alpaca_eval --model_outputs` reads; arena-hard: an Arena-Hard-Auto "
    "answer file; jsonl: id, prompt and answer per line.",
)
@click.option(
    "--output-file",
    "-o",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write. For arena-hard: the answer file (model_answer/NAME.jsonl, which names the model) "
    "or a directory to write MODEL.jsonl into.",
)
@click.option(
    "--model-name",
    default=None,
    metavar="NAME",
    help="The model's name in the export (AlpacaEval's generator, Arena-Hard's model). "
    "Default: the policy and method, e.g. Llama-3.1-8B-Instruct-tpo-d2-n5.",
)
@click.option(
    "--arena-hard-schema",
    type=click.Choice(ARENA_HARD_SCHEMAS),
    default="current",
    show_default=True,
    help="The answer file's schema. current: uid, messages, model, metadata, which arena-hard-auto reads "
    "for every benchmark version; legacy: the v0.1 layout (question_id, choices) of its checkouts "
    "from before April 2025.",
)
@click.option(
    "--arena-hard-benchmark",
    type=click.Choice(ARENA_HARD_BENCHMARKS),
    default="auto",
    show_default=True,
    help="The benchmark version the answers are for; checked against the folder written to "
    "(data/arena-hard-v2.0/...). auto: the version that folder names, if any.",
)
@click.option("--arena-hard-version", hidden=True, expose_value=False, callback=_split_option)
@click.option(
    "--strict",
    is_flag=True,
    help="Stop with an error (and write nothing) when a prompt did not finish, instead of skipping it.",
)
@with_errors
def export_command(
    output: Path,
    fmt: str,
    out: Path,
    model_name: str | None,
    arena_hard_schema: str,
    arena_hard_benchmark: str,
    strict: bool,
) -> None:
    """Export the final answers in OUTPUT (a `tpo batch` output) for another evaluator.

    Prompts that failed are skipped with a warning (their ids are listed); --strict makes
    them an error instead.
    """
    from ..analysis.evaluate import read_results

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    results, warnings = read_results(output)
    report = export_results(
        results,
        fmt,
        out,
        model_name=model_name,
        strict=strict,
        arena_hard_schema=arena_hard_schema,
        arena_hard_benchmark=arena_hard_benchmark,
    )
    for note in [*warnings, *report.warnings]:
        console.print(f"[yellow]Warning:[/yellow] {escape(for_terminal(note))}")
    if report.skipped:
        ids = ", ".join(pid for pid, _ in report.skipped[:10])
        more = f" and {len(report.skipped) - 10} more" if len(report.skipped) > 10 else ""
        console.print(
            f"[yellow]Warning:[/yellow] skipped {len(report.skipped)} prompt(s) that did not finish: "
            f"{escape(for_terminal(ids))}{more} (--strict makes this an error)"
        )
    what = f"{fmt} format"
    if report.arena_hard_schema is not None:
        benchmark = (
            f"benchmark {report.arena_hard_benchmark}" if report.arena_hard_benchmark else "any benchmark version"
        )
        what += f" ({report.arena_hard_schema} answer schema, {benchmark}; token_len: {report.token_len})"
    name = f" as {report.model_name!r}" if report.model_name else ""
    console.print(f"Wrote {report.exported} answer(s){escape(name)} in {escape(what)} to {escape(str(report.path))}")
