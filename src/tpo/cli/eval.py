"""``tpo eval``: reward curves, reward against compute, costs, failures, paired and matched-cost comparisons and
math accuracy of batch outputs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError
from ..result import dumps_json
from ._common import _pct, print_json_or_render, with_errors
from ._terminal import for_terminal

if TYPE_CHECKING:  # the analysis modules load when the command runs, not with every tpo command
    from ..analysis.compute import MatchedComparison
    from ..analysis.evaluate import Comparison, Distribution, Evaluation, Interval, RunSummary


@click.command("eval")
@click.argument("outputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="TEXT",
    help="A name for each output, in order (default: the method, e.g. 'TPO D2-N5'). Repeatable.",
)
@click.option(
    "--reference-field",
    default=None,
    metavar="FIELD",
    help="Check final answers against this metadata field with math-verify (e.g. answer).",
)
@click.option(
    "--tie-eps",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Paired comparison: final rewards within this of each other count as a tie.",
)
@click.option(
    "--confidence",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Level of the confidence intervals.",
)
@click.option(
    "--bootstrap",
    "bootstrap_samples",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Bootstrap resamples for the intervals of the mean difference and ties-as-half win rate.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--all-pairs", is_flag=True, help="Compare every pair of runs, not just the first against each other.")
@click.option(
    "--json",
    "-o",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write everything as JSON to this file ('-' for standard output, with no tables).",
)
@with_errors
def eval_command(
    outputs: tuple[Path, ...],
    labels: tuple[str, ...],
    reference_field: str | None,
    tie_eps: float,
    confidence: float,
    bootstrap_samples: int,
    seed: int,
    all_pairs: bool,
    json_path: Path | None,
) -> None:
    """Summarise one or more `tpo batch` outputs, and compare the first with the others.

    Per run: mean and standard deviation of the reward at every step, the best score so far,
    reward against cumulative compute (for best-of-N, the expected best-of-n at each n),
    costs per prompt and failures. Runs over the same prompts (paired by prompt id) are
    compared by final reward: win, tie and loss rates with confidence intervals. With a
    best-of-N run among them, every TPO and revision run is also compared with best-of-n at
    matched cost.
    """
    from ..analysis.evaluate import evaluate, load_run

    if labels and len(labels) != len(outputs):
        raise ConfigError(f"give one --label per output: {len(labels)} label(s) for {len(outputs)} output(s)")
    runs = [load_run(path, label=labels[i] if labels else None) for i, path in enumerate(outputs)]
    result = evaluate(
        runs,
        reference_field=reference_field,
        tie_eps=tie_eps,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
        all_pairs=all_pairs,
    )
    print_json_or_render(dumps_json(result.to_dict(), indent=2), json_path, lambda: render(result, _stdout_console()))


#: The width given to the tables when standard output is not a terminal: enough that none is cut
#: or wrapped (rich would otherwise lay them out in 80 columns); each still takes only the width it needs.
PIPED_WIDTH = 10_000


def _stdout_console() -> Console:
    """Standard output at the terminal's width; piped or redirected, at the tables' full width."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPED_WIDTH)


def render(result: Evaluation, console: Console) -> None:
    """Print the evaluation as rich tables."""
    console.print(_overview(result.runs))
    for run in result.runs:
        for note in run.warnings:
            console.print(f"[yellow]Warning:[/yellow] {escape(for_terminal(note))}")
        console.print(_steps(run))
        console.print(_costs(run))
        if run.compute:
            console.print(_compute(run))
        _failures(run, console)
    if any(run.math for run in result.runs):
        console.print(_math(result.runs))
    if result.comparisons:
        console.print(_comparisons(result.comparisons))
    if result.matched:
        console.print(_matched(result.matched))


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(iv: Interval | None, pct: bool = True) -> str:
    if iv is None:
        return "-"
    return f"[{_pct(iv.low)}, {_pct(iv.high)}]" if pct else f"[{iv.low:+.3f}, {iv.high:+.3f}]"


