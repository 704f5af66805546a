"""API keys: read from the environment, compared in constant time, never logged or echoed; and the bind rule."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from .._http.loopback import is_loopback_host
from ..errors import ConfigError
from ._errors import APIError

#: Paths anyone may call: a load balancer's health check carries no key.
OPEN_PATHS = frozenset({"/health"})


def keys_from_env(name: str) -> tuple[str, ...]:
    """The keys in environment variable ``name`` (comma-separated); ``ConfigError`` when it is unset or holds none."""
    raw = os.environ.get(name)
    if raw is None:
        raise ConfigError(f"--auth-keys-env {name}: the environment variable {name} is not set")
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        raise ConfigError(f"--auth-keys-env {name}: the environment variable {name} holds no key")
    for key in keys:
        if len(key) < 8:
            raise ConfigError(f"--auth-keys-env {name}: a key is shorter than 8 characters; use long random keys")
    return keys


def check_bind(host: str, keys: Sequence[str], *, no_auth: bool) -> None:
    """Refuse to listen beyond loopback without keys unless ``no_auth`` says so on purpose."""
    if no_auth and keys:
        raise ConfigError("--no-auth and --auth-keys-env contradict each other; give one")
    if not keys and not no_auth and not is_loopback_host(host):
        raise ConfigError(
            f"refusing to listen on {host} without API keys: anyone who can reach it could spend your models. "
            "Give --auth-keys-env NAME (keys in that environment variable, comma-separated), "
            "or --no-auth if the network is yours alone"
        )


class KeyCheck:
    """Accepts a bearer key when it equals one of ``keys``; every key is compared, each in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        keys = tuple(keys)
        if any(not isinstance(k, str) or len(k.strip()) < 8 for k in keys):
            raise ConfigError("every API key the server accepts must be a string of at least 8 characters")
        self._keys = tuple(k.strip().encode("utf-8") for k in keys)

    def __repr__(self) -> str:
        return f"KeyCheck({len(self._keys)} keys)"

    def accepts(self, given: bytes) -> bool:
        if not given:
            return False
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(key, given)
        return ok


class AuthMiddleware:
    """Answers 401 (OpenAI error shape) to a request without a valid ``Authorization: Bearer`` key."""

    def __init__(self, app: ASGIApp, check: KeyCheck) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if not header:
            message, code = "no API key: send it as 'Authorization: Bearer KEY'", "missing_api_key"
        elif scheme.lower() != b"bearer" or not self.check.accepts(token.strip()):
            message, code = "invalid API key", "invalid_api_key"  # the key itself is never echoed
        else:
            await self.app(scope, receive, send)
            return
        await APIError(401, message, code=code, headers={"www-authenticate": "Bearer"}).send(send)
