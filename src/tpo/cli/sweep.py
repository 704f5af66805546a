"""``tpo sweep``: a grid of configurations over one dataset, through one set of models, each into a batch output."""

from __future__ import annotations

import asyncio
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from ..batch.progress import BatchObserver, BatchState, BatchSummary
from ..config import MODES
from ..result import TPOResult
from ._common import build_models, with_errors
from ._terminal import for_terminal
from .batch import (
    PLAIN_LOG_INTERVAL_S,
    _config,
    _exit_stopped,
    _models_fingerprint,
    _read_input,
    _run,
    _settings,
    _stop_on_sigterm,
    batch_command,
)

if TYPE_CHECKING:  # tpo.batch.sweep loads when the command runs, not with every tpo command
    from ..batch.sweep import SweepEntry, SweepSummary

#: ``tpo batch``'s options that the sweep takes as lists, or replaces (the output is a folder).
_REPLACED = frozenset({"input_path", "output", "mode", "width", "depth"})


def _ints(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    out = []
    for item in str(value).split(","):
        item = item.strip()
        try:
            number = int(item)
        except ValueError:
            raise click.BadParameter(
                f"{item!r} is not a whole number; give a comma-separated list like 2,5,10", ctx=ctx, param=param
            ) from None
        if number < 1:
            raise click.BadParameter(f"{number} is below 1", ctx=ctx, param=param)
        out.append(number)
    return tuple(out)


def _modes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    out = tuple(m.strip() for m in str(value).split(",") if m.strip())
    unknown = [m for m in out if m not in MODES]
    if unknown or not out:
        raise click.BadParameter(
            f"{', '.join(map(repr, unknown)) or 'nothing'}: the modes are {', '.join(MODES)}", ctx=ctx, param=param
        )
    return out


@click.command("sweep")
@click.argument("input_path", metavar="INPUT")
@click.option(
    "-o",
    "--output",
    "folder",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder for the outputs: one JSONL per configuration, and manifest.json.",
)
@click.option(
    "--mode",
    "modes",
    default="tpo",
    show_default=True,
    callback=_modes,
    metavar="MODE[,MODE...]",
    help="Methods to run: any of tpo, revision, bon, comma-separated.",
)
@click.option(
    "--width",
    "-n",
    "widths",
    default="5",
    show_default=True,
    callback=_ints,
    metavar="N[,N...]",
    help="Widths of TPO and revision (and of best-of-N without --bon-width), comma-separated.",
)
@click.option(
    "--depth",
    "-d",
    "depths",
    default="2",
    show_default=True,
    callback=_ints,
    metavar="D[,D...]",
    help="Depths of TPO and revision; only the deepest runs, the others are its first steps.",
)
@click.option(
    "--bon-width",
    "bon_widths",
    default=None,
    callback=_ints,
    metavar="N[,N...]",
    help="Widths of best-of-N (default: --width); only the largest runs, the others take its first samples.",
)
@with_errors
@_stop_on_sigterm
def sweep_command(
    input_path: str,
    folder: Path,
    modes: tuple[str, ...],
    widths: tuple[int, ...],
    depths: tuple[int, ...],
    bon_widths: tuple[int, ...] | None,
    **params: Any,
) -> None:
    """Run every configuration of a grid over INPUT, through one set of models, into FOLDER.

    Takes every option of `tpo batch` (INPUT as there); --mode, --width and --depth take
    comma-separated lists, and --concurrency counts the prompts in progress per
    configuration. The requests of all configurations go to the backends together, so a
    batching backend batches across configurations. Each configuration gets a standard
    `tpo batch` output, FOLDER/tpo-d2-n5.jsonl and so on, with its own fingerprint, and
    FOLDER/manifest.json lists them. Only the deepest depth of each mode and width runs
    (the shallower ones are its first steps, exactly), and only the largest best-of-N (the
    smaller ones take its first samples). Run the same command again after an interruption
    (even kill -9) and every configuration continues where it stopped.

    Exit status as for `tpo batch`: 1 when any prompt of any configuration failed.
    """
    from ..batch.sweep import Sweep, SweepSummary, plan_sweep

    config = _config(params)
    entries = plan_sweep(config, modes=modes, widths=widths, depths=depths, bon_widths=bon_widths)
    first_run = next(e for e in entries if e.how == "run")
    console = Console(stderr=True, highlight=False)
    display = _display(params["log_mode"], console)
    dataset = _read_input(input_path, folder / first_run.file, config, params)
    settings = {
        **_settings(input_path, folder, params),
        "modes": list(modes),
        "widths": list(widths),
        "depths": list(depths),
        "bon_widths": list(bon_widths) if bon_widths else None,
    }
    sweep = Sweep(
        dataset,
        folder,
        entries,
        models=_models_fingerprint(params),
        settings=settings,
        retry_failed=params["retry_failed"],
        observer_for=display.observer_for,
        fail_fast_after=params["fail_fast"],
        on_note=display.note,
    )
    for line in sweep.open(restart=params["restart"]):
        display.note(f"removed {line}")
    display.start(entries)
    try:
        if sweep.unfinished == 0:
            derived = sweep.write_derived()
            summary = SweepSummary(
                folder, {n: r.summary() for n, r in sweep.runs.items()}, derived, 0.0, tuple(sweep.notes)
            )
        else:
            with console.status("Loading models…", spinner="dots") if display.interactive else nullcontext():
                models = build_models(params)
            summary = asyncio.run(_run(sweep, models))
    except KeyboardInterrupt as e:
        display.close()
        done = sum(r.summary().done for r in sweep.runs.values())
        total = sum(r.summary().total for r in sweep.runs.values())
        _exit_stopped(e, f"{done} of {total} prompt runs are finished in {folder}")
    finally:
        sweep.close()
        display.close()
    for note in summary.notes:
        display.note(note)
    _print_summary(entries, summary, Console(highlight=False))
    if any(s.failed for s in summary.runs.values()):
        sys.exit(1)


# The rest of `tpo batch`'s options, shared as they are: a new batch option is a sweep option too.
sweep_command.params.extend(p for p in batch_command.params if p.name not in _REPLACED)


# ---------------------------------------------------------------------------- progress


class _Display:
    """The progress of every configuration that runs: plain lines (for logs), a live table, or failures only."""

    interactive = False

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.states: dict[str, BatchState] = {}
        self._last = time.monotonic()

    def note_from(self, name: str, message: str) -> None:
        self.note(f"[{name}] {message}")

    def observer_for(self, entry: SweepEntry) -> BatchObserver:
        return _Child(self, entry.name)

    def note(self, message: str) -> None:
        click.echo(f"note: {for_terminal(message)}", err=True)

    def start(self, entries: tuple[SweepEntry, ...]) -> None:
        if self.quiet:
            return
        runs = [e.name for e in entries if e.how == "run"]
        derived = [f"{e.name} (from {e.source})" for e in entries if e.how != "run"]
        click.echo(
            f"sweep: running {', '.join(runs)}" + (f"; derived: {', '.join(derived)}" if derived else ""), err=True
        )

    def on_start(self, name: str, state: BatchState) -> None:
        self.states[name] = state

    def on_step(self, name: str, state: BatchState) -> None:
        self._maybe_progress()

    def on_result(self, name: str, result: TPOResult, state: BatchState) -> None:
        if result.status != "complete":
            click.echo(
                f"[{name}] FAILED {for_terminal(result.prompt_id)}: {for_terminal(result.error or '')}", err=True
            )
        self._maybe_progress()

    def on_end(self, name: str, summary: BatchSummary) -> None:
        if not self.quiet:
            click.echo(
                f"[{name}] finished: {summary.complete} of {summary.total} complete, {summary.failed} failed", err=True
            )

    def _maybe_progress(self) -> None:
        now = time.monotonic()
        if self.quiet or now - self._last < PLAIN_LOG_INTERVAL_S:
            return
        self._last = now
        parts = [f"{name} {s.done}/{s.total}" for name, s in sorted(self.states.items())]
        click.echo("progress: " + " · ".join(parts), err=True)

    def close(self) -> None:
        """Stop any live display."""


class _RichDisplay(_Display):
    interactive = True

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def note(self, message: str) -> None:
        self._progress.console.print(f"[yellow]note:[/yellow] {escape(for_terminal(message))}", markup=True)

    def on_start(self, name: str, state: BatchState) -> None:
        super().on_start(name, state)
        if not self._tasks:
            self._progress.start()
        self._tasks[name] = self._progress.add_task(name, total=state.total, completed=state.done)

    def on_step(self, name: str, state: BatchState) -> None:
        pass

    def on_result(self, name: str, result: TPOResult, state: BatchState) -> None:
        if result.status != "complete":
            self._progress.console.print(
                f"[red][{escape(name)}] FAILED {escape(for_terminal(result.prompt_id))}: "
                f"{escape(for_terminal(result.error or ''))}[/red]",
                markup=True,
            )
        self._progress.update(self._tasks[name], completed=state.done)

    def on_end(self, name: str, summary: BatchSummary) -> None:
        pass

    def close(self) -> None:
        self._progress.stop()


class _Child(BatchObserver):
    """One configuration's observer: its events go to the sweep's display with its name."""

    def __init__(self, parent: _Display, name: str) -> None:
        self.parent, self.name = parent, name

    def on_note(self, message: str) -> None:
        self.parent.note_from(self.name, message)

    def on_start(self, state: BatchState) -> None:
        self.parent.on_start(self.name, state)

    def on_step(self, partial: TPOResult, state: BatchState) -> None:
        self.parent.on_step(self.name, state)

    def on_result(self, result: TPOResult, state: BatchState) -> None:
        self.parent.on_result(self.name, result, state)

    def on_end(self, summary: BatchSummary) -> None:
        self.parent.on_end(self.name, summary)


def _display(mode: str, console: Console) -> _Display:
    if mode == "auto":
        mode = "rich" if console.is_terminal else "plain"
    if mode == "rich":
        return _RichDisplay(console)
    return _Display(quiet=mode == "quiet")


def _print_summary(entries: tuple[SweepEntry, ...], summary: SweepSummary, console: Console) -> None:
    from ..batch.sweep import MANIFEST

    t = Table(
        title=f"Sweep in {escape(str(summary.folder))} ({MANIFEST} lists every configuration)", title_justify="left"
    )
    for col in ("configuration", "made by", "complete", "failed", "file"):
        t.add_column(col, justify="right" if col in ("complete", "failed") else "left")
    for e in entries:
        if e.how == "run":
            s = summary.runs.get(e.name)
            complete, failed = (f"{s.complete}/{s.total}", str(s.failed)) if s else ("-", "-")
            how = "run"
        else:
            counts = summary.derived.get(e.name)
            complete, failed = (str(counts[0]), str(counts[1])) if counts else ("-", "-")
            how = f"first {'steps' if e.how == 'prefix' else 'samples'} of {e.source}"
        t.add_row(escape(e.name), escape(how), complete, failed, escape(e.file))
    console.print(t)


__all__ = ["sweep_command"]
