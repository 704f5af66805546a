"""A grid of configurations over one dataset through one set of models, each into a standard batch output, resumable.

Files, for an output folder ``DIR``::

    DIR/manifest.json            the grid: every configuration, its file, and how it was made
    DIR/tpo-d3-n5.jsonl          a configuration that was run: a ``tpo batch`` output, with
    DIR/tpo-d3-n5.jsonl.tpo/     its own sidecar (fingerprint, checkpoints, lock)
    DIR/tpo-d1-n5.jsonl          a configuration derived from one that was run (no sidecar)
    DIR/bon-n60.jsonl, DIR/bon-n15.jsonl, ...

**One engine, one set of models.** Every configuration that runs is a ``BatchRun`` (its own
output, checkpoints and fingerprint), and all of them run at once on one ``Engine``, each
with its own configuration (``Engine.optimize_many(config=...)``). So there is one
dispatcher per backend: a batching backend (vLLM, llama.cpp in-process, a GPU reward model)
receives the requests of all configurations in the same batches, and a concurrent one keeps
all of them in flight; the backend never waits for the slowest configuration.

**What is run, and what is derived.** Per-call seeds are ``derive_seed(seed, prompt id,
step, role)``, and a step depends only on the steps before it, so a depth-D run holds every
shallower run of the same mode, width and seed as its first steps: only the deepest depth
of each (mode, width) runs, and the others are cut from it (``first_steps``). Likewise the
samples of a best-of-N run are independent draws, so best-of-n for n < N takes the first n
of them (``first_samples``): the same in distribution as a best-of-n run, not bitwise (a
backend's first n of N samples need not be what it returns when asked for n). For the
expected best-of-n of every n, without the noise of one draw, ``tpo eval`` uses the exact
estimator of ``tpo.analysis.compute`` on the best-of-N file.

Each run resumes after any interruption as ``tpo batch`` does, with its own fingerprint;
derived files are written again from their source at the end of every session.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from .._redact import redact
from ..api import apreflight
from ..config import MODES, TPOConfig
from ..engine.algorithm import Engine, _best_of, _unscored_error
from ..engine.store import CandidateStore
from ..errors import ConfigError
from ..protocols import PolicyBackend, RewardModel
from ..result import TPOResult, Usage, dumps_json
from .datasets import PromptDataset
from .durable import write_atomic
from .fail_fast import DEFAULT_FAIL_FAST_AFTER
from .jsonl import read_result_lines
from .progress import BatchObserver, BatchSummary
from .runner import DEFAULT_COMPACT_MIN_BYTES, BatchRun, _closing, dataset_notes, sidecar_dir

__all__ = [
    "MANIFEST",
    "Sweep",
    "SweepEntry",
    "SweepSummary",
    "entry_name",
    "first_samples",
    "first_steps",
    "plan_sweep",
]

#: The manifest's file name in the sweep's folder.
MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1

How = Literal["run", "prefix", "first_samples"]


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SweepEntry:
    """One configuration of a sweep: its name, its configuration, and how its results are made.

    ``how`` is ``"run"`` (the configuration runs), ``"prefix"`` (the first steps of the run
    ``source``) or ``"first_samples"`` (the first ``width`` samples of the best-of-N run ``source``).
    """

    name: str
    config: TPOConfig
    how: How = "run"
    source: str | None = None

    @property
    def file(self) -> str:
        """The output's file name in the sweep's folder."""
        return f"{self.name}.jsonl"


def entry_name(config: TPOConfig) -> str:
    """``tpo-d2-n5``, ``revision-d1-n10`` or ``bon-n30``."""
    if config.mode == "bon":
        return f"bon-n{config.width}"
    return f"{config.mode}-d{config.depth}-n{config.width}"


def plan_sweep(
    base: TPOConfig,
    *,
    modes: Iterable[str],
    widths: Iterable[int],
    depths: Iterable[int] = (),
    bon_widths: Iterable[int] | None = None,
) -> tuple[SweepEntry, ...]:
    """Every configuration of the grid, and for each whether it runs or is derived.

    TPO and revision take every width with every depth (each at least 1); best-of-N takes
    ``bon_widths`` (default: ``widths``). Only the deepest depth of each (mode, width) and
    the largest best-of-N run; the rest are derived from them (see the module docstring).
    Everything else comes from ``base``.
    """
    mode_list = _unique(modes)
    for mode in mode_list:
        if mode not in MODES:
            raise ConfigError(f"sweep: unknown mode {mode!r}; the modes are {', '.join(MODES)}")
    width_list = sorted(_unique(_positive(widths, "width")))
    depth_list = sorted(_unique(_positive(depths, "depth")))
    stepped = [m for m in mode_list if m != "bon"]
    if stepped and not depth_list:
        raise ConfigError(f"sweep: {', '.join(stepped)} need at least one --depth (best-of-N is --mode bon)")
    if bon_widths is not None and "bon" not in mode_list:
        raise ConfigError("sweep: --bon-width is for --mode bon, which is not in the sweep")
    bon_list = sorted(_unique(_positive(bon_widths, "bon width"))) if bon_widths is not None else width_list
    if not width_list and stepped:
        raise ConfigError("sweep: give at least one --width")
    entries: list[SweepEntry] = []
    for mode in stepped:
        for width in width_list:
            deepest = base.with_options(mode=mode, width=width, depth=depth_list[-1])
            entries.append(SweepEntry(entry_name(deepest), deepest))
            for depth in depth_list[:-1]:
                config = base.with_options(mode=mode, width=width, depth=depth)
                entries.append(SweepEntry(entry_name(config), config, "prefix", entry_name(deepest)))
    if "bon" in mode_list:
        if not bon_list:
            raise ConfigError("sweep: give at least one --bon-width (or --width) for --mode bon")
        largest = base.with_options(mode="bon", width=bon_list[-1], depth=0)
        entries.append(SweepEntry(entry_name(largest), largest))
        for width in bon_list[:-1]:
            config = base.with_options(mode="bon", width=width, depth=0)
            entries.append(SweepEntry(entry_name(config), config, "first_samples", entry_name(largest)))
    if not entries:
        raise ConfigError("sweep: the grid is empty")
    return tuple(entries)


def _unique(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _positive(values: Iterable[Any] | None, what: str) -> list[int]:
    out = []
    for v in values or ():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"sweep: every {what} must be an integer of at least 1, not {v!r}")
        out.append(v)
    return out


# ---------------------------------------------------------------------------- deriving


def first_steps(result: TPOResult, depth: int) -> TPOResult:
    """The result the same configuration with ``depth`` steps would have given: ``result`` cut after step ``depth``.

    Exact for any finished result of a deeper run with the same seed (see the module
    docstring), early stopping and failures included: a prompt that stopped or failed
    within the first ``depth`` steps is the same; one that failed later is complete here.
    Usage is the kept steps' (their wall times summed).
    """
    deep = result.config.get("depth")
    if result.config.get("mode") == "bon" or not isinstance(deep, int) or not 0 <= depth < deep:
        raise ConfigError(f"first_steps: a result of depth {deep!r} has no shallower depth {depth}")
    config = {**result.config, "depth": depth}
    if len(result.steps) <= depth:
        # It stopped (early, or on a failure) within the first ``depth`` steps: the shallower run did the same.
        return replace(result, config=config)
    steps = result.steps[: depth + 1]
    candidates = tuple(c for c in result.candidates if c.step <= depth)
    store = CandidateStore(candidates)
    final = store.best()
    if result.config.get("final_from") == "last_step":
        # The engine's own choice, ties broken the same way as a run of that depth breaks them.
        final = _best_of(store, steps[-1].candidate_ids) or final
    usage = steps[-1].cumulative if steps[-1].cumulative is not None else sum((s.usage for s in steps), Usage())
    return replace(
        result,
        status="complete",
        error=None,
        answer=final.text if final else None,
        score=final.score if final else None,
        best_id=final.id if final else None,
        candidates=candidates,
        steps=steps,
        usage=usage,
        stopped_early=None,
        config=config,
    )


def first_samples(result: TPOResult, n: int) -> TPOResult:
    """A best-of-``n`` result from a best-of-N one: its first ``n`` samples, the best of them as the answer.

    "First" counts the samples that came back with text: an empty sample has no candidate, so
    when the first ``n`` include an empty one, the derived run has ``n`` answers where a real
    best-of-``n`` run would have had fewer (slightly optimistic, and only with empty samples).

    Usage is scaled: the one sampling request, ``n`` sequences, its prompt tokens, and
    ``n / N`` of its generated tokens, time and FLOPs.
    """
    if result.config.get("mode") != "bon" or not isinstance(result.config.get("width"), int):
        raise ConfigError("first_samples: needs a best-of-N result")
    if not 1 <= n < result.config["width"]:
        raise ConfigError(f"first_samples: n must be between 1 and {result.config['width'] - 1}, not {n}")
    config = {**result.config, "width": n}
    if not result.steps:  # it failed before its samples came back: so would the smaller run
        return replace(result, config=config)
    step = result.steps[0]
    ids = step.candidate_ids[:n]
    keep = set(ids)
    candidates = tuple(c for c in result.candidates if c.id in keep)
    share = len(ids) / max(step.usage.sequences, 1)
    u = step.usage
    usage = Usage(
        policy_calls=u.policy_calls,
        sequences=len(ids),
        prompt_tokens=u.prompt_tokens,
        completion_tokens=round(u.completion_tokens * share),
        reward_calls=len(candidates),
        reward_failures=sum(1 for c in candidates if c.score is None),
        wall_time_s=u.wall_time_s * share,
        prompt_flops=u.prompt_flops,
        completion_flops=u.completion_flops * share if u.completion_flops is not None else None,
    )
    store = CandidateStore(candidates)
    final = store.best()
    failures = tuple(f for f in step.failures if any(cid in f for cid in keep))
    new_step = replace(
        step,
        candidate_ids=ids,
        failures=failures,
        best_score=final.score if final else None,
        usage=usage,
        cumulative=usage if step.cumulative is not None else None,
    )
    status: Literal["complete", "failed"] = "complete"
    error = None
    if final is None:
        status = "failed"
        error = _unscored_error(candidates)
    return replace(
        result,
        status=status,
        error=error,
        answer=final.text if final else None,
        score=final.score if final else None,
        best_id=final.id if final else None,
        candidates=candidates,
        steps=(new_step,),
        usage=usage,
        config=config,
    )


def _derive(entry: SweepEntry, data: Mapping[str, Any]) -> TPOResult:
    """One result of ``entry``'s source, as ``entry`` would have it."""
    result = TPOResult.from_dict(data)
    return (
        first_steps(result, entry.config.depth) if entry.how == "prefix" else first_samples(result, entry.config.width)
    )