def _overview(runs: Sequence[RunSummary]) -> Table:
    t = Table(title="Runs", title_justify="left")
    for col in ("run", "prompts", "complete", "failed", "final score", "± std", "best initial", "gain", "file"):
        t.add_column(col, justify="left" if col in ("run", "file") else "right")
    for r in runs:
        t.add_row(
            escape(r.label),
            str(r.prompts),
            str(r.complete),
            str(r.failures.failed_prompts),
            _num(r.final_score.mean),
            _num(r.final_score_std),
            _num(r.initial_best.mean),
            "-" if r.gain.mean is None else f"{r.gain.mean:+.3f}",
            escape(Path(r.path).name),
        )
    return t


def _steps(run: RunSummary) -> Table:
    t = Table(
        title=f"{escape(run.label)}: reward per step",
        title_justify="left",
        caption="mean and std over the answers of each step, per prompt, averaged over prompts",
        caption_justify="left",
    )
    for col in ("step", "prompts", "answers", "mean", "std", "std between prompts", "best so far"):
        t.add_column(col, justify="right")
    for s in run.steps:
        t.add_row(
            str(s.step),
            str(s.prompts),
            str(s.answers),
            _num(s.mean),
            _num(s.std),
            _num(s.between_prompt_std),
            _num(s.best_so_far),
        )
    return t


def _costs(run: RunSummary) -> Table:
    t = Table(title=f"{escape(run.label)}: cost per prompt", title_justify="left")
    for col in ("", "mean", "median", "p90", "total"):
        t.add_column(col, justify="right" if col else "left")
    c = run.costs
    rows: list[tuple[str, Distribution, int]] = [
        ("tokens", c.tokens, 0),
        ("prompt tokens", c.prompt_tokens, 0),
        ("completion tokens", c.completion_tokens, 0),
        ("policy calls", c.policy_calls, 1),
        ("sequences", c.sequences, 1),
        ("answers scored", c.answers_scored, 1),
        ("wall time (s)", c.wall_time_s, 2),
    ]
    for name, d, digits in rows:
        t.add_row(name, _num(d.mean, digits), _num(d.median, digits), _num(d.p90, digits), _num(d.total, digits))
    return t


def _failures(run: RunSummary, console: Console) -> None:
    f = run.failures
    parts = [
        (f.failed_prompts, "failed prompt(s)"),
        (f.partial_prompts, "unfinished prompt(s)"),
        (f.score_failures, "answer(s) not scored"),
        (f.extraction_fallbacks, "rewrite(s) without answer tags"),
        (f.revision_fallbacks, "step(s) fell back to revision"),
        (f.truncated_steps, "step(s) shortened to fit"),
        (f.step_failures, "step failure note(s)"),
    ]
    shown = ", ".join(f"{n} {what}" for n, what in parts if n)
    console.print(f"[bold]{escape(run.label)}[/bold] failures: {shown or 'none'}")
    for error, n in list(f.errors.items())[:5]:
        console.print(f"  [red]{n}×[/red] {escape(for_terminal(error))}")
    console.print()


def _math(runs: Sequence[RunSummary]) -> Table:
    t = Table(title="Math accuracy (math-verify)", title_justify="left")
    for col in (
        "run",
        "field",
        "checked",
        "correct",
        "accuracy",
        "95% CI",
        "no answer",
        "check failed",
        "no reference",
    ):
        t.add_column(col, justify="left" if col in ("run", "field") else "right")
    for r in runs:
        m = r.math
        if m is None:
            continue
        t.add_row(
            escape(r.label),
            escape(m.reference_field),
            str(m.checked),
            str(m.correct),
            _pct(m.accuracy),
            _ci(m.interval),
            str(m.no_answer),
            str(m.check_failures),
            str(m.missing_reference),
        )
    return t


