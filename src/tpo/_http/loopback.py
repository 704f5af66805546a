"""Which HTTP requests the real-request guard lets through: those that cannot reach a real hosted model.

``tpo._guard`` forbids real model requests in a test suite that forgot its test doubles.
Two kinds of request are exempt, always:

* requests to this machine's loopback addresses (``127.0.0.0/8``, ``::1``, ``localhost``):
  a test talks there to a fake server it started itself, never to a hosted model, and
  tests that run a real model server on loopback are marked ``slow``/``real_model`` anyway;
* requests into an ``httpx.MockTransport`` (or httpx2's), which send nothing at all.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["exempt_from_guard", "is_loopback_host"]


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` (a name or an IP address, IPv6 with or without brackets) is this machine."""
    if not host:
        return False
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def exempt_from_guard(url: str, transport: object | None = None) -> bool:
    """Whether requests to ``url`` through ``transport`` (None: the network) skip the guard."""
    if transport is not None and any(
        cls.__name__ == "MockTransport" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        for cls in type(transport).__mro__
    ):
        return True
    try:
        return is_loopback_host(urlsplit(url).hostname)
    except ValueError:  # a malformed URL fails later, with a better message
        return False
