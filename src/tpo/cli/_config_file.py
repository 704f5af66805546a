"""The ``--config FILE`` option: a YAML or TOML file of option values that become the command's defaults.

Keys are the long option names, with ``-`` or ``_`` (``prompt-field`` or ``prompt_field``), or
the argument names (``input``); the command line overrides the file. Lists give repeatable
options (``reward: [hf:..., judge]``); a mapping gives ``KEY=VALUE`` options
(``policy-option: {n_ctx: 4096}``); a ``no-`` name of a flag sets it off.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import MissingDependencyError

__all__ = ["config_file_option", "load_config_file"]

F = TypeVar("F", bound=Callable[..., Any])


def load_config_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of a ``.yaml``/``.yml`` or ``.toml`` file; ``click.BadParameter`` when it is not one."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}") from e
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise click.BadParameter(f"{path} is not valid TOML: {e}") from e
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml  # optional: part of the data extra
        except ImportError as e:
            raise MissingDependencyError("pyyaml", "data", "Reading a YAML --config file") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise click.BadParameter(f"{path} is not valid YAML: {e}") from e
        data = {} if data is None else data
    else:
        raise click.BadParameter(f"{path}: expected a .yaml, .yml or .toml file")
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _names(command: click.Command) -> dict[str, tuple[click.Parameter, bool]]:
    """Every accepted key → (parameter, whether the key means the flag's negation)."""
    out: dict[str, tuple[click.Parameter, bool]] = {}
    for param in command.params:
        if param.name is None or param.name == "config_file":
            continue
        out[param.name.replace("-", "_")] = (param, False)
        for opt in param.opts:
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = (param, False)
        for opt in getattr(param, "secondary_opts", ()):
            if opt.startswith("--"):
                out[opt[2:].replace("-", "_")] = (param, True)
        if isinstance(param, click.Argument):
            out[(param.human_readable_name or param.name).lower().replace("-", "_")] = (param, False)
    return out


def _value(param: click.Parameter, value: Any, negate: bool, key: str, source: Path) -> Any:
    if negate:
        if not isinstance(value, bool):
            raise click.BadParameter(f"{source}: {key!r} takes true or false, not {value!r}")
        return not value
    multiple = getattr(param, "multiple", False) or param.nargs == -1
    if isinstance(value, Mapping):
        if not multiple:
            raise click.BadParameter(f"{source}: {key!r} takes a single value, not a mapping")
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
    if multiple:
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)):
        raise click.BadParameter(f"{source}: {key!r} takes a single value, not a list")
    return value


def _apply(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is None:
        return None
    names = _names(ctx.command)
    defaults: dict[str, Any] = {}
    try:
        data = load_config_file(value)
    except MissingDependencyError as e:  # raised while parsing, before the command's own error handling
        raise click.BadParameter(str(e), ctx=ctx, param=param) from e
    for key, raw in data.items():
        found = names.get(str(key).replace("-", "_"))
        if found is None:
            known = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise click.BadParameter(f"{value}: unknown option {key!r}; known: {known}", ctx=ctx, param=param)
        target, negate = found
        if raw is None:
            continue
        try:
            defaults[target.name or ""] = _value(target, raw, negate, str(key), value)
        except click.BadParameter as e:
            e.ctx, e.param = ctx, param
            raise
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_file_option(f: F) -> F:
    """Add ``--config FILE``: its values become defaults, so any option on the command line wins."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        is_eager=True,
        expose_value=True,
        callback=_apply,
        help="A YAML or TOML file of option values (same names as the options); the command line overrides it.",
    )(f)
