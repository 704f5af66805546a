"""``tpo batch``: optimise every prompt of a dataset into a JSONL file, resumable after any interruption."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from ..batch.datasets import AUTO, AUTO_ID_FIELDS, FORMATS, PromptDataset, read_prompts
from ..batch.fail_fast import DEFAULT_FAIL_FAST_AFTER
from ..batch.progress import BatchObserver, BatchState, BatchSummary
from ..config import TPOConfig
from ..models import DEFAULT_REWARD, Models
from ..result import TPOResult
from ._common import _rubric, build_config, build_models, method_options, model_options, replica_lines, with_errors
from ._terminal import for_terminal

if TYPE_CHECKING:  # the runner loads when a command runs, not with every tpo command
    from ..batch.runner import BatchRun

#: Seconds between the progress lines of ``--log plain``.
PLAIN_LOG_INTERVAL_S = 30.0


# ---------------------------------------------------------------------------- SIGTERM


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt``: the command stops the same way."""


class _SigtermHandler:
    """Makes SIGTERM (``docker stop``, systemd, Kubernetes) stop ``tpo batch`` as Ctrl-C does.

    While the run's task is on the event loop, the signal cancels it, as asyncio does on Ctrl-C,
    so the run writes the checkpoints in hand and closes its files; ``_run`` then raises
    ``_Terminated``. Elsewhere (reading the input, loading models) the handler raises it at once.
    """

    def __init__(self) -> None:
        self.received = False
        self.task: asyncio.Task[Any] | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True
        task = self.task
        if task is None or task.done():
            raise _Terminated
        task.get_loop().call_soon_threadsafe(task.cancel)


_SIGTERM = _SigtermHandler()


