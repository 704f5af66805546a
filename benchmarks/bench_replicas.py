"""Benchmark 7: one run spread over several OpenAI-compatible servers, against one server of the same capacity.

Starts simulated continuous-batching servers (benchmarks/sim_server.py) on loopback and runs
TPO D2-N5 over 1,024 prompts through tpo's OpenAI backend:

* four servers of 16 slots each (``--base-url`` four times: one replica each, requests to
  the one with the fewest sequences in flight);
* one server of 64 slots;
* the four servers again, one of them killed (SIGKILL) when a third of the prompts are done:
  its requests in flight are sent to the other three.

The lower bound on wall time is that of benchmarks/bench_orchestration.py: the busy slot-time
the servers measured ÷ the slots, or the longest prompt's chain of dependent calls if longer.
With a server killed, the bound is the time of the kill plus the work still to do then ÷ the
48 slots left. Targets: the four servers ≤ 1.2 × their bound and within 10% of the one server.

Run: .venv/bin/python benchmarks/bench_replicas.py            (about 4 minutes)
     .venv/bin/python benchmarks/bench_replicas.py --quick    (256 prompts, about 1 minute)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import tpo
from _results import write_section
from bench_orchestration import Server, add_sim_args, chain_s, prompts
from tpo.registry import policy_from_spec
from tpo.testing import FunctionReward


def _servers(count: int, slots: int, args: argparse.Namespace) -> list[Server]:
    out: list[Server] = []
    try:
        for _ in range(count):
            out.append(Server(argparse.Namespace(**{**vars(args), "slots": slots})))
    except BaseException:
        for s in out:
            s.stop()
        raise
    return out


async def run(servers: list[Server], args: argparse.Namespace, *, kill_at: float | None = None) -> dict[str, Any]:
    """TPO D2-N5 through ``servers``; with ``kill_at``, SIGKILL the last one when that share of prompts is done."""
    urls = ",".join(s.base + "/v1" for s in servers)
    per_replica = max(1, args.max_in_flight // len(servers))
    policy = policy_from_spec("openai:sim", base_url=urls, max_concurrency=per_replica)
    reward = FunctionReward(lambda messages, answer: float(sum(map(ord, answer[:64])) % 101))
    engine = tpo.Engine(
        policy,
        reward,
        config=tpo.TPOConfig(width=5, depth=2, max_tokens=args.answer_tokens, max_concurrent_prompts=args.concurrent),
    )
    for s in servers:
        s.reset()
    scale, total_slots = args.time_scale, sum(s.args.slots for s in servers)
    results, killed = [], None
    t0 = time.perf_counter()
    async for r in engine.optimize_many(prompts(args.prompts)):
        results.append(r)
        if kill_at is not None and killed is None and len(results) >= kill_at * args.prompts:
            done_s = sum(s.stats()["busy_slot_s"] for s in servers) / scale
            servers[-1].proc.kill()
            killed = {"at_s": time.perf_counter() - t0, "done_slot_s": done_s}
    wall = time.perf_counter() - t0
    reports = policy.replica_reports() if hasattr(policy, "replica_reports") else []
    await policy.aclose()
    failed = [r for r in results if r.status != "complete"]
    if failed:
        raise RuntimeError(f"{len(failed)} prompts failed, e.g. {failed[0].error}")
    live = servers[:-1] if killed else servers
    busy_s = sum(s.stats()["busy_slot_s"] for s in live) / scale
    chain = max(chain_s(r.usage.prompt_tokens, r.usage.policy_calls, args) for r in results)
    return {
        "servers": len(servers),
        "slots": total_slots,
        "wall_s": wall,
        "busy_slot_s": busy_s,
        "chain_s": chain,
        "bound_s": max(busy_s / total_slots, chain),
        "killed": killed,
        "reports": reports,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1024)
    add_sim_args(ap, time_scale=25.0, slots=False)
    ap.add_argument("--max-in-flight", type=int, default=512, help="sequences in flight, over all replicas")
    ap.add_argument("--concurrent", type=int, default=256, help="prompts in flight")
    ap.add_argument("--quick", action="store_true", help="256 prompts")
    args = ap.parse_args()
    if args.quick:
        args.prompts = 256
    os.environ.setdefault("OPENAI_API_KEY", "sk-simulated")
    rows = []
    for label, count, slots, kill_at in (
        ("4 servers × 16 slots", 4, 16, None),
        ("1 server × 64 slots", 1, 64, None),
        ("4 servers × 16 slots, one killed at 1/3", 4, 16, 1 / 3),
    ):
        servers = _servers(count, slots, args)
        try:
            row = asyncio.run(run(servers, args, kill_at=kill_at))
        finally:
            for s in servers:
                if s.proc.poll() is None:
                    s.stop()
        row["label"] = label
        rows.append(row)
    four, one, killed = rows
    # With a server killed, the work is the clean run's; what was left at the kill had 48 slots.
    k = killed["killed"]
    left_s = max(0.0, four["busy_slot_s"] - k["done_slot_s"])
    killed["bound_s"] = max(k["at_s"] + left_s / (killed["slots"] - 16), killed["chain_s"])
    lines = [
        "| setup | prompts | wall s | bound s | wall ÷ bound | sequences per replica |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shares = ", ".join(f"{x.sequences:,}" for x in r["reports"]) or "—"
        lines.append(
            f"| {r['label']} | {args.prompts:,} | {r['wall_s']:.1f} | {r['bound_s']:.1f} | "
            f"{r['wall_s'] / r['bound_s']:.2f} | {shares} |"
        )
        print(lines[-1], flush=True)
    ratio4, ratio1 = four["wall_s"] / four["bound_s"], one["wall_s"] / one["bound_s"]
    gap = four["wall_s"] / one["wall_s"] - 1
    verdicts = [
        f"- four servers: {ratio4:.2f} × their bound (target ≤ 1.2): {'met' if ratio4 <= 1.2 else 'MISSED'}",
        f"- four servers against one of the same capacity: {gap:+.1%} wall time (target within 10%): "
        f"{'met' if abs(gap) <= 0.10 else 'MISSED'}; the one server: {ratio1:.2f} × its bound",
        f"- one server killed after {k['at_s']:.1f} s: every prompt completed, in "
        f"{killed['wall_s'] / killed['bound_s']:.2f} × the bound of the capacity left",
        f"- simulated servers: {args.decode_rate:g} tokens/s per sequence, prefill {args.prefill_rate:g} tokens/s, "
        f"{args.answer_tokens}-token answers, time scale {args.time_scale:g} (wall and bounds in real seconds); "
        f"{args.concurrent} prompts in flight, at most {args.max_in_flight} sequences in flight over all replicas.",
    ]
    print("\n".join(verdicts))
    write_section("replicas", "7. Several servers behind one run", "\n".join(lines) + "\n\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
