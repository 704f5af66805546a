"""Benchmark 6: what the ``ray:`` wrapper costs per call, and how throughput grows with replicas.

On a local Ray instance (``ray.init(num_cpus=2)``), with the ``fixed`` policy backend of
``benchmarks/ray_fixture`` (a set service time per call, one call at a time, like a saturated
GPU), found by the actors through ``runtime_env``:

* **Overhead per call**: the same backend with no service time, in this process and as one
  ``ray:`` replica, called with batches of 1, 16 and 256 requests (a batching backend) and
  with single requests (a non-batching one): the extra time per call is the wrapper's cost
  (Ray's round trip, shipping the requests and the answers, cutting the batch).
* **Throughput with 1, 2 and 4 replicas**: a non-batching backend taking ``--service-s`` per
  call, sent ``--requests`` requests at once (each goes to the replica with the fewest in
  flight), and a batching backend taking ``--batch-service-s`` per request of a call, given
  ``--batches`` batches of 256 one after another (each batch cut into chunks for the
  replicas). Ideal time = the work ÷ the replicas; target: throughput ≥ 0.85 × linear.

Not loopback-only: Ray's GCS server and raylet listen on every interface (``*:PORT``), and
``ray.init`` has no option to bind them to 127.0.0.1; Ray's token authentication
(``RAY_AUTH_MODE=token``, Ray 2.52 and later: every external API and internal call must carry
a shared token) is what limits who can use those ports.

Run: .venv/bin/python benchmarks/bench_ray.py     (about 2 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import tpo
from _results import write_section
from tpo.registry import policy_from_spec

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "ray_fixture"
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(FIXTURE)}}
#: Replicas hold the CPUs they ask for; a quarter each lets eight share the instance's two.
CPUS_PER_REPLICA = 0.25


def requests(n: int, tag: str) -> list[tpo.GenerationRequest]:
    return [
        tpo.GenerationRequest(
            (tpo.Message("user", f"Question {tag}-{i}: explain how a heat pump works."),),
            n=1,
            sampling=tpo.SamplingParams(seed=i, max_tokens=64),
            purpose="sample",
            prompt_id=f"{tag}{i}",
        )
        for i in range(n)
    ]


def build(replicas: int | None, **options: Any) -> Any:
    """The ``fixed`` backend in this process (``replicas=None``) or as ``ray:`` replicas."""
    if replicas is None:
        return policy_from_spec("fixed", **options)
    return policy_from_spec(
        "ray:fixed", replicas=replicas, num_cpus=CPUS_PER_REPLICA, runtime_env=RUNTIME_ENV, **options
    )


async def per_call_s(policy: Any, batch: int, calls: int) -> float:
    """The median time of one ``generate`` call of ``batch`` requests (after a warm-up call)."""
    await policy.generate(requests(batch, "warm"))
    times = []
    for c in range(calls):
        reqs = requests(batch, f"c{c}-")
        t0 = time.perf_counter()
        await policy.generate(reqs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def overhead_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for batching, sizes in ((True, (1, 16, 256)), (False, (1,))):
        local = build(None, service_s=0.0, batching=batching)
        remote = build(1, service_s=0.0, batching=batching)
        try:
            for size in sizes:
                a = await per_call_s(local, size, args.calls)
                b = await per_call_s(remote, size, args.calls)
                rows.append(
                    {
                        "batching": batching,
                        "batch": size,
                        "local_ms": a * 1e3,
                        "ray_ms": b * 1e3,
                        "overhead_ms": (b - a) * 1e3,
                        "per_request_us": (b - a) / size * 1e6,
                    }
                )
                print(
                    f"{'batching' if batching else 'single  '} batch {size:>3}: in-process {a * 1e3:7.3f} ms, "
                    f"ray {b * 1e3:7.3f} ms per call",
                    flush=True,
                )
        finally:
            await remote.aclose()
    return rows


async def throughput_row(replicas: int, batching: bool, args: argparse.Namespace) -> dict[str, Any]:
    if batching:
        policy = build(replicas, service_s=args.batch_service_s, batching=True)
        work = [requests(256, f"b{b}-") for b in range(args.batches)]
        ideal = args.batches * 256 * args.batch_service_s / replicas
    else:
        policy = build(replicas, service_s=args.service_s, batching=False)
        work = [requests(args.requests, "s")]
        ideal = args.requests * args.service_s / replicas
    try:
        await policy.generate(requests(replicas, "warm"))
        t0 = time.perf_counter()
        for batch in work:
            if batching:
                await policy.generate(batch)
            else:  # as the engine calls a non-batching backend: one request per call, all at once
                await asyncio.gather(*(policy.generate([r]) for r in batch))
        wall = time.perf_counter() - t0
        shares = [r.requests for r in policy.replica_reports()]
    finally:
        await policy.aclose()
    row = {
        "replicas": replicas,
        "batching": batching,
        "wall_s": wall,
        "ideal_s": ideal,
        "efficiency": ideal / wall,
        "shares": shares,
    }
    print(
        f"{'batching' if batching else 'single  '} {replicas} replica(s): {wall:6.2f} s, ideal {ideal:6.2f} s, "
        f"{ideal / wall:.0%} of linear, requests per replica {shares}",
        flush=True,
    )
    return row


async def main_async(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    overhead = await overhead_rows(args)
    throughput = []
    for batching in (False, True):
        for replicas in (1, 2, 4):
            throughput.append(await throughput_row(replicas, batching, args))
    return overhead, throughput


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=60, help="calls timed per batch size (median taken)")
    ap.add_argument("--service-s", type=float, default=0.05, help="seconds per call of the non-batching backend")
    ap.add_argument("--requests", type=int, default=240, help="requests sent at once to the non-batching backend")
    ap.add_argument("--batch-service-s", type=float, default=0.005, help="seconds per request of a batching call")
    ap.add_argument("--batches", type=int, default=4, help="batches of 256 for the batching backend")
    args = ap.parse_args()
    sys.path.insert(0, str(FIXTURE))  # where importlib.metadata finds the fixed backend in this process
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        overhead, throughput = asyncio.run(main_async(args))
    finally:
        ray.shutdown()

    lines = [
        f"**Overhead per call** (no service time; median of {args.calls} calls):",
        "",
        "| backend | requests per call | in-process ms | ray: (1 replica) ms | overhead ms per call | per request µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in overhead:
        lines.append(
            f"| {'batching' if r['batching'] else 'non-batching'} | {r['batch']} | {r['local_ms']:.3f} | "
            f"{r['ray_ms']:.3f} | {r['overhead_ms']:.2f} | {r['per_request_us']:.0f} |"
        )
    lines += [
        "",
        "**Throughput against replicas** (ideal = the work ÷ the replicas):",
        "",
        "| backend | replicas | wall s | ideal s | throughput ÷ linear | requests per replica |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in throughput:
        if r["batching"]:
            kind = f"batching, {args.batch_service_s * 1e3:g} ms per request, {args.batches} batches of 256"
        else:
            kind = f"non-batching, {args.service_s * 1e3:g} ms per call, {args.requests} requests at once"
        lines.append(
            f"| {kind} | {r['replicas']} | {r['wall_s']:.2f} | {r['ideal_s']:.2f} | {r['efficiency']:.2f} | "
            f"{', '.join(map(str, r['shares']))} |"
        )
    worst = min(r["efficiency"] for r in throughput)
    verdicts = [
        f"- throughput with 1, 2 and 4 replicas is at least {worst:.2f} × linear (target ≥ 0.85): "
        f"{'met' if worst >= 0.85 else 'MISSED'}",
        f"- the wrapper costs {max(r['overhead_ms'] for r in overhead if r['batch'] <= 16):.2f} ms per call at most "
        "for "
        f"small calls, and {next(r['overhead_ms'] for r in overhead if r['batch'] == 256):.2f} ms for 256 requests "
        "(shipping them and their answers between processes)",
        "- a local Ray instance on this machine; replicas are processes on the same 2 cores, so the figures include "
        "their share of the CPU; on a cluster each replica has a node's GPUs to itself.",
    ]
    body = "\n".join(lines) + "\n\n" + "\n".join(verdicts)
    print("\n".join(verdicts))
    write_section("ray", "6. Ray replicas: overhead and scaling", body)


if __name__ == "__main__":
    main()