def _stop_on_sigterm(command: Any) -> Any:
    """Handle SIGTERM while ``command`` runs (on the main thread; signals go nowhere else)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return command(*args, **kwargs)
        _SIGTERM.received, _SIGTERM.task = False, None
        previous = signal.signal(signal.SIGTERM, _SIGTERM)
        try:
            return command(*args, **kwargs)
        except _Terminated:  # before the run began: nothing of this session to keep
            click.echo("Stopped by SIGTERM before any prompt ran. Run the same command again to start.", err=True)
            sys.exit(143)
        finally:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return wrapper


@click.command("batch")
@click.argument("input_path", metavar="INPUT")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The JSONL file of results (its checkpoints go in OUTPUT.tpo/ beside it).",
)
@click.option(
    "--prompt-field",
    default="prompt",
    show_default=True,
    help="The field holding the prompt: text or a list of OpenAI-style messages.",
)
@click.option(
    "--id-field",
    default=None,
    metavar="FIELD|none",
    help=f"The field holding a unique prompt id. Default: whichever of {', '.join(AUTO_ID_FIELDS)} every row "
    "has (and only that one; a note says which), else a hash of the row. 'none': always the hash.",
)
@click.option("--split", default=None, help="The split of a Hugging Face dataset.")
@click.option(
    "--input-format",
    type=click.Choice(FORMATS),
    default=None,
    help="The input's format (default: from the file extension; a folder is a Hugging Face dataset).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Run only the first N prompts (after --shuffle)."
)
@click.option("--shuffle", is_flag=True, help="Shuffle the prompts (reproducibly) before --limit.")
@click.option("--shuffle-seed", type=int, default=None, help="Seed of --shuffle (default: --seed).")
@click.option("--skip-invalid", is_flag=True, help="Skip invalid rows and report them, instead of stopping.")
@click.option("--restart", is_flag=True, help="Discard the output and checkpoints of an earlier run and start over.")
@click.option(
    "--retry-failed/--no-retry-failed",
    default=True,
    show_default=True,
    help="On resuming, run the prompts that failed again (from their last finished step).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help=f"Prompts in progress at once (default {TPOConfig().max_concurrent_prompts}).",
)
@click.option(
    "--fail-fast",
    "fail_fast",
    type=click.IntRange(min=0),
    default=DEFAULT_FAIL_FAST_AFTER,
    show_default=True,
    metavar="K",
    help="Stop the run when its first K prompts all fail with the same error (0: never).",
)
@click.option(
    "--log",
    "log_mode",
    type=click.Choice(["auto", "rich", "plain", "quiet"]),
    default="auto",
    show_default=True,
    help="Progress display: rich (interactive), plain (one line per prompt), quiet; auto picks rich on a terminal.",
)
@model_options
@method_options
@with_errors
@_stop_on_sigterm
def batch_command(input_path: str, output: Path, **params: Any) -> None:
    """Optimise every prompt of INPUT and append one JSON line per prompt to OUTPUT.

    INPUT is a JSONL, JSON (a list), CSV, TSV or Parquet file, a folder holding a Hugging Face
    dataset, or a Hub dataset name. Every row is checked before any model work. Each prompt
    is checkpointed after every step: run the same command again after an interruption
    (even kill -9) and it continues where it stopped; Ctrl-C and SIGTERM stop it after
    writing the checkpoints in hand. The line format is described in docs/batch.md.

    Exit status: 0 every prompt complete; 1 some prompts failed (rerun to retry them) or the
    run stopped on a failure (models that would not load, a full disk); 2 bad usage, input or
    options, a file that cannot be read or written, or an output another process is writing;
    130 Ctrl-C; 143 SIGTERM.
    """
    from ..batch.runner import BatchRun

    config = _config(params)
    console = Console(stderr=True, highlight=False)
    observer = _observer(params["log_mode"], console)
    dataset = _read_input(input_path, output, config, params)
    run = BatchRun(
        dataset,
        output,
        config=config,
        models=_models_fingerprint(params),
        settings=_settings(input_path, output, params),
        retry_failed=params["retry_failed"],
        observer=observer,
        fail_fast_after=params["fail_fast"],
    )
    for line in run.open(restart=params["restart"]):
        observer.on_note(f"removed {line}")
    replicas: list[str] = []
    try:
        if run.unfinished == 0:
            summary = run.summary()
        else:
            with console.status("Loading models…", spinner="dots") if observer.interactive else nullcontext():
                models = build_models(params)
            summary = asyncio.run(_run(run, models))
            replicas = replica_lines(models)
    except KeyboardInterrupt as e:
        observer.close()
        done = run.summary()
        _exit_stopped(e, f"{done.done} of {done.total} prompts are finished in {output}")
    finally:
        run.close()
        observer.close()
    _print_summary(summary)
    for line in replicas:
        click.echo(for_terminal(line), err=True)
    if summary.failed:
        sys.exit(1)


async def _run(run: BatchRun | Any, models: Models) -> Any:
    """``run.arun`` with ``models`` (a batch run or a sweep), stoppable by SIGTERM; the models are closed after."""
    _SIGTERM.task = asyncio.current_task()
    try:
        return await run.arun(models.policy, models.reward, critic=models.critic)
    except asyncio.CancelledError:
        if _SIGTERM.received:
            raise _Terminated from None
        raise
    finally:
        try:
            await models.aclose()
        finally:
            _SIGTERM.task = None


def _config(params: dict[str, Any]) -> TPOConfig:
    """The method options, and ``--concurrency``, as a ``TPOConfig`` (of ``tpo batch`` and ``tpo sweep``)."""
    config = build_config(params)
    if params["concurrency"] is not None:
        config = config.with_options(max_concurrent_prompts=params["concurrency"])
    return config


def _read_input(input_path: str, output: Path, config: TPOConfig, params: dict[str, Any]) -> PromptDataset:
    """The prompts the input options select (of ``tpo batch`` and ``tpo sweep``); ``output``: a run to resume."""
    return read_prompts(
        input_path,
        prompt_field=params["prompt_field"],
        split=params["split"],
        id_field=_id_field(params["id_field"], output, restart=params["restart"]),
        input_format=params["input_format"],
        limit=params["limit"],
        shuffle=params["shuffle"],
        seed=config.seed if params["shuffle_seed"] is None else params["shuffle_seed"],
        skip_invalid=params["skip_invalid"],
    )


def _id_field(option: str | None, output: Path, *, restart: bool) -> str | None:
    """What ``--id-field`` asks ``read_prompts`` for: the field, None (row hashes) for ``none``, else ``AUTO``.

    Without the option, resuming a run keeps the ids it began with (``resume_id_field``).
    """
    from ..batch.runner import resume_id_field

    if option is not None:
        return None if option.lower() == "none" else option
    return AUTO if restart else resume_id_field(output)


def _exit_stopped(e: KeyboardInterrupt, finished: str) -> NoReturn:
    """After Ctrl-C (exit status 130) or SIGTERM (143): say what is ``finished`` and how to continue."""
    how = "Stopped by SIGTERM" if isinstance(e, _Terminated) else "Interrupted"
    click.echo(f"{how}: {finished}. Run the same command again to continue.", err=True)
    sys.exit(143 if isinstance(e, _Terminated) else 130)


#: Options that cannot change any result, so a resumed run may change them: why, for each.
NOT_FINGERPRINTED: dict[str, str] = {
    "base_url": "a server that moved still serves the same model",
    "api_key_env": "which variable holds the key does not change the model",
    "ray_address": "which Ray cluster runs the replicas does not change the model",
    "concurrency": "how many prompts run at once changes no result",
    "fail_fast": "when to give up on a run whose prompts all fail alike",
    "log_mode": "the progress display",
    "retry_failed": "whether failed prompts are retried, not how",
    "restart": "what to do with an earlier run",
    "config_file": "its values are fingerprinted as the options they set",
    "skip_invalid": "the prompts selected are fingerprinted (input.rows_sha256)",
}
#: Options fingerprinted in another form: the input as read (``input.*``), the method as resolved
#: (``method.*``, every ``TPOConfig`` field) and the judge's rubric by its content.
_FINGERPRINTED_ELSEWHERE = frozenset(
    {
        "prompt_field",
        "id_field",
        "split",
        "input_format",
        "limit",
        "shuffle",
        "shuffle_seed",
        *(f.name for f in fields(TPOConfig)),
        "prompts_file",
        "prefer",
        "prefer_file",
    }
)
#: Friendlier names in the fingerprint for a few options.
_FINGERPRINT_NAMES = {"policy_spec": "policy", "critic_spec": "critic", "reward_specs": "reward"}


def _models_fingerprint(params: dict[str, Any]) -> dict[str, Any]:
    """Every option that can change results and is not fingerprinted elsewhere: the models and their options.

    Built by leaving out the options known not to matter (``NOT_FINGERPRINTED``) rather than
    by listing those that do, so an option added later is fingerprinted unless someone
    decides it changes nothing.
    """
    out: dict[str, Any] = {}
    for key, value in sorted(params.items()):
        if key in NOT_FINGERPRINTED or key in _FINGERPRINTED_ELSEWHERE:
            continue
        if key == "reward_specs":
            value = list(value or ()) or [DEFAULT_REWARD]
        elif isinstance(value, (tuple, list)):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[_FINGERPRINT_NAMES.get(key, key)] = value
    rubric = _rubric(params)
    out["rubric_sha256"] = hashlib.sha256(rubric.encode()).hexdigest() if rubric is not None else None
    return out


def _settings(input_path: str, output: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Every option as resolved (command line over --config over defaults), for config.json."""
    out: dict[str, Any] = {"input": input_path, "output": str(output)}
    for key, value in params.items():
        out[key] = str(value) if isinstance(value, Path) else value
    return out


