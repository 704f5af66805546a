"""A reward function for ``tpo batch --reward python:tests/plugin_fixture/reward.py:score`` in tests."""

from __future__ import annotations

import hashlib
from typing import Any


def score(messages: list[dict[str, Any]], answer: str) -> float:
    """A score that looks random across answers but is fixed for each."""
    return int(hashlib.sha256(answer.encode()).hexdigest()[:6], 16) / 0xFFFFFF
