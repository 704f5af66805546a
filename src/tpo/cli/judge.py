"""``tpo judge``: compare the final answers of two runs with a held-out judge model, in both orders, resumably."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError
from ..models import build_policy as _policy
from ..result import dumps_json
from ._common import _key_values, _pct, print_json_or_render, with_errors
from ._config_file import config_file_option
from ._terminal import for_terminal

if TYPE_CHECKING:  # the analysis modules load when the command runs, not with every tpo command
    from ..analysis.judge import JudgeProgress, JudgeRun, JudgeSummary, Verdict
    from ..analysis.stats import Interval

#: A progress line after every this many verdicts.
_PROGRESS_EVERY = 50


@click.command("judge")
@click.argument("run_a", metavar="A", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("run_b", metavar="B", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--judge",
    "judge_spec",
    required=True,
    metavar="SPEC",
    help="The judge model: openai:MODEL (with --base-url), vllm:MODEL, hf:MODEL, llamacpp[:FILE], or a plugin.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSONL file of verdicts, one line per prompt (rerun the same command to resume).",
)
@click.option(
    "--judge-option",
    "judge_options",
    multiple=True,
    callback=_key_values,
    metavar="KEY=VALUE",
    help="Option of the judge's backend, as --policy-option is for tpo batch. Repeatable.",
)
@click.option(
    "--base-url", default=None, envvar="OPENAI_BASE_URL", show_envvar=True, help="Server URL for an openai: judge."
)
@click.option(
    "--api-key-env",
    default=None,
    metavar="NAME",
    help="Environment variable holding the API key (default OPENAI_API_KEY). Never printed or saved.",
)
@click.option(
    "--rubric",
    default=None,
    metavar="TEXT",
    help="The criterion the judge applies, in words (default: helpful, harmless, honest).",
)
@click.option(
    "--rubric-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Read the criterion from a file.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="TEXT",
    help="Names for A and B, in order (default: the method, e.g. 'TPO D2-N5'). Give both or neither.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0, 5),
    default=0.0,
    show_default=True,
    help="The judge's sampling temperature (a reply without a decision is asked again once, at 0.7).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Tokens for the judge's reasoning and decision.",
)
@click.option(
    "--context-window", type=click.IntRange(min=256), default=None, help="Override the judge's context window."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the judge's requests and of the bootstrap."
)
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts judged at once."
)
@click.option("--restart", is_flag=True, help="Discard the verdicts of an earlier run of this command and start over.")
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
    help="Bootstrap resamples for the interval of the win rate with ties as half.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the statistics as JSON to this file ('-' for standard output, with no table).",
)
@config_file_option
@with_errors
def judge_command(run_a: Path, run_b: Path, judge_spec: str, output: Path, **params: Any) -> None:
    """Judge the final answers of run A against run B, prompt by prompt, with a model that was not optimised against.

    A and B are `tpo batch` outputs over the same prompts. For every prompt both finished,
    the judge compares the two answers twice, once in each order, and the verdicts combine:
    the same run preferred both times wins, anything else is a tie (which cancels position
    bias). Every verdict, with the judge's reasoning, is appended to OUTPUT as it comes:
    run the same command again after an interruption and only what is missing is judged.
    Reports win, tie and loss rates with Wilson intervals, a bootstrap interval of the win
    rate with ties as half, how often the judge followed the position instead of the
    answers, and a length-controlled win rate.
    """
    from ..analysis.evaluate import load_run
    from ..analysis.judge import JudgeRun, JudgeSettings, read_verdicts, summarize_verdicts

    labels = params["labels"]
    if labels and len(labels) != 2:
        raise ConfigError(f"give two --label values (for A and B), not {len(labels)}")
    rubric = _rubric(params["rubric"], params["rubric_file"])
    settings = JudgeSettings(
        rubric=rubric,
        temperature=params["temperature"],
        max_tokens=params["max_tokens"],
        seed=params["seed"],
        concurrency=params["concurrency"],
        context_window=params["context_window"],
    )
    a = load_run(run_a, label=labels[0] if labels else None)
    b = load_run(run_b, label=labels[1] if labels else None)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    judge_options = dict(params["judge_options"])
    run = JudgeRun(
        a,
        b,
        output,
        judge={"spec": judge_spec, "options": judge_options},
        settings=settings,
        on_verdict=_progress,
    )
    for line in run.open(restart=params["restart"]):
        err.print(f"removed {escape(line)}")
    for note in run.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    if not run.pairs:
        run.close()
        raise ConfigError(f"{run_a} and {run_b} have no prompt finished with an answer in both; nothing to judge")
    try:
        if run.remaining:
            err.print(f"judging {run.remaining} of {len(run.pairs)} prompt(s) in both orders with {escape(judge_spec)}")
            server = {k: v for k, v in (("base_url", params["base_url"]), ("api_key_env", params["api_key_env"])) if v}
            backend = _policy(judge_spec, judge_options, server)
            outcome = asyncio.run(_judge(run, backend))
            if outcome.failed_now:
                err.print(
                    f"[yellow]{outcome.failed_now} prompt(s) could not be judged; run the same command again "
                    "to retry them[/yellow]"
                )
        else:
            run.close()
    except KeyboardInterrupt:
        click.echo(
            f"Interrupted. The verdicts so far are in {output}; run the same command again to continue.", err=True
        )
        sys.exit(130)
    verdicts, warnings = read_verdicts(output)
    summary = summarize_verdicts(
        verdicts,
        confidence=params["confidence"],
        bootstrap_samples=params["bootstrap_samples"],
        seed=params["seed"],
        path=str(output),
        warnings=warnings,
    )
    print_json_or_render(
        dumps_json({**summary.to_dict(), "unpaired": run.unpaired}, indent=2),
        params["json_path"],
        lambda: render(summary, Console(highlight=False), unpaired=run.unpaired),
    )


def _rubric(text: str | None, path: Path | None) -> str:
    from ..rewards.judge import DEFAULT_RUBRIC

    if text is not None and path is not None:
        raise ConfigError("give either --rubric or --rubric-file, not both")
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the rubric file {path}: {e}") from e
        if not text.strip():
            raise ConfigError(f"the rubric file {path} is empty")
    # An empty --rubric is refused by JudgeSettings.
    return text.strip() if text is not None else DEFAULT_RUBRIC


async def _judge(run: JudgeRun, backend: Any) -> Any:
    try:
        return await run.arun(backend)
    finally:
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()


def _progress(verdict: Verdict, progress: JudgeProgress) -> None:
    if verdict.verdict is None:
        click.echo(f"could not judge {for_terminal(verdict.prompt_id)}: {for_terminal(verdict.error or '')}", err=True)
    new = progress.done - progress.finished_before
    if new % _PROGRESS_EVERY == 0 or progress.done == progress.total:
        click.echo(f"[{progress.done}/{progress.total}] judged ({progress.failed} failed)", err=True)


def _ci(iv: Interval | None) -> str:
    return "" if iv is None else f" [{_pct(iv.low)}, {_pct(iv.high)}]"


def render(summary: JudgeSummary, console: Console, *, unpaired: int = 0) -> None:
    """Print a judging's statistics as a table."""
    s = summary
    level = f"{100 * s.confidence:g}%"
    t = Table(
        title=f"{escape(s.a)} (A) against {escape(s.b)} (B), judged by {escape(s.judge or '?')}",
        title_justify="left",
        caption=f"{level} intervals: Wilson for the rates, bootstrap ({s.bootstrap_samples} "
        f"resamples, seed {s.seed}) for ties as half, Wald for the length-controlled rate",
        caption_justify="left",
    )
    t.add_column("", justify="left")
    t.add_column("value", justify="right")
    rows = [
        ("prompts judged (both orders)", str(s.judged)),
        ("A wins", f"{s.wins} · {_pct(s.win_rate)}{_ci(s.win_interval)}"),
        ("ties (incl. orders disagreeing)", f"{s.ties} · {_pct(s.tie_rate)}{_ci(s.tie_interval)}"),
        ("B wins", f"{s.losses} · {_pct(s.loss_rate)}{_ci(s.loss_interval)}"),
        ("A's win rate, ties as half", f"{_pct(s.win_rate_ties_half)}{_ci(s.win_rate_ties_half_interval)}"),
        ("length-controlled win rate of A", f"{_pct(s.lc_win_rate)}{_ci(s.lc_win_rate_interval)}"),
        (
            "position bias (same position both orders)",
            f"{s.position_bias} · {_pct(s.position_bias_rate)}{_ci(s.position_bias_interval)}",
        ),
        ("decisions for the reply shown first", _pct(s.first_position_rate)),
        (
            "mean answer length A / B (characters)",
            "-" if s.mean_chars_a is None else f"{s.mean_chars_a:,.0f} / {s.mean_chars_b:,.0f}",
        ),
    ]
    if s.failed:
        rows.append(("could not be judged (retried on the next run)", str(s.failed)))
    if unpaired:
        rows.append(("prompts not finished in both runs (not judged)", str(unpaired)))
    for name, value in rows:
        t.add_row(name, value)
    console.print(t)
    for w in s.warnings:
        console.print(f"[yellow]Warning:[/yellow] {escape(for_terminal(w))}")


__all__ = ["judge_command", "render"]
