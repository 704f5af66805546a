"""The retry policy shared by the HTTP backends: which statuses, how long a wait, what Retry-After asks."""

from __future__ import annotations

import dataclasses
import random
import time
from email.utils import formatdate
from typing import Any

import httpx
import pytest

from tpo import ConfigError
from tpo._http.retry import RetryPolicy

NOW = 1_700_000_000.0  # a whole second, so that HTTP dates (whole seconds) land exactly


class Extreme(random.Random):
    """Jitter pinned to one end of its range, so that waits are exact."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def policy(**options: Any) -> RetryPolicy:
    return RetryPolicy(**{"rng": random.Random(0), "clock": lambda: NOW, **options})


# ---------------------------------------------------------------------------- what is retried


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504, 507, 520, 599])
def test_busy_or_failing_servers_are_retried(status: int) -> None:
    assert policy().retryable(status)


@pytest.mark.parametrize("status", [200, 301, 400, 401, 403, 404, 413, 422, 501, 505, 600])
def test_the_requests_own_faults_are_not(status: int) -> None:
    assert not policy().retryable(status)


# ---------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("high", "expected"), [(True, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]), (False, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0])]
)
def test_backoff_doubles_up_to_its_cap_with_jitter_in_the_upper_half(high: bool, expected: list[float]) -> None:
    p = policy(backoff_s=1.0, max_backoff_s=10.0, rng=Extreme(high))
    assert [p.delay_s(attempt) for attempt in range(1, 7)] == expected


def test_jitter_is_reproducible_with_a_seed_and_stays_in_range() -> None:
    first = [policy(rng=random.Random(42)).delay_s(a) for a in range(1, 8)]
    again = [policy(rng=random.Random(42)).delay_s(a) for a in range(1, 8)]
    other = [policy(rng=random.Random(43)).delay_s(a) for a in range(1, 8)]
    assert first == again and first != other
    for attempt, delay in enumerate(first, start=1):
        ceiling = min(60.0, 2.0 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling


def test_a_huge_attempt_number_does_not_overflow() -> None:
    assert 15.0 <= policy(max_backoff_s=30.0).delay_s(10_000) <= 30.0
    assert policy(backoff_s=0.0).delay_s(3) == 0.0


# ---------------------------------------------------------------------------- Retry-After in the wait


def test_the_server_wait_wins_over_a_shorter_backoff_with_a_little_jitter_on_top() -> None:
    assert policy(rng=Extreme(False)).delay_s(1, 10.0) == 10.0
    assert policy(rng=Extreme(True)).delay_s(1, 10.0) == 11.0  # at most a tenth, and at most a second, more
    assert policy(rng=Extreme(True)).delay_s(1, 2.0) == pytest.approx(2.2)


def test_a_shorter_server_wait_does_not_shorten_the_backoff() -> None:
    assert policy(rng=Extreme(False), backoff_s=1.0).delay_s(3, 0.1) == 2.0


def test_the_server_wait_is_capped_separately_from_the_backoff() -> None:
    p = policy(rng=Extreme(False), backoff_s=0.001, max_backoff_s=0.005, max_retry_after_s=120.0)
    assert p.delay_s(1, 3600.0) == 120.0  # beyond max_backoff_s, up to max_retry_after_s
    assert p.delay_s(1, 30.0) == 30.0
    assert policy(rng=Extreme(False), max_retry_after_s=0.0).delay_s(2, 3600.0) == 1.0  # 0 ignores the header


@pytest.mark.parametrize("wait", [float("nan"), float("inf"), -5.0, 0.0])
def test_unusable_server_waits_leave_the_backoff(wait: float) -> None:
    assert policy(rng=Extreme(False)).delay_s(2, wait) == 1.0


# ---------------------------------------------------------------------------- reading the headers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, None),
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"Retry-After": "2.5"}, 2.5),  # any case, any number
        ({"retry-after": " 3 "}, 3.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer header wins
        ({"retry-after-ms": "nan", "retry-after": "9"}, 9.0),  # an unusable one falls back
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after": "NaN"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "-4"}, None),
        ({"retry-after-ms": "-4"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": formatdate(NOW - 30, usegmt=True)}, 0.0),  # already past: no wait
        ({"retry-after": formatdate(NOW + 45)}, 45.0),  # "-0000", a date with no zone, is GMT
        ({"retry-after": "Wed, 99 Foo 2024 99:99:99 GMT"}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str] | None, expected: float | None) -> None:
    assert policy().retry_after_s(headers) == expected


def test_retry_after_from_httpx_headers() -> None:
    assert policy().retry_after_s(httpx.Headers({"Retry-After-Ms": "20"})) == 0.02
    assert policy().retry_after_s(httpx.Headers({"RETRY-AFTER": "4"})) == 4.0


def test_the_real_clock_is_the_default() -> None:
    wait = RetryPolicy().retry_after_s({"retry-after": formatdate(time.time() + 60, usegmt=True)})
    assert wait is not None and 50.0 < wait <= 60.0


# ---------------------------------------------------------------------------- the value itself


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"backoff_s": -0.1}, "backoff_s"),
        ({"max_backoff_s": float("nan")}, "max_backoff_s"),
        ({"max_retry_after_s": float("inf")}, "max_retry_after_s"),
    ],
)
def test_bad_values_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RetryPolicy(**options)


def test_the_policy_is_frozen_and_compares_by_its_numbers() -> None:
    p = RetryPolicy(max_retries=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_retries = 3  # type: ignore[misc]
    assert p == RetryPolicy(max_retries=2, rng=random.Random(9)) and p != RetryPolicy(max_retries=3)
    assert "rng" not in repr(p)
