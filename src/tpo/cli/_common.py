"""Options shared by the commands that run the method (``run``, ``batch``), and turning them into objects."""

from __future__ import annotations

import asyncio
import functools
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ..config import MODES, TPOConfig
from ..errors import ConfigError, RunError, UserError
from ..prompts import PromptSet
from ..protocols import PolicyBackend, RewardModel
from ..registry import BACKENDS_GROUP, load_plugin, policy_from_spec, reward_from_spec, split_spec

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_POLICY = "llamacpp"
DEFAULT_REWARD = "judge"


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


def model_options(f: F) -> F:
    """Policy, critic and reward selection."""
    decorators = [
        click.option("--policy", "policy_spec", default=DEFAULT_POLICY, show_default=True, metavar="SPEC",
                     help="Model that samples answers: llamacpp[:FILE.gguf], openai:MODEL, vllm:MODEL, hf:MODEL, or a plugin."),
        click.option("--critic", "critic_spec", default=None, metavar="SPEC",
                     help="Model for the critique, feedback and rewrite calls (default: the policy)."),
        click.option("--reward", "reward_specs", multiple=True, metavar="SPEC",
                     help=f"Reward model (default: {DEFAULT_REWARD}, the policy judging its own answers). Repeat to combine."),
        click.option("--reward-weights", default=None, metavar="W1,W2,...", help="Weights of several --reward, in order."),
        click.option("--prefer", default=None, metavar="TEXT",
                     help="Your preference, in words, for the judge reward (replaces its default rubric)."),
        click.option("--prefer-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="Read the judge's rubric from a file."),
        click.option("--base-url", default=None, envvar="OPENAI_BASE_URL", show_envvar=True,
                     help="Server URL for openai: policies."),
        click.option("--api-key-env", default=None, metavar="NAME",
                     help="Environment variable holding the API key (default OPENAI_API_KEY). The key is never printed or saved."),
        click.option("--policy-option", "policy_options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
                     help="Backend option, e.g. n_ctx=4096, dtype=bfloat16, tensor_parallel_size=2. Repeatable."),
        click.option("--critic-option", "critic_options", multiple=True, callback=_key_values, metavar="KEY=VALUE",
                     help="Option of the --critic backend, as --policy-option is for the policy. Repeatable."),
        click.option("--reward-option", "reward_options", multiple=True, callback=_key_values, metavar="[R.]KEY=VALUE",
                     help="Reward model option, e.g. max_batch_size=8. With several --reward, prefix the reward's name or "
                          "position: math.field=gold, 2.device=cuda. Repeatable."),
        click.option("--reward-normalize", type=click.Choice(["none", "zscore", "minmax"]), default="none", show_default=True,
                     help="With several --reward: normalise each within a prompt's candidates before weighting."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def method_options(f: F) -> F:
    """The method's settings; every one maps to a ``TPOConfig`` field."""
    decorators = [
        click.option("--mode", type=click.Choice(MODES), default="tpo", show_default=True,
                     help="tpo (chosen vs rejected), revision (chosen alone) or bon (best-of-N)."),
        click.option("--width", "-n", type=click.IntRange(min=1), default=5, show_default=True, help="Answers per step (N)."),
        click.option("--depth", "-d", type=click.IntRange(min=0), default=2, show_default=True, help="Improvement steps (D)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Run seed; every call's seed derives from it."),
        click.option("--temperature", type=float, default=0.7, show_default=True),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--max-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
                     help="New tokens per answer (capped to fit the model's context window)."),
        click.option("--critic-temperature", type=float, default=None,
                     help="Sampling temperature of the critique and feedback calls (default: --temperature)."),
        click.option("--critic-max-tokens", type=click.IntRange(min=1), default=None,
                     help="New tokens for critiques and feedback (default: --max-tokens)."),
        click.option("--rejected-from", type=click.Choice(["all", "latest"]), default="all", show_default=True,
                     help="Take the rejected answer from the whole store (the paper) or the latest step."),
        click.option("--final-from", type=click.Choice(["all", "last_step"]), default="all", show_default=True,
                     help="Return the best answer seen (the paper) or the best of the last step."),
        click.option("--early-stop-score", type=float, default=None, help="Stop a prompt once its best score reaches this."),
        click.option("--early-stop-patience", type=click.IntRange(min=1), default=None,
                     help="Stop a prompt after this many steps without improvement."),
        click.option("--context-window", type=click.IntRange(min=256), default=None,
                     help="Override the model's context window (tokens)."),
        click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="A .toml or .json file overriding the loss/gradient/update templates."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


_METHOD_KEYS = ("mode", "width", "depth", "seed", "temperature", "top_p", "max_tokens", "critic_temperature", "critic_max_tokens",
                "rejected_from", "final_from", "early_stop_score", "early_stop_patience", "context_window")


def build_config(params: Mapping[str, Any]) -> TPOConfig:
    """A ``TPOConfig`` from the method options."""
    options = {k: params[k] for k in _METHOD_KEYS if k in params}
    if params.get("prompts_file") is not None:
        options["prompts"] = PromptSet.load(params["prompts_file"])
    return TPOConfig().with_options(**options)


@dataclass
class Models:
    """The backends a command runs with."""

    policy: PolicyBackend
    critic: PolicyBackend | None
    reward: RewardModel

    async def aclose(self) -> None:
        """Close the reward, critic and policy, each once; one failing to close does not keep the others open."""
        await _aclose_each((self.reward, self.critic, self.policy))


async def _aclose_each(objects: Sequence[Any]) -> None:
    """``aclose()`` every object once, in order; a failure is reported and the rest still close."""
    seen: set[int] = set()
    for obj in objects:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        close = getattr(obj, "aclose", None)
        if close is None:
            continue
        try:
            await close()
        except Exception as e:  # closing after the work (or after a failure): report, go on
            warnings.warn(f"closing {getattr(obj, 'name', obj)!s} failed: {e}", RuntimeWarning, stacklevel=2)


def build_models(params: Mapping[str, Any]) -> Models:
    """Policy, critic and reward from the model options."""
    built: list[Any] = []
    try:
        return _build_models(params, built)
    except BaseException:
        # A model that failed to build must not leave the ones built before it open.
        asyncio.run(_aclose_each(built[::-1]))
        raise


def _build_models(params: Mapping[str, Any], built: list[Any]) -> Models:
    server = {k: params[k] for k in ("base_url", "api_key_env") if params.get(k) is not None}
    policy = _policy(params["policy_spec"], dict(params.get("policy_options") or {}), server)
    built.append(policy)
    critic = None
    critic_spec = params.get("critic_spec")
    critic_opts: dict[str, Any] = dict(params.get("critic_options") or {})
    # A critic with the same spec (and no options of its own) is the policy: never load one model twice.
    if critic_spec and (critic_spec != params["policy_spec"] or critic_opts):
        critic = _policy(critic_spec, critic_opts, server)
        built.append(critic)
    elif critic_opts:
        raise ConfigError("--critic-option needs --critic")
    rubric = params.get("prefer")
    if params.get("prefer_file") is not None:
        if rubric is not None:
            raise ConfigError("give either --prefer or --prefer-file, not both")
        rubric = Path(params["prefer_file"]).read_text(encoding="utf-8")
    specs = list(params.get("reward_specs") or ()) or [DEFAULT_REWARD]
    names = [spec.split(":", 1)[0] for spec in specs]
    per_reward = _split_reward_options(dict(params.get("reward_options") or {}), names)
    rewards = []
    for i, spec in enumerate(specs):
        opts = per_reward[i]
        if names[i] == "judge" and rubric is not None:
            opts["prefer"] = rubric
        if names[i] == "judge" and ":" in spec:
            _forward_server_options(spec.split(":", 1)[1], opts, server)
        rewards.append(reward_from_spec(spec, policy=policy, **opts))
        built.append(rewards[-1])
    weights = params.get("reward_weights")
    normalize = params.get("reward_normalize") or "none"
    if rubric is not None and "judge" not in names:
        raise ConfigError("--prefer and --prefer-file set the judge's rubric; add --reward judge to use them")
    if len(rewards) == 1:
        if weights or normalize != "none":
            raise ConfigError("--reward-weights and --reward-normalize need more than one --reward")
        return Models(policy, critic, rewards[0])
    from ..rewards.combine import WeightedReward  # only needed for several rewards

    parsed = None
    if weights:
        try:
            parsed = [float(w) for w in str(weights).split(",")]
        except ValueError as e:
            raise ConfigError(f"--reward-weights {weights!r} is not a comma-separated list of numbers") from e
    return Models(policy, critic, WeightedReward(rewards, weights=parsed, normalize=normalize))


def _policy(spec: str, options: dict[str, Any], server: Mapping[str, Any]) -> PolicyBackend:
    """A policy backend; --base-url and --api-key-env (also read from the environment) go only to server backends."""
    cls = load_plugin(BACKENDS_GROUP, split_spec(spec)[0])
    for key in getattr(cls, "server_options", ()):
        if key in server:
            options.setdefault(key, server[key])
    return policy_from_spec(spec, **options)


def _forward_server_options(judge_target: str, opts: dict[str, Any], server: Mapping[str, Any]) -> None:
    """--base-url and --api-key-env also reach a judge on a server (judge:openai:MODEL), as they reach the policy."""
    if not server or not judge_target.strip():
        return
    cls = load_plugin(BACKENDS_GROUP, split_spec(judge_target)[0])
    wanted = {k: v for k, v in server.items() if k in getattr(cls, "server_options", ())}
    if wanted:
        given = opts.get("backend_options") or {}
        opts["backend_options"] = {**wanted, **(given if isinstance(given, Mapping) else {})}


def _split_reward_options(options: Mapping[str, Any], names: Sequence[str]) -> list[dict[str, Any]]:
    """Options per reward: ``key`` goes to every reward, ``name.key`` or ``position.key`` (1-based) to one."""
    out: list[dict[str, Any]] = [{} for _ in names]
    for key, value in options.items():
        target, dot, rest = key.partition(".")
        if not dot:
            for opts in out:
                opts[key] = value
            continue
        if target.isdigit():
            pos = int(target)
            if not 1 <= pos <= len(names):
                raise ConfigError(f"--reward-option {key}: there is no reward number {pos} (there are {len(names)})")
            out[pos - 1][rest] = value
            continue
        matches = [i for i, name in enumerate(names) if name == target]
        if not matches:
            raise ConfigError(f"--reward-option {key}: no --reward named {target!r} (rewards: {', '.join(names)})")
        for i in matches:
            out[i][rest] = value
    return out


def with_errors(f: F) -> F:
    """Turn tpo's errors into a message and an exit status (2: your input; 1: a failure while running)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except UserError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except RunError as e:
            click.echo(f"Failed: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
