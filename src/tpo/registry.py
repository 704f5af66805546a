"""Finds policy backends and reward models by name, through entry points, and builds them from specs.

A spec is ``NAME:TARGET`` (``openai:gpt-4o-mini``, ``hf:./my-rm``, ``llamacpp`` alone for the
bundled model). ``NAME`` is an entry point in the group ``tpo.backends`` (policies) or
``tpo.rewards`` (rewards); the built-in ones are registered the same way as third-party
plugins. An entry point names a class with a ``from_spec`` class method::

    class MyBackend:
        name: str
        batching = False
        supports_n = True
        supports_logprobs = False
        description = "one line for `tpo backends`"

        @classmethod
        def from_spec(cls, target: str, **options) -> "MyBackend": ...

Options a class does not know must raise ``ConfigError``. The way to get that, and the same
messages as the built-in plugins, is to declare the options once as a ``tpo.options.PluginOptions``
dataclass, name it in the class attribute ``options_class`` (``tpo backends --verbose`` lists
it) and check what ``from_spec`` receives with ``options_class.from_options(options)``.
``take_options`` is the older, undeclared way: a mapping of names to defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from .errors import ConfigError, MissingDependencyError
from .options import OptionInfo, describe_options, unknown_options_error
from .protocols import PolicyBackend, RewardModel

__all__ = [
    "BACKENDS_GROUP",
    "REWARDS_GROUP",
    "PluginInfo",
    "list_plugins",
    "load_plugin",
    "policy_from_spec",
    "reward_from_spec",
    "split_spec",
    "take_options",
]

BACKENDS_GROUP = "tpo.backends"
REWARDS_GROUP = "tpo.rewards"


@dataclass(frozen=True)
class PluginInfo:
    """What ``tpo backends`` shows for one installed plugin."""

    name: str
    group: str
    value: str
    description: str
    capabilities: Mapping[str, Any]
    error: str | None = None
    #: The options the plugin declares (its ``options_class``); empty when it declares none.
    options: tuple[OptionInfo, ...] = ()


def split_spec(spec: str) -> tuple[str, str]:
    """``"openai:gpt-4o"`` → ``("openai", "gpt-4o")``; a bare name has an empty target.

    A Windows drive letter or a path is not taken for a name: ``C:\\m.gguf`` and
    ``./x:y`` have no name part.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("an empty backend or reward spec; expected NAME or NAME:TARGET")
    name, sep, target = spec.partition(":")
    if not sep:
        return name, ""
    if len(name) == 1 or "/" in name or "\\" in name or "." in name:
        raise ConfigError(f"spec {spec!r} has no backend name; write NAME:TARGET, e.g. llamacpp:{spec}")
    return name, target


def _group(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def load_plugin(group: str, name: str) -> Any:
    """The class registered under ``name`` in ``group``; ``ConfigError`` lists the known names."""
    eps = _group(group)
    if name not in eps:
        kind = "policy backend" if group == BACKENDS_GROUP else "reward"
        known = ", ".join(sorted(eps)) or "none"
        raise ConfigError(f"unknown {kind} {name!r}; installed: {known}")
    try:
        return eps[name].load()
    except ImportError as e:
        # A plugin whose own module cannot be imported (a broken install, a missing dependency).
        if isinstance(e, MissingDependencyError):
            raise
        raise ConfigError(f"the plugin {name!r} ({eps[name].value}) in {group} cannot be loaded: {e}") from e


def policy_from_spec(spec: str, **options: Any) -> PolicyBackend:
    """Build a policy backend from ``NAME[:TARGET]`` and its options."""
    name, target = split_spec(spec)
    cls = load_plugin(BACKENDS_GROUP, name)
    backend: PolicyBackend = cls.from_spec(target, **options)
    return backend


def reward_from_spec(spec: str, *, policy: PolicyBackend | None = None, **options: Any) -> RewardModel:
    """Build a reward model from ``NAME[:TARGET]``; ``policy`` is offered to rewards that use one (the judge)."""
    name, target = split_spec(spec)
    if name in ("http", "https") and target.startswith("//"):
        name, target = "http", f"{name}:{target}"  # a bare URL: --reward https://host/pooling
    cls = load_plugin(REWARDS_GROUP, name)
    if getattr(cls, "uses_policy", False):
        options = {**options, "policy": policy}
    reward: RewardModel = cls.from_spec(target, **options)
    return reward


def take_options(options: Mapping[str, Any], allowed: Mapping[str, Any], *, owner: str) -> dict[str, Any]:
    """Options for ``owner`` with defaults from ``allowed``; unknown names raise ``ConfigError``.

    Options whose value is ``None`` count as not given. Values are not checked: a
    ``tpo.options.PluginOptions`` declaration checks them too.
    """
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise unknown_options_error(unknown, list(allowed), owner=owner)
    return {**allowed, **given}


_CAPABILITIES = ("batching", "supports_n", "supports_logprobs", "counts_tokens", "knows_context_window")


def list_plugins(group: str) -> list[PluginInfo]:
    """Every plugin installed in ``group``, with its capabilities (or why it cannot be loaded)."""
    out = []
    for name, ep in sorted(_group(group).items()):
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must not break the listing
            out.append(PluginInfo(name, group, ep.value, "", {}, error=f"{type(e).__name__}: {e}"))
            continue
        doc = getattr(cls, "description", None) or (cls.__doc__ or "").strip().splitlines() or [""]
        description = doc if isinstance(doc, str) else doc[0]
        caps = {c: getattr(cls, c) for c in _CAPABILITIES if hasattr(cls, c)}
        out.append(PluginInfo(name, group, ep.value, description, caps, options=_declared_options(cls)))
    return out


def _declared_options(cls: Any) -> tuple[OptionInfo, ...]:
    """The options a plugin declares through ``options_class``; none when it declares none (or not as a dataclass)."""
    declared = getattr(cls, "options_class", None)
    try:
        return describe_options(declared) if isinstance(declared, type) else ()
    except TypeError:  # not a dataclass
        return ()
