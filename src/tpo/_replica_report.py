"""What a model spread over replicas (servers or Ray actors) reports of each, for ``tpo run`` and ``tpo batch``.

A policy, critic or reward that stands for several replicas has a method
``replica_reports() -> list[ReplicaReport]``; the commands show one line per replica after
a run: where it is, how much work it did, and why it was set aside if it was.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReplicaReport", "describe_replicas"]


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's share of a run so far."""

    #: Where it is: a server's URL (credentials masked) or a Ray actor's host and process.
    label: str
    #: ``up``, ``cooling off`` (set aside after failures, probed again later), ``restarting`` or ``dead``.
    state: str
    #: Requests it completed (a generation request for ``n`` answers counts once).
    requests: int
    #: Sequences it produced (``n`` per generation request; one per score).
    sequences: int
    #: Calls or attempts that failed on it (and were sent to another replica, or retried).
    failures: int = 0
    #: The last failure, for the message when no replica is left.
    last_error: str | None = None


def describe_replicas(what: str, reports: list[ReplicaReport]) -> list[str]:
    """Lines such as ``policy replica http://a:8000/v1: 412 requests, 2,060 sequences (52%), up``."""
    total = sum(r.sequences for r in reports) or 1
    lines = []
    for r in reports:
        line = (
            f"{what} replica {r.label}: {r.requests:,} requests, {r.sequences:,} sequences "
            f"({r.sequences / total:.0%}), {r.state}"
        )
        if r.failures:
            line += f"; {r.failures} failure{'s' * (r.failures != 1)}"
            if r.last_error:
                line += f", the last: {r.last_error}"
        lines.append(line)
    return lines
