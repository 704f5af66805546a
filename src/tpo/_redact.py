"""Secret masking: the values of secret-named options, and credentials inside URLs, never reach a file or a message."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

__all__ = ["display_url", "is_secret_name", "mask_secrets_in_text", "mask_url", "redact", "url_secrets"]

#: Option names whose values are secrets, masked in fingerprint.json and config.json. Whole names
#: only (lower-cased, ``-`` read as ``_``): ``max_tokens`` or ``tokenizer`` change results and must
#: stay visible to the fingerprint.
_SECRET_NAMES = frozenset(
    {
        "access_token",
        "api_key",
        "api_token",
        "apikey",
        "auth",
        "auth_token",
        "authorization",
        "bearer",
        "bearer_token",
        "client_secret",
        "cookie",
        "credential",
        "credentials",
        "hf_token",
        "id_token",
        "passphrase",
        "passwd",
        "password",
        "private_key",
        "proxy_authorization",
        "refresh_token",
        "secret",
        "secret_key",
        "session_token",
        "token",
    }
)
#: Endings that make a name a secret whatever comes before (``openai_api_key``, ``db_password``).
_SECRET_SUFFIXES = (
    "_api_key",
    "_apikey",
    "_api_token",
    "_access_token",
    "_auth_token",
    "_password",
    "_passwd",
    "_secret",
    "_secret_key",
    "_private_key",
    "_credentials",
)
#: Query parameters that carry a secret in a URL even though their names are not secret-named options:
#: ``?key=`` (Google), ``?sig=``/``?signature=`` (signed URLs, Azure SAS), ``?code=`` (Azure Functions).
_SECRET_QUERY_NAMES = frozenset({"key", "sig", "signature", "code"})
#: The user information of a URL: ``https://user:PASSWORD@host`` (the user stays readable) or a lone
#: ``https://TOKEN@host`` (masked whole: such a "user" is usually the credential).
_URL_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:?#'\"<>]*)(?P<password>:[^/@\s?#'\"<>]*)?@"
)
#: One ``name=value`` pair of a query string; the value ends where the URL does in running text.
_URL_QUERY_PARAM = re.compile(r"([?&;])([^=&#\s?'\"<>]+)=([^&#\s'\"<>)\]]*)")


def is_secret_name(name: str) -> bool:
    """Whether an option or parameter called ``name`` holds a secret."""
    key = name.lower().replace("-", "_")
    return key in _SECRET_NAMES or key.endswith(_SECRET_SUFFIXES)


def redact(value: Any) -> Any:
    """``value`` as JSON data, with the values of secret-named keys masked and URL credentials hidden."""
    if isinstance(value, Mapping):
        return {str(k): "***" if is_secret_name(str(k)) and v else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return mask_secrets_in_text(value)
    if value is None or isinstance(value, (int, float, bool)):
        return value
    return str(value)


def _is_secret_query_name(name: str) -> bool:
    key = unquote_plus(name).strip().lower().replace("-", "_")
    return is_secret_name(key) or key in _SECRET_QUERY_NAMES


def mask_secrets_in_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with the credentials of every URL in it masked: passwords (``user:***@``), lone tokens
    (``***@``) and the values of key-like query parameters (``?api_key=***``, ``&sig=***``).

    For any message that may name a URL: an error, a log line, a saved option. ``secrets``
    (an API key, ``url_secrets(base_url)``) are masked wherever they occur, as a server may
    echo them in its own words; values shorter than 4 characters are left, as masking them
    would garble the text without hiding anything.
    """
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    if "://" not in text:
        return text

    def userinfo(m: re.Match[str]) -> str:
        if m["password"] is not None:
            return f"{m['scheme']}{m['user']}:***@"
        return f"{m['scheme']}***@" if m["user"] else m[0]

    text = _URL_USERINFO.sub(userinfo, text)
    return _URL_QUERY_PARAM.sub(lambda m: f"{m[1]}{m[2]}=***" if _is_secret_query_name(m[2]) and m[3] else m[0], text)


def mask_url(url: str) -> str:
    """The URL as it may be shown: its password, a lone token and key-like query values masked."""
    return mask_secrets_in_text(url) if "://" in url else mask_secrets_in_text("http://" + url)[len("http://") :]


def display_url(url: str) -> str:
    """The URL as names and messages show a server: without its ``user:password@`` part, the rest as ``mask_url``.

    Nothing else of the URL changes. One that cannot be parsed is only masked.
    """
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return mask_url(url)
    if "@" in netloc:
        # The first occurrence is the URL's own authority: nothing before it (the scheme and "//") holds an "@".
        url = url.replace(netloc, netloc.rsplit("@", 1)[1], 1)
    return mask_url(url)


def url_secrets(url: str) -> list[str]:
    """The secret values inside ``url`` (password, lone token, key-like query values), decoded and raw.

    A client masks these wherever they occur in text it did not write itself (a server that
    echoes the request URL or its query in an error body).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    if parts.password:
        found.append(parts.password)
    elif parts.username and "@" in parts.netloc:
        found.append(parts.username)
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and _is_secret_query_name(name):
            found.append(value)
    for m in _URL_QUERY_PARAM.finditer("?" + parts.query):
        if m[3] and _is_secret_query_name(m[2]):
            found.append(m[3])
    return sorted({s for s in found if s}, key=len, reverse=True)