def _comparisons(comparisons: Sequence[Comparison]) -> Table:
    first = comparisons[0]
    level = f"{100 * first.confidence:g}%"
    t = Table(
        title=f"Paired comparison by final reward (ties: |difference| <= {first.tie_eps:g})",
        title_justify="left",
        caption=f"{level} intervals: Wilson for each rate; bootstrap ({first.bootstrap_samples} resamples, "
        f"seed {first.seed}) for ties-as-half and the mean difference",
        caption_justify="left",
    )
    for col in ("A vs B", "pairs", "win", "tie", "loss", "win (ties ½)", "mean A−B", "unpaired"):
        t.add_column(col, justify="left" if col == "A vs B" else "right")
    for c in comparisons:
        t.add_row(
            escape(f"{c.a} vs {c.b}"),
            str(c.paired),
            f"{_pct(c.win_rate)} {_ci(c.win_interval)}",
            f"{_pct(c.tie_rate)} {_ci(c.tie_interval)}",
            f"{_pct(c.loss_rate)} {_ci(c.loss_interval)}",
            f"{_pct(c.win_rate_ties_half)} {_ci(c.win_rate_ties_half_interval)}",
            "-"
            if c.mean_difference is None
            else f"{c.mean_difference:+.3f} {_ci(c.mean_difference_interval, pct=False)}",
            str(c.only_a + c.only_b + c.unfinished),
        )
    return t


def _compute(run: RunSummary) -> Table:
    """Reward against cumulative cost: per step, or for best-of-N the expected best-of-n at a few n."""
    bon = run.mode == "bon"
    points = run.compute
    if bon:  # n = 1, 2, 4, ... and N: the curve's shape without sixty rows
        largest = points[-1].n or 0
        shown = {n for n in (1 << k for k in range(12)) if n <= largest} | {largest}
        points = tuple(p for p in points if p.n in shown)
    title = (
        f"{escape(run.label)}: expected best-of-n against cost"
        if bon
        else f"{escape(run.label)}: best reward so far against cumulative cost"
    )
    caption = (
        "exact expectation over the n-subsets of each prompt's samples; cost per prompt"
        if bon
        else "mean per finished prompt, up to the end of each step"
    )
    t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col in ("n" if bon else "step", "prompts", "reward", "generated tokens", "tokens", "FLOPs"):
        t.add_column(col, justify="right")
    for p in points:
        flops = "-" if p.flops is None else f"{p.flops:.3g}"
        t.add_row(
            str(p.n if bon else p.step),
            str(p.prompts),
            _num(p.reward),
            _num(p.generated_tokens, 0),
            _num(p.tokens, 0),
            flops,
        )
    return t


def _matched(matched: Sequence[MatchedComparison]) -> Table:
    first = matched[0]
    unit = "generated tokens" if first.basis == "completion_tokens" else "answers generated"
    t = Table(
        title=f"At matched cost: each run against the best-of-n of nearest {unit} per prompt",
        title_justify="left",
        caption=f"best-of-n expected from {escape(first.best_of_run)}; {100 * first.confidence:g}% bootstrap "
        f"intervals over prompts ({first.bootstrap_samples} resamples, seed {first.seed}); "
        f"win rate counts ties as half",
        caption_justify="left",
    )
    for col in (
        "run",
        "cost",
        "best-of-n",
        "its cost",
        "pairs",
        "reward",
        "best-of-n reward",
        "run − best-of-n",
        "win (ties ½)",
    ):
        t.add_column(col, justify="left" if col == "run" else "right")
    for m in matched:
        short = " (N too small)" if m.best_of_too_small else ""
        t.add_row(
            escape(m.run),
            _num(m.run_cost, 0),
            f"BoN-{m.n}{short}",
            _num(m.best_of_cost, 0),
            str(m.paired),
            _num(m.run_reward),
            _num(m.best_of_reward),
            "-"
            if m.mean_difference is None
            else f"{m.mean_difference:+.3f} {_ci(m.mean_difference_interval, pct=False)}",
            f"{_pct(m.win_rate_ties_half)} {_ci(m.win_rate_ties_half_interval)}",
        )
    return t
