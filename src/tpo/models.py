"""Model assembly: the policy, critic and reward a run uses, built from specs and options in one call.

This is what ``tpo run``, ``tpo batch`` and ``tpo serve`` call, and what a Python user calls to
get the same models without the command line::

    import tpo

    async with tpo.build_models("openai:meta-llama/Llama-3.1-70B-Instruct", reward="hf:./my-rm",
                                base_url="http://gpu-host:8000/v1") as models:
        result = await tpo.aoptimize("Hi!", policy=models.policy, reward=models.reward, critic=models.critic)

It decides the things a spec alone does not say: a critic with the policy's spec and no options
of its own *is* the policy (never load one model twice); ``prefer`` becomes the judge's rubric;
server options (``base_url``, ``api_key_env``, ``ray_address``) reach every plugin that declares
them, including a judge's own backend (``judge:openai:MODEL``); several rewards are combined by weight. When
a later part cannot be built, what was built before it is closed before the error propagates.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .protocols import PolicyBackend, RewardModel
from .registry import BACKENDS_GROUP, REWARDS_GROUP, load_plugin, policy_from_spec, reward_from_spec, split_spec

__all__ = ["DEFAULT_POLICY", "DEFAULT_REWARD", "Models", "build_models", "build_policy"]

#: The bundled SmolLM2-135M-Instruct through llama.cpp.
DEFAULT_POLICY = "llamacpp"
#: The policy judging its own answers against a rubric.
DEFAULT_REWARD = "judge"

_NORMALIZE = ("none", "zscore", "minmax")


@dataclass
class Models:
    """The backends a run uses: close them with ``await models.aclose()``, ``models.close()`` or ``async with``.

    ``critic`` is None when the policy writes the critiques and rewrites itself.
    """

    policy: PolicyBackend
    critic: PolicyBackend | None
    reward: RewardModel

    async def aclose(self) -> None:
        """Close the reward, critic and policy, each once; one failing to close does not keep the others open."""
        await aclose_each((self.reward, self.critic, self.policy))

    def close(self) -> None:
        """``aclose()`` from synchronous code (not from inside a running event loop)."""
        asyncio.run(self.aclose())

    async def __aenter__(self) -> Models:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def aclose_each(objects: Sequence[Any]) -> None:
    """``aclose()`` every object once, in order; a failure is reported as a warning and the rest still close."""
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


def build_models(
    policy: str = DEFAULT_POLICY,
    *,
    reward: str | Sequence[str] = DEFAULT_REWARD,
    critic: str | None = None,
    policy_options: Mapping[str, Any] | None = None,
    critic_options: Mapping[str, Any] | None = None,
    reward_options: Mapping[str, Any] | None = None,
    reward_weights: Sequence[float] | None = None,
    reward_normalize: str = "none",
    prefer: str | None = None,
    base_url: str | Sequence[str] | None = None,
    api_key_env: str | None = None,
    ray_address: str | None = None,
) -> Models:
    """Build the policy, critic and reward from specs (``NAME[:TARGET]``, as ``tpo backends`` lists them).

    ``reward`` is one spec or several; several are combined by ``reward_weights`` (default:
    equal) after ``reward_normalize`` (``none``, ``zscore`` or ``minmax`` within a prompt).
    ``reward_options`` go to every reward, or to one when the key is prefixed with the reward's
    name or 1-based position (``"math.field"``, ``"2.device"``). ``prefer`` is the judge's
    rubric in words. ``base_url`` and ``api_key_env`` go to every backend that talks to a server;
    several URLs (a list, or one string of comma-separated URLs) make several replicas of one
    model, and requests go to the least busy. ``ray_address`` goes to the ``ray:`` wrappers
    (``"auto"``, ``"ray://HOST:10001"``; default: ``RAY_ADDRESS``, else a local Ray instance).
    Nothing is loaded twice: a ``critic`` equal to ``policy`` with no options of its own is the policy.
    Raises ``ConfigError`` (a ``UserError``) for anything wrong in the arguments.
    """
    specs = [reward] if isinstance(reward, str) else list(reward)
    if not specs:
        raise ConfigError("build_models needs at least one reward spec")
    if reward_normalize not in _NORMALIZE:
        raise ConfigError(f"reward_normalize must be one of {', '.join(_NORMALIZE)}, got {reward_normalize!r}")
    if base_url is not None and not isinstance(base_url, str):
        base_url = ",".join(base_url)  # the server plugins take several URLs as one comma-separated list
    given = (("base_url", base_url), ("api_key_env", api_key_env), ("ray_address", ray_address))
    server = {k: v for k, v in given if v is not None}
    built: list[Any] = []
    try:
        return _assemble(
            policy,
            critic,
            specs,
            dict(policy_options or {}),
            dict(critic_options or {}),
            dict(reward_options or {}),
            reward_weights,
            reward_normalize,
            prefer,
            server,
            built,
        )
    except BaseException:
        # A part that failed to build must not leave the ones built before it open.
        _close_now(built[::-1])
        raise


def _close_now(objects: Sequence[Any]) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(aclose_each(objects))
        return
    # Inside a running loop (tpo serve builds its models at start-up): close synchronously where possible.
    for obj in objects:
        close = getattr(obj, "close", None)
        if callable(close):
            try:
                close()
            except Exception as e:
                warnings.warn(f"closing {getattr(obj, 'name', obj)!s} failed: {e}", RuntimeWarning, stacklevel=2)


def _assemble(
    policy_spec: str,
    critic_spec: str | None,
    specs: list[str],
    policy_opts: dict[str, Any],
    critic_opts: dict[str, Any],
    reward_opts: dict[str, Any],
    weights: Sequence[float] | None,
    normalize: str,
    prefer: str | None,
    server: Mapping[str, Any],
    built: list[Any],
) -> Models:
    policy = build_policy(policy_spec, policy_opts, server)
    built.append(policy)
    critic = None
    # A critic with the same spec (and no options of its own) is the policy: never load one model twice.
    if critic_spec and (critic_spec != policy_spec or critic_opts):
        critic = build_policy(critic_spec, critic_opts, server)
        built.append(critic)
    elif critic_opts:
        raise ConfigError("critic options (--critic-option) need a critic spec (--critic)")
    names = [spec.split(":", 1)[0] for spec in specs]
    if prefer is not None and "judge" not in names:
        raise ConfigError("--prefer and --prefer-file set the judge's rubric; add --reward judge to use them")
    if len(specs) == 1 and (weights or normalize != "none"):
        raise ConfigError("--reward-weights and --reward-normalize need more than one --reward")
    rewards = []
    for spec, name, opts in zip(specs, names, _split_reward_options(reward_opts, names), strict=True):
        if name == "judge" and prefer is not None:
            opts["prefer"] = prefer
        if name == "judge" and ":" in spec:
            _forward_server_options(spec.split(":", 1)[1], opts, server)
        elif server:
            _reward_server_options(name, opts, server)
        rewards.append(reward_from_spec(spec, policy=policy, **opts))
        built.append(rewards[-1])
    if len(rewards) == 1:
        return Models(policy, critic, rewards[0])
    from .rewards.combine import WeightedReward  # only needed for several rewards

    return Models(
        policy, critic, WeightedReward(rewards, weights=list(weights) if weights else None, normalize=normalize)
    )


def build_policy(spec: str, options: dict[str, Any], server: Mapping[str, Any]) -> PolicyBackend:
    """A policy backend from its spec and options (``options`` gains the server options it takes).

    Server options (``base_url``, ``api_key_env``, ``ray_address``) go only to backends that
    declare them. ``build_models`` builds the policy and critic with this; ``tpo judge`` its judge.
    """
    _add_server_options(load_plugin(BACKENDS_GROUP, split_spec(spec)[0]), options, server)
    return policy_from_spec(spec, **options)


#: The name ``build_policy`` had before it was public.
_policy = build_policy


def _reward_server_options(name: str, opts: dict[str, Any], server: Mapping[str, Any]) -> None:
    """Server options a reward plugin declares (``--ray-address`` for ``ray:``) reach it as they reach the policy."""
    try:
        cls = load_plugin(REWARDS_GROUP, name)
    except (ConfigError, ImportError):
        return  # a bare URL (https://...) or an unknown name: building the reward says what is wrong
    _add_server_options(cls, opts, server)


def _add_server_options(cls: Any, opts: dict[str, Any], server: Mapping[str, Any]) -> None:
    """The server options ``cls`` declares (``server_options``) that were given, unless ``opts`` has its own."""
    for key in getattr(cls, "server_options", ()):
        if key in server:
            opts.setdefault(key, server[key])


def _forward_server_options(judge_target: str, opts: dict[str, Any], server: Mapping[str, Any]) -> None:
    """Server options also reach a judge on a server (judge:openai:MODEL), as they reach the policy."""
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
        receivers, option = _reward_receivers(key, names)
        if not receivers:
            target = key.partition(".")[0]
            if target.isdigit():
                raise ConfigError(
                    f"--reward-option {key}: there is no reward number {int(target)} (there are {len(names)})"
                )
            raise ConfigError(f"--reward-option {key}: no --reward named {target!r} (rewards: {', '.join(names)})")
        for i in receivers:
            out[i][option] = value
    return out


def _reward_receivers(key: str, names: Sequence[str]) -> tuple[list[int], str]:
    """The rewards (positions in ``names``) a reward option reaches, and the option's name there.

    ``key`` reaches every reward; ``N.key`` reward N (1-based); ``name.key`` every reward of that
    name. None may receive it (a number out of range, a name not there): the caller decides.
    """
    target, dot, option = key.partition(".")
    if not dot:
        return list(range(len(names))), key
    if target.isdigit():
        return ([int(target) - 1] if 1 <= int(target) <= len(names) else []), option
    return [i for i, name in enumerate(names) if name == target], option