# ---------------------------------------------------------------------------- progress


def _observer(mode: str, console: Console) -> _Display:
    if mode == "auto":
        mode = "rich" if console.is_terminal else "plain"
    if mode == "rich":
        return _RichDisplay(console)
    return _PlainDisplay(console, quiet=mode == "quiet")


class _Display(BatchObserver):
    interactive = False

    def __init__(self, console: Console) -> None:
        self.console = console

    def on_note(self, message: str) -> None:
        self.console.print(f"[yellow]note:[/yellow] {escape(for_terminal(message))}", markup=True, highlight=False)

    def close(self) -> None:
        """Stop any live display (before printing the summary, or on an interruption)."""


def _describe_start(state: BatchState) -> str:
    if state.finished_before:
        return f"resuming: {state.finished_before} of {state.total} prompts already finished"
    return f"starting: {state.total} prompts"


def _line(state: BatchState) -> str:
    parts = []
    at = state.at_step()
    if at:
        parts.append("at step " + " ".join(f"{step}:{n}" for step, n in at.items()))
    parts.append(f"{state.tokens_per_s():,.0f} tok/s")
    if state.failed:
        parts.append(f"{state.failed} failed")
    eta = state.eta_s()
    parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA …")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _outcome(result: TPOResult) -> str:
    # Ids come from the dataset and errors from servers: either may carry terminal escape sequences.
    if result.status != "complete":
        return for_terminal(f"FAILED {result.prompt_id}: {result.error}")
    score = f"{result.score:.4g}" if result.score is not None else "none"
    return f"done {for_terminal(result.prompt_id)}: score {score}, {len(result.steps)} steps, {result.usage.wall_time_s:.1f}s"


