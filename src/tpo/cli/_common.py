"""What the commands share: the model and method options of ``run``, ``batch``, ``sweep`` and ``serve`` and their
turning into objects, and for every command ``with_errors`` (errors to exit statuses), the ``KEY=VALUE`` parser
``_key_values`` and the ``--json`` output of ``eval`` and ``judge``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from ..api import _each_once
from ..config import MODES, TPOConfig
from ..engine.prompts import PromptSet
from ..errors import ConfigError, RunError, UserError
from ..models import DEFAULT_POLICY, DEFAULT_REWARD, Models
from ..models import build_models as _build_models
from ..types import ReplicaReport
from ._config_file import config_file_option
from ._terminal import for_terminal

F = TypeVar("F", bound=Callable[..., Any])


def _key_values(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        # Only the option name is normalised: a reward prefix ("my-plugin.key") keeps its hyphens.
        prefix, dot, name = key.strip().rpartition(".")
        out[prefix + dot + name.replace("-", "_")] = _parse_scalar(raw)
    return out


def _parse_scalar(raw: str) -> Any:
    import json

    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _urls(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> str | None:
    # Several --base-url, and OPENAI_BASE_URL=URL1,URL2, become one comma-separated list.
    urls = [u.strip() for value in values for u in value.split(",") if u.strip()]
    return ",".join(urls) if urls else None


def model_options(f: F) -> F:
    """``--config FILE``, then policy, critic and reward selection: every command that takes models takes a config file."""
    decorators = [
        config_file_option,
        click.option(
            "--policy",
            "policy_spec",
            default=DEFAULT_POLICY,
            show_default=True,
            metavar="SPEC",
            help="Model that samples answers: llamacpp[:FILE.gguf], openai:MODEL, vllm:MODEL, hf:MODEL, or a plugin.",
        ),
        click.option(
            "--critic",
            "critic_spec",
            default=None,
            metavar="SPEC",
            help="Model for the critique, feedback and rewrite calls (default: the policy).",
        ),
        click.option(
            "--reward",
            "reward_specs",
            multiple=True,
            metavar="SPEC",
            help=f"Reward model (default: {DEFAULT_REWARD}, the policy judging its own answers). Repeat to combine.",
        ),
        click.option(
            "--reward-weights", default=None, metavar="W1,W2,...", help="Weights of several --reward, in order."
        ),
        click.option(
            "--prefer",
            default=None,
            metavar="TEXT",
            help="Your preference, in words, for the judge reward (replaces its default rubric).",
        ),
        click.option(
            "--prefer-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Read the judge's rubric from a file.",
        ),
        click.option(
            "--base-url",
            multiple=True,
            envvar="OPENAI_BASE_URL",
            show_envvar=True,
            callback=_urls,
            help="Server URL for openai: policies. Repeat it (or separate URLs with commas) for several "
            "replicas of one model: requests go to the least busy.",
        ),
        click.option(
            "--ray-address",
            default=None,
            envvar="RAY_ADDRESS",
            show_envvar=True,
            metavar="ADDRESS",
            help="The Ray cluster for ray: models (auto, ray://HOST:10001); default: a local Ray instance.",
        ),
        click.option(
            "--api-key-env",
            default=None,
            metavar="NAME",
            help="Environment variable holding the API key (default OPENAI_API_KEY). The key is never printed or saved.",
        ),
        click.option(
            "--policy-option",
            "policy_options",
            multiple=True,
            callback=_key_values,
            metavar="KEY=VALUE",
            help="Backend option, e.g. n_ctx=4096, dtype=bfloat16, tensor_parallel_size=2. Repeatable.",
        ),
        click.option(
            "--critic-option",
            "critic_options",
            multiple=True,
            callback=_key_values,
            metavar="KEY=VALUE",
            help="Option of the --critic backend, as --policy-option is for the policy. Repeatable.",
        ),
        click.option(
            "--reward-option",
            "reward_options",
            multiple=True,
            callback=_key_values,
            metavar="[R.]KEY=VALUE",
            help="Reward model option, e.g. max_batch_size=8. With several --reward, prefix the reward's name or "
            "position: math.field=gold, 2.device=cuda. Repeatable.",
        ),
        click.option(
            "--reward-normalize",
            type=click.Choice(["none", "zscore", "minmax"]),
            default="none",
            show_default=True,
            help="With several --reward: normalise each within a prompt's candidates before weighting.",
        ),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def method_options(f: F) -> F:
    """The method's settings; every one maps to a ``TPOConfig`` field."""
    decorators = [
        click.option(
            "--mode",
            type=click.Choice(MODES),
            default="tpo",
            show_default=True,
            help="tpo (chosen vs rejected), revision (chosen alone) or bon (best-of-N).",
        ),
        click.option(
            "--width", "-n", type=click.IntRange(min=1), default=5, show_default=True, help="Answers per step (N)."
        ),
        click.option(
            "--depth", "-d", type=click.IntRange(min=0), default=2, show_default=True, help="Improvement steps (D)."
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Run seed; every call's seed derives from it."
        ),
        click.option("--temperature", type=float, default=0.7, show_default=True),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option(
            "--max-tokens",
            type=click.IntRange(min=1),
            default=2048,
            show_default=True,
            help="New tokens per answer (capped to fit the model's context window).",
        ),
        click.option(
            "--critic-temperature",
            type=float,
            default=None,
            help="Sampling temperature of the critique and feedback calls (default: --temperature).",
        ),
        click.option(
            "--critic-max-tokens",
            type=click.IntRange(min=1),
            default=None,
            help="New tokens for critiques and feedback (default: --max-tokens).",
        ),
        click.option(
            "--rejected-from",
            type=click.Choice(["all", "latest"]),
            default="all",
            show_default=True,
            help="Take the rejected answer from the whole store (the paper) or the latest step.",
        ),
        click.option(
            "--final-from",
            type=click.Choice(["all", "last_step"]),
            default="all",
            show_default=True,
            help="Return the best answer seen (the paper) or the best of the last step.",
        ),
        click.option(
            "--early-stop-score", type=float, default=None, help="Stop a prompt once its best score reaches this."
        ),
        click.option(
            "--early-stop-patience",
            type=click.IntRange(min=1),
            default=None,
            help="Stop a prompt after this many steps without improvement.",
        ),
        click.option(
            "--context-window",
            type=click.IntRange(min=256),
            default=None,
            help="Override the model's context window (tokens).",
        ),
        click.option(
            "--prompts",
            "prompts_file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="A .toml or .json file overriding the loss/gradient/update templates.",
        ),
        click.option(
            "--policy-params",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="N",
            help="Parameters of the policy model (e.g. 8e9), for FLOPs estimates (default: the backend's own count, "
            "if it reports one).",
        ),
        click.option(
            "--critic-params",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="N",
            help="Parameters of the --critic model, for FLOPs estimates (default: the policy's when it is the critic).",
        ),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


_METHOD_KEYS = (
    "mode",
    "width",
    "depth",
    "seed",
    "temperature",
    "top_p",
    "max_tokens",
    "critic_temperature",
    "critic_max_tokens",
    "rejected_from",
    "final_from",
    "early_stop_score",
    "early_stop_patience",
    "context_window",
    "policy_params",
    "critic_params",
)


def build_config(params: Mapping[str, Any]) -> TPOConfig:
    """A ``TPOConfig`` from the method options."""
    options = {k: params[k] for k in _METHOD_KEYS if k in params}
    if params.get("prompts_file") is not None:
        options["prompts"] = PromptSet.load(params["prompts_file"])
    return TPOConfig().with_options(**options)


def _rubric(params: Mapping[str, Any]) -> str | None:
    """The judge reward's rubric: ``--prefer``, or the text of ``--prefer-file`` (not both), or None."""
    rubric: str | None = params.get("prefer")
    if params.get("prefer_file") is not None:
        if rubric is not None:
            raise ConfigError("give either --prefer or --prefer-file, not both")
        rubric = Path(params["prefer_file"]).read_text(encoding="utf-8")
    return rubric


def build_models(params: Mapping[str, Any]) -> Models:
    """Policy, critic and reward from the command's model options, through ``tpo.build_models``."""
    rubric = _rubric(params)
    weights = params.get("reward_weights")
    parsed = None
    if weights:
        try:
            parsed = [float(w) for w in str(weights).split(",")]
        except ValueError as e:
            raise ConfigError(f"--reward-weights {weights!r} is not a comma-separated list of numbers") from e
    return _build_models(
        params["policy_spec"],
        reward=list(params.get("reward_specs") or ()) or DEFAULT_REWARD,
        critic=params.get("critic_spec"),
        policy_options=params.get("policy_options"),
        critic_options=params.get("critic_options"),
        reward_options=params.get("reward_options"),
        reward_weights=parsed,
        reward_normalize=params.get("reward_normalize") or "none",
        prefer=rubric,
        base_url=params.get("base_url"),
        api_key_env=params.get("api_key_env"),
        ray_address=params.get("ray_address"),
    )


def replica_lines(models: Models) -> list[str]:
    """One line per replica of each model spread over several (servers or Ray actors): where, and the work it did."""
    out: list[str] = []
    seen: set[int] = set()  # a judge's backend that is also the policy is listed once, as the policy
    for what, top in (("policy", models.policy), ("critic", models.critic), ("reward", models.reward)):
        # Inside a combined reward or a judge too.
        for obj in _each_once([top], descend=lambda o: True, seen=seen):
            reports = getattr(obj, "replica_reports", None)
            if callable(reports):
                out += describe_replicas(what, reports())
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_json_or_render(data: str, json_path: Path | None, render: Callable[[], None]) -> None:
    """The ``--json`` option: ``-`` prints ``data`` alone on standard output; a file gets it after ``render()``.

    Without the option only ``render()`` runs. A file that cannot be written is a ``ConfigError``.
    """
    if json_path is not None and str(json_path) == "-":
        click.echo(data)
        return
    render()
    if json_path is None:
        return
    try:
        json_path.write_text(data + "\n", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {json_path}: {e.strerror or e}") from e
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[dim]Wrote {escape(str(json_path))}[/dim]")


def with_errors(f: F) -> F:
    """Turn tpo's errors into a message and an exit status (2: your input or files; 1: a failure while running)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except UserError as e:
            click.echo(f"Error: {for_terminal(str(e))}", err=True)
            sys.exit(2)
        except RunError as e:
            click.echo(f"Failed: {for_terminal(str(e))}", err=True)
            sys.exit(1)
        except OSError as e:
            # A file the library did not wrap (a --prefer-file that cannot be read, say): named, without a traceback.
            if e.filename is None:
                raise
            click.echo(f"Error: cannot use {for_terminal(str(e.filename))}: {e.strerror or e}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def describe_replicas(what: str, reports: list[ReplicaReport]) -> list[str]:
    """Lines such as ``policy replica http://a:8000/v1: 412 requests, 2,060 sequences (52%), up``."""
    total = sum(r.sequences for r in reports) or 1
    lines = []
    for r in reports:
        line = (
            f"{what} replica {r.label}: {r.requests:,} requests, {r.sequences:,} sequences "
            f"({r.sequences / total:.0%}), {r.state}"
        )
        if r.failures:
            line += f"; {r.failures} failure{'s' * (r.failures != 1)}"
            if r.last_error:
                line += f", the last: {r.last_error}"
        lines.append(line)
    return lines