# ---------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepSummary:
    """How a sweep session ended: the summary of every configuration that ran, and the derived files written."""

    folder: Path
    runs: Mapping[str, BatchSummary]
    #: Derived configuration name → (complete, failed) prompts in its file.
    derived: Mapping[str, tuple[int, int]]
    elapsed_s: float
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every configuration that ran finished every prompt and none failed."""
        return all(s.ok for s in self.runs.values())


class Sweep:
    """Every configuration of ``entries`` over one dataset into ``folder``, through one set of models.

    ``models`` and ``settings`` are those of ``BatchRun`` (the same for every configuration,
    so each configuration's fingerprint is what ``tpo batch`` with its options would have).
    ``observer_for(entry)`` gives each running configuration its observer; ``on_note`` gets
    the notes about the dataset they share (``tpo.batch.runner.dataset_notes``), once. Call
    ``open()`` before loading models, then ``arun()``.
    """

    def __init__(
        self,
        dataset: PromptDataset,
        folder: str | os.PathLike[str],
        entries: Sequence[SweepEntry],
        *,
        models: Mapping[str, Any],
        settings: Mapping[str, Any] | None = None,
        retry_failed: bool = True,
        observer_for: Callable[[SweepEntry], BatchObserver] | None = None,
        compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES,
        fail_fast_after: int = DEFAULT_FAIL_FAST_AFTER,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ConfigError(
                f"sweep: configuration names repeat: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}"
            )
        by_name = {e.name: e for e in entries}
        for e in entries:
            if e.how != "run" and (e.source not in by_name or by_name[e.source].how != "run"):
                raise ConfigError(
                    f"sweep: {e.name} is derived from {e.source!r}, which is not a configuration that runs"
                )
        self.dataset = dataset
        self.folder = Path(folder)
        self.entries = tuple(entries)
        self.models = dict(models)
        self.settings = dict(settings or {})
        observer_for = observer_for or (lambda entry: BatchObserver())
        self.runs: dict[str, BatchRun] = {
            e.name: BatchRun(
                dataset,
                self.folder / e.file,
                config=e.config,
                models=models,
                settings={**self.settings, "sweep_configuration": e.name},
                retry_failed=retry_failed,
                observer=observer_for(e),
                compact_min_bytes=compact_min_bytes,
                fail_fast_after=fail_fast_after,
                dataset_notes=False,  # the sweep notes them, once
            )
            for e in entries
            if e.how == "run"
        }
        self.on_note = on_note or (lambda message: None)
        if not self.runs:
            raise ConfigError("sweep: no configuration runs (every one is derived)")
        self.notes: list[str] = []
        self._open = False

    @property
    def unfinished(self) -> int:
        """Prompts without a line in the outputs of the configurations that run (known after ``open()``)."""
        return sum(run.unfinished for run in self.runs.values())

    def open(self, *, restart: bool = False) -> list[str]:
        """Open every configuration that runs (each checks its own fingerprint) and write the manifest.

        A file written by an earlier sweep as a derived configuration is removed when that
        configuration now runs. ``restart`` starts every configuration over. Returns what
        was removed; nothing when the sweep is open already (``arun`` opens it too).
        """
        if self._open:
            return []
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"the sweep's output {self.folder} is a file; give a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        removed: list[str] = []
        earlier = self._earlier_manifest()
        for entry in self.entries:
            path = self.folder / entry.file
            if not path.exists() or sidecar_dir(path).exists():
                continue
            derived_before = earlier.get(entry.name, {}).get("how") not in (None, "run")
            # A file an earlier sweep derived is not a run's output: it makes way for a run of that
            # configuration, and a restart writes it again.
            if (entry.how == "run" and derived_before) or (entry.how != "run" and restart):
                path.unlink()
                removed.append(f"{path} (derived by an earlier sweep)")
        for note in dataset_notes(self.dataset):
            self.on_note(note)
        opened: list[BatchRun] = []
        try:
            for run in self.runs.values():
                removed += run.open(restart=restart)
                opened.append(run)
        except BaseException:
            for run in opened:
                run.close()
            raise
        self._write_manifest(None)
        self._open = True
        return removed

    def close(self) -> None:
        """Release every configuration's lock (``arun`` does this when it ends)."""
        for run in self.runs.values():
            run.close()
        self._open = False

    async def arun(
        self, policy: PolicyBackend, reward: RewardModel, *, critic: PolicyBackend | None = None
    ) -> SweepSummary:
        """Run every configuration at once on one engine, then write the derived files and the manifest."""
        started = time.monotonic()
        self.open()
        runs = list(self.runs.values())
        # One engine for all: one dispatcher per backend, so requests of every configuration share its batches.
        engine = Engine(policy, reward, critic=critic, config=runs[0].config)
        tasks: dict[str, asyncio.Task[BatchSummary]] = {}
        try:
            # The models are checked once for every configuration, not once per configuration.
            if self.unfinished:
                await apreflight(policy, critic, reward)
            tasks = {
                name: asyncio.create_task(run.arun(policy, reward, critic=critic, engine=engine, preflight=False))
                for name, run in self.runs.items()
            }
            # The first configuration that stops on an error stops the others: they share the models.
            done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            summaries = {name: task.result() for name, task in tasks.items()}
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            self.close()
        derived = await asyncio.to_thread(self.write_derived)
        self._write_manifest(summaries)
        return SweepSummary(self.folder, summaries, derived, time.monotonic() - started, tuple(self.notes))

    def run(self, policy: PolicyBackend, reward: RewardModel, *, critic: PolicyBackend | None = None) -> SweepSummary:
        """``arun`` from synchronous code; closes the connections the backends opened on its event loop."""
        return asyncio.run(_closing(self.arun(policy, reward, critic=critic), policy, critic, reward))

    def write_derived(self) -> dict[str, tuple[int, int]]:
        """Write every derived configuration's file from its source's finished results; return (complete, failed) of each."""
        out: dict[str, tuple[int, int]] = {}
        for entry in self.entries:
            if entry.how == "run":
                continue
            target = self.folder / entry.file
            if sidecar_dir(target).exists():
                self.notes.append(f"{target} was run by itself earlier; it is kept, not derived")
                continue
            source = self.folder / f"{entry.source}.jsonl"
            lines = read_result_lines(source, partial(_derive, entry))
            results = [line.value for line in lines.lines.values()]
            write_atomic(target, "".join(r.to_json() + "\n" for r in results).encode("utf-8"))
            failed = sum(1 for r in results if r.status != "complete")
            out[entry.name] = (len(results) - failed, failed)
        return out

    def _earlier_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.folder / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return {c["name"]: c for c in data.get("configurations", []) if isinstance(c, dict) and "name" in c}
        except (OSError, ValueError, TypeError, KeyError):
            return {}

    def _write_manifest(self, summaries: Mapping[str, BatchSummary] | None) -> None:
        from .. import __version__

        configurations = []
        for e in self.entries:
            item: dict[str, Any] = {
                "name": e.name,
                "file": e.file,
                "mode": e.config.mode,
                "width": e.config.width,
                "depth": e.config.depth,
                "how": e.how,
                "derived_from": e.source,
            }
            if e.how == "prefix":
                item["note"] = (
                    f"the first {e.config.depth} step(s) of {e.source}: the same as running it (per-call "
                    "seeds; a step depends only on the steps before it); wall times are the kept steps'"
                )
            elif e.how == "first_samples":
                item["note"] = (
                    f"the first {e.config.width} samples of {e.source}: best-of-{e.config.width} in "
                    "distribution; generated tokens, time and FLOPs scaled by the share of samples kept"
                )
            if summaries is not None and e.name in summaries:
                s = summaries[e.name]
                item.update(total=s.total, complete=s.complete, failed=s.failed)
            configurations.append(item)
        data = {
            "manifest_version": _MANIFEST_VERSION,
            "tpo_version": __version__,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "input": self.dataset.describe(),
            "models": next(iter(self.runs.values())).models,  # as fingerprinted: secrets masked
            "configurations": configurations,
            "options": redact(self.settings),
        }
        write_atomic(self.folder / MANIFEST, (dumps_json(data, indent=2) + "\n").encode("utf-8"))