class _RichDisplay(_Display):
    """A live progress bar with the prompts per step, tokens per second, failures and ETA."""

    interactive = True

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("prompts"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self._task: Any = None

    def on_start(self, state: BatchState) -> None:
        self.console.print(_describe_start(state))
        self._task = self._progress.add_task("prompts", total=state.total, completed=state.done, info=_line(state))
        self._progress.start()

    def on_step(self, partial: TPOResult, state: BatchState) -> None:
        self._progress.update(self._task, info=_line(state))

    def on_result(self, result: TPOResult, state: BatchState) -> None:
        if result.status != "complete":
            self._progress.console.print(f"[red]{escape(_outcome(result))}[/red]", markup=True, highlight=False)
        self._progress.update(self._task, completed=state.done, info=_line(state))

    def close(self) -> None:
        self._progress.stop()


class _PlainDisplay(_Display):
    """One line per finished prompt and a progress line every ``PLAIN_LOG_INTERVAL_S``, for logs; ``quiet`` keeps failures only."""

    def __init__(self, console: Console, *, quiet: bool) -> None:
        super().__init__(console)
        self.quiet = quiet
        self._last = time.monotonic()

    def _echo(self, text: str) -> None:
        click.echo(text, err=True)

    def on_note(self, message: str) -> None:
        self._echo(f"note: {for_terminal(message)}")

    def on_start(self, state: BatchState) -> None:
        self._last = time.monotonic()
        if not self.quiet:
            self._echo(_describe_start(state))

    def _maybe_progress(self, state: BatchState) -> None:
        now = time.monotonic()
        if not self.quiet and now - self._last >= PLAIN_LOG_INTERVAL_S:
            self._last = now
            self._echo(f"progress: {state.done}/{state.total} prompts · {_line(state)}")

    def on_step(self, partial: TPOResult, state: BatchState) -> None:
        self._maybe_progress(state)

    def on_result(self, result: TPOResult, state: BatchState) -> None:
        if not self.quiet or result.status != "complete":
            self._echo(f"[{state.done}/{state.total}] {_outcome(result)}")
        self._maybe_progress(state)


def _print_summary(summary: BatchSummary) -> None:
    head = f"{summary.complete} of {summary.total} prompts complete"
    if summary.failed:
        shown = for_terminal(", ".join(summary.failed_ids[:10])) + (", …" if len(summary.failed_ids) > 10 else "")
        head += f", {summary.failed} failed ({shown})"
    if summary.invalid_rows:
        head += f"; {summary.invalid_rows} invalid input row(s) skipped"
    click.echo(f"{head}. Results: {summary.output}", err=True)
    u = summary.usage
    if summary.finished_before < summary.done:
        click.echo(
            f"This session: {summary.done - summary.finished_before} prompts in {_duration(summary.elapsed_s)}, "
            f"{u.policy_calls} policy calls, {u.prompt_tokens + u.completion_tokens:,} tokens, {u.reward_calls} answers scored.",
            err=True,
        )
    if summary.restarted:
        click.echo(
            f"{summary.restarted} prompt(s) with steps from an earlier session started over: the reward normalises "
            "per prompt (--reward-normalize), so their earlier steps could not be continued on the same scale.",
            err=True,
        )
    if summary.failed:
        click.echo(
            "Failed prompts are in the output with their error; run the same command again to retry them.", err=True
        )


__all__ = ["batch_command"]
