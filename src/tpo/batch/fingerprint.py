"""The run's fingerprint: what its results depend on, with secrets masked, and a readable list of what changed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..config import TPOConfig
from ..errors import ConfigError
from ..models import _reward_receivers
from ..registry import BACKENDS_GROUP, REWARDS_GROUP, load_plugin, split_spec


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            # An empty mapping is no option at all: {} and a missing key are the same configuration.
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shown(flat: Mapping[str, Any], key: str) -> str:
    return _short(flat[key]) if key in flat else "<unset>"


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        if key.endswith("sha256"):
            what = {"input": "the input rows", "method": "the prompt templates"}.get(key.split(".")[0], "its content")
            out.append(f"{key}: {what} changed")
        else:
            out.append(f"{key}: {_shown(a, key)} → {_shown(b, key)}")
    return out


def _method_fingerprint(config: TPOConfig) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("max_concurrent_prompts", None)  # how many run at once does not change any result
    for name in ("policy_params", "critic_params"):
        # Fingerprinted only when set (they change the FLOPs recorded), so runs begun before they existed resume.
        if data.get(name) is None:
            data.pop(name, None)
    prompts = data.pop("prompts", None)
    data["prompts_sha256"] = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    return data


def result_options(models: Mapping[str, Any]) -> dict[str, Any]:
    """``models`` without the options that cannot change a result, for the fingerprint.

    ``models`` is described as ``tpo batch`` does it: specs under ``policy``, ``critic`` and
    ``reward`` (one spec or a list) and their options under ``policy_options``,
    ``critic_options`` and ``reward_options`` (keys may be prefixed with a reward's name or
    1-based position, as ``tpo.build_models`` takes them; a judge's ``backend_options`` go
    to its backend). An option is left out when the plugin receiving it declares it
    ``affects_results=False`` (``tpo.options.option``): timeouts, retries, concurrency, the
    server's address. Options of a plugin that cannot be loaded are all kept. Anything else
    in ``models`` is returned as it is.
    """
    out = dict(models)
    policy = models.get("policy")
    critic = models.get("critic") or policy
    for key, spec in (("policy_options", policy), ("critic_options", critic)):
        options = models.get(key)
        if isinstance(options, Mapping) and isinstance(spec, str):
            out[key] = _for_plugin(BACKENDS_GROUP, spec, options)
    rewards = models.get("reward")
    specs = [rewards] if isinstance(rewards, str) else rewards
    options = models.get("reward_options")
    if isinstance(options, Mapping) and isinstance(specs, list) and all(isinstance(r, str) for r in specs):
        out["reward_options"] = _for_rewards(specs, options)
    return out


def _not_affecting_results(group: str, spec: str) -> frozenset[str]:
    try:
        cls = load_plugin(group, split_spec(spec)[0])
    except (ConfigError, ImportError):
        return frozenset()
    options_class = getattr(cls, "options_class", None)
    declared = getattr(options_class, "not_affecting_results", None)
    return declared() if callable(declared) else frozenset()


def _for_plugin(group: str, spec: str, options: Mapping[str, Any]) -> dict[str, Any]:
    neutral = _not_affecting_results(group, spec)
    out = {k: v for k, v in options.items() if k not in neutral}
    name, target = split_spec(spec) if spec.strip() else ("", "")
    judge_backend = target.strip() if group == REWARDS_GROUP and name == "judge" else ""
    if judge_backend and isinstance(out.get("backend_options"), Mapping):
        out["backend_options"] = _for_plugin(BACKENDS_GROUP, target.strip(), out["backend_options"])
    return out


def _for_rewards(specs: list[str], options: Mapping[str, Any]) -> dict[str, Any]:
    """Reward options without those that no reward receiving them lets change a result."""
    names = [split_spec(s)[0] if s.strip() else "" for s in specs]
    out: dict[str, Any] = {}
    for key, value in options.items():
        receivers, name = _reward_receivers(str(key), names)
        kept = [_for_plugin(REWARDS_GROUP, specs[i], {name: value}) for i in receivers]
        if not receivers or any(name in k for k in kept):
            # A judge's backend_options come back filtered for its backend.
            filtered = next((k[name] for k in kept if name in k), value)
            out[key] = filtered
    return out
