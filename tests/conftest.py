"""Shared helpers for the tests: replies and rewards that depend only on their input, and the real-request guard.

Real model requests are forbidden in every test (``tpo.testing.forbid_real_requests``), so a
test that meant to use a double cannot reach a real model by mistake. Tests marked
``real_model`` or ``slow`` may make them, and so may a fast test that asks for the
``allow_real_requests`` fixture (a tiny model built in the test, a server on loopback).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tpo import GenerationRequest, Message
from tpo.testing import FunctionReward, ScriptedPolicy, forbid_real_requests

TAG = "improved_reply"


def pure_reply(request: GenerationRequest) -> list[str]:
    """Replies that depend only on the request (its seed, step and purpose), never on call order.

    Two runs with the same seed, or a run and its resumption, therefore see the same replies.
    """
    seed = request.sampling.seed
    if request.purpose == "sample":
        return [f"Answer {i} for {request.prompt_id} (seed {seed})" for i in range(request.n)]
    if request.purpose == "loss":
        return [f"Critique at step {request.step} (seed {seed})"]
    if request.purpose == "gradient":
        return [f"Feedback at step {request.step} (seed {seed})"]
    if request.purpose == "update":
        return [f"<{TAG}>Rewrite {i} at step {request.step} (seed {seed})</{TAG}>" for i in range(request.n)]
    return ["?"] * request.n


def hash_score(messages: Sequence[Message], answer: str) -> float:
    """A deterministic score in [0, 100) that looks random across answers."""
    return int(hashlib.sha256(answer.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) % 10_000 / 100


def number_in(answer: str) -> int:
    """The first integer in an answer (the scripted replies number their answers)."""
    m = re.search(r"-?\d+", answer)
    if m is None:
        raise ValueError(f"no number in {answer!r}")
    return int(m.group())


def strip_timings(data: Any) -> Any:
    """A result's JSON form without wall times, which differ between otherwise identical runs."""
    if isinstance(data, dict):
        return {k: strip_timings(v) for k, v in data.items() if k != "wall_time_s"}
    if isinstance(data, list):
        return [strip_timings(v) for v in data]
    return data


@pytest.fixture(autouse=True)
def _guard_real_requests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Forbid real model requests unless the test is marked ``real_model`` or ``slow``, or allows them."""
    node = request.node
    allowed = (
        node.get_closest_marker("real_model") is not None
        or node.get_closest_marker("slow") is not None
        or "allow_real_requests" in request.fixturenames
    )
    with forbid_real_requests(not allowed):
        yield


@pytest.fixture
def allow_real_requests() -> None:
    """Ask for this in a fast test that uses a real backend on purpose (a tiny model, a loopback server)."""


@pytest.fixture
def policy() -> ScriptedPolicy:
    """The default scripted policy: numbered answers, critiques, feedback and tagged rewrites."""
    return ScriptedPolicy()


@pytest.fixture
def reward() -> FunctionReward:
    """A reward equal to the first number in the answer."""
    return FunctionReward(lambda messages, answer: float(number_in(answer)), name="number")


def make_reward(fn: Callable[[str], Any], **kwargs: Any) -> FunctionReward:
    """A FunctionReward from a function of the answer alone."""
    return FunctionReward(lambda messages, answer: fn(answer), **kwargs)
