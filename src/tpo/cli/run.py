"""``tpo run``: optimise one prompt and show the steps as they happen."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..api import apreflight
from ..config import TPOConfig
from ..engine.algorithm import Engine
from ..errors import InputError
from ..models import DEFAULT_POLICY
from ..result import TPOResult
from ._common import build_config, build_models, method_options, model_options, replica_lines, with_errors
from ._terminal import for_terminal

#: New tokens per reply when the bundled demo model runs without --max-tokens. The paper's 2048
#: let a 135M model loop for thousands of tokens: a default run then takes twenty minutes on
#: two CPU cores instead of a few, and long loops also defeat its own judging.
DEMO_MAX_TOKENS = 512

DEMO_NOTE = (
    "This runs on SmolLM2-135M-Instruct, a tiny model bundled for a quick offline demonstration: "
    "its answers and its own judging are weak, and TPO needs a policy that follows instructions well. "
    "For real use point tpo at a capable model, e.g. --policy openai:MODEL --base-url http://localhost:8000/v1 "
    "(a vLLM, SGLang, llama.cpp or Ollama server) and a reward model, e.g. --reward hf:Skywork/Skywork-Reward-V2-Qwen3-0.6B."
)


@click.command("run")
@click.argument("prompt", required=False)
@click.option(
    "--messages",
    "messages_file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="Read the conversation from a JSON file of OpenAI-style messages ('-' for standard input).",
)
@click.option(
    "--metadata",
    "metadata",
    multiple=True,
    metavar="KEY=VALUE",
    help="Metadata of the prompt, for rewards that read it (e.g. --metadata answer=42 for --reward math).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON (progress is not shown).")
@model_options
@method_options
@with_errors
def run_command(
    prompt: str | None, messages_file: Any, metadata: tuple[str, ...], as_json: bool, **params: Any
) -> None:
    """Optimise the answer to PROMPT and print the best answer found.

    With no options this runs TPO (depth 2, width 5) on the bundled SmolLM2-135M model with
    the model judging its own answers, offline.
    """
    if (prompt is None) == (messages_file is None):
        raise InputError("give a PROMPT argument or --messages FILE (one of them)")
    conversation: Any = prompt
    if messages_file is not None:
        try:
            conversation = json.load(messages_file)
        except ValueError as e:
            raise InputError(f"--messages {messages_file.name}: not valid JSON: {e}") from e
    meta: dict[str, Any] = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--metadata {item!r} is not KEY=VALUE")
        meta[key] = value
    config = demo_config(params)
    demo = params["policy_spec"] == DEFAULT_POLICY
    console = Console(stderr=True, highlight=False)
    if demo and not as_json:
        console.print(
            f"[dim]{DEMO_NOTE} Replies are limited to {config.max_tokens} new tokens here "
            "(--max-tokens to change).[/dim]\n"
        )
    with console.status("Loading models…", spinner="dots") if not as_json else nullcontext():
        models = build_models(params)
    result = asyncio.run(_run(conversation, meta, models, config, None if as_json else console))
    if as_json:
        click.echo(result.to_json(indent=2))
    else:
        _render_final(result, console)
    for line in replica_lines(models):
        console.print(f"[dim]{escape(for_terminal(line))}[/dim]")
    if result.status == "failed":
        sys.exit(1)


def demo_config(params: Mapping[str, Any]) -> TPOConfig:
    """``build_config(params)``, with replies of ``DEMO_MAX_TOKENS`` for the bundled demo model without --max-tokens.

    For the command running now (``tpo run``, ``tpo serve``): it asks the click context where --max-tokens came from.
    """
    config = build_config(params)
    if (
        params["policy_spec"] == DEFAULT_POLICY
        and click.get_current_context().get_parameter_source("max_tokens") == ParameterSource.DEFAULT
    ):
        config = config.with_options(max_tokens=DEMO_MAX_TOKENS)
    return config


async def _run(
    conversation: Any, metadata: dict[str, Any], models: Any, config: Any, console: Console | None
) -> TPOResult:
    try:
        # An unreachable server or a reward that cannot be called fails here, in seconds, not after every retry.
        await apreflight(models.policy, models.critic, models.reward)
        return await _optimize(conversation, metadata, models, config, console)
    finally:
        await models.aclose()


async def _optimize(
    conversation: Any, metadata: dict[str, Any], models: Any, config: Any, console: Console | None
) -> TPOResult:
    engine = Engine(models.policy, models.reward, critic=models.critic, config=config)
    shown = 0
    status = console.status(_doing(config, 0), spinner="dots") if console is not None else nullcontext()

    def on_step(partial: TPOResult) -> None:
        nonlocal shown
        if console is None:
            return
        for record in partial.steps[shown:]:
            _render_step(partial, record, console)
        shown = len(partial.steps)
        if hasattr(status, "update"):
            status.update(_doing(config, shown))

    if console is not None:
        console.print(
            f"[bold]{config.mode}[/bold] width {config.width}, depth {config.depth}, seed {config.seed} · "
            f"policy {escape(for_terminal(engine.policy.name))} · "
            f"reward {escape(for_terminal(getattr(engine.reward, 'name', '?')))}\n"
        )
    with status:
        return await engine.optimize(conversation, metadata=metadata, on_step=on_step)


def _doing(config: Any, step: int) -> str:
    """What the run is busy with before step ``step`` is recorded, for the progress spinner."""
    if step == 0:
        return f"Sampling {config.width} answer(s) and scoring them…"
    if config.mode == "revision":
        work = "critique of the best answer"
    else:
        work = "critique of the best answer against the worst"
    return f"Step {step} of {config.depth}: {work}, feedback, {config.width} rewrite(s), scoring…"


def _render_step(result: TPOResult, record: Any, console: Console) -> None:
    by_id = {c.id: c for c in result.candidates}
    title = "sample" if record.step == 0 else f"step {record.step}: {record.kind}"
    if record.fallback_to_revision:
        title += " (chosen = rejected: fell back to revision)"
    console.print(f"[bold]{title}[/bold]")
    table = Table(show_edge=False, pad_edge=False, expand=True)
    table.add_column("id", style="dim", no_wrap=True, min_width=8)
    table.add_column("score", justify="right", no_wrap=True, min_width=6)
    table.add_column("answer", overflow="ellipsis", no_wrap=True, ratio=1)
    if record.chosen_id is not None:
        against = ""
        if record.rejected_id is not None and record.rejected_id in by_id:
            against = f" against the worst, {record.rejected_id[:8]} ({_score(by_id[record.rejected_id].score)})"
        chosen = by_id.get(record.chosen_id)
        console.print(
            f"[dim]  rewrote the best answer, {record.chosen_id[:8]} "
            f"({_score(chosen.score if chosen else None)}){against}[/dim]"
        )
    for cid in record.candidate_ids:
        c = by_id.get(cid)
        if c is None:
            continue
        score = _score(c.score) if c.score is not None else "[red]failed[/red]"
        if c.id == result.best_id:
            score = f"[bold green]{score}[/bold green]"
        # Model text is never rich markup: "[/INST]" or "arr[i]" must show as written.
        table.add_row(cid[:8], score, Text(for_terminal(c.text).replace("\n", " ")))
    console.print(table)
    notes = []
    if record.fallbacks:
        notes.append(f"{record.fallbacks} rewrite(s) lacked the answer tags")
    notes.extend(record.failures)
    if record.truncated:
        notes.append("shortened to fit the context window: " + ", ".join(record.truncated))
    for note in notes:
        console.print(f"  [yellow]· {escape(for_terminal(note))}[/yellow]")
    best = f"{record.best_score:.3f}" if record.best_score is not None else "none"
    console.print(f"  best so far: {best} · {record.usage.wall_time_s:.1f}s\n")


def _score(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "none"


def _render_final(result: TPOResult, console: Console) -> None:
    if result.stopped_early:
        console.print(f"[dim]Stopped early: {escape(for_terminal(result.stopped_early))}[/dim]")
    if result.error:
        console.print(f"[red]Failed:[/red] {escape(for_terminal(result.error))}")
    u = result.usage
    console.print(
        f"[dim]{u.policy_calls} policy calls, {u.sequences} sequences, {u.prompt_tokens} prompt + "
        f"{u.completion_tokens} completion tokens, {u.reward_calls} answers scored, {u.wall_time_s:.1f}s[/dim]"
    )
    if result.answer is None:
        return
    title = f"best answer · score {result.score:.3f}"
    console.print(Panel(Text(for_terminal(result.answer)), title=title, title_align="left"))
    # The answer itself also goes to standard output, exactly as written, so `tpo run ... > answer.txt` works.
    if not sys.stdout.isatty():
        click.echo(result.answer, color=True)  # color=True: click would strip escape sequences from the file
