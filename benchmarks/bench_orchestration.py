"""Benchmark 1: how close tpo gets to the physical limit of a continuous-batching server.

Starts benchmarks/sim_server.py on loopback (K sequence slots, a per-sequence decode rate, a
prefill rate, a time scale) and runs TPO D2-N5 through tpo's OpenAI-compatible backend:

* tpo's engine over 64, 256 and 1,024 prompts;
* in the same run, the reference implementation's structure over the same 256 prompts:
  a fixed number of prompts at a time (4 by default, also 16 and 32), each prompt's calls one
  after another (tpo's engine with ``max_concurrent_prompts`` set to that number).

The lower bound on wall time is max(busy slot-time ÷ K, the longest single prompt's chain of
dependent calls), where busy slot-time is what the server measured (prefill plus decode of
every sequence) and a chain is the sum over a prompt's calls of its prefill and one sequence's
decode. Targets: tpo ≤ 1.2 × the bound; tpo ≥ 5 × faster than the reference structure.

Run: .venv/bin/python benchmarks/bench_orchestration.py            (about 6 minutes)
     .venv/bin/python benchmarks/bench_orchestration.py --quick    (smaller, about 1 minute)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import tpo
from _results import write_section
from tpo.registry import policy_from_spec
from tpo.testing import FunctionReward

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:  # loopback only
        return json.loads(r.read())


def _post(url: str) -> None:
    req = urllib.request.Request(url, data=b"{}", method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10):  # loopback only
        pass


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "sim_server.py"),
                "--port",
                str(self.port),
                "--slots",
                str(args.slots),
                "--decode-tokens-per-s",
                str(args.decode_rate),
                "--prefill-tokens-per-s",
                str(args.prefill_rate),
                "--answer-tokens",
                str(args.answer_tokens),
                "--time-scale",
                str(args.time_scale),
            ],
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                _get(self.base + "/v1/models")
                return
            except OSError:
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("the simulated server did not start")

    def stats(self) -> dict[str, Any]:
        return _get(self.base + "/stats")["stats"]

    def reset(self) -> None:
        _post(self.base + "/reset")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def add_sim_args(ap: argparse.ArgumentParser, *, time_scale: float, slots: bool = True) -> None:
    """The simulated server's options, for the benchmarks that start one: ``--slots`` (when ``slots``),
    ``--decode-rate``, ``--prefill-rate``, ``--answer-tokens`` and ``--time-scale`` (default ``time_scale``)."""
    if slots:
        ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--decode-rate", type=float, default=30.0, help="simulated tokens/s per sequence")
    ap.add_argument("--prefill-rate", type=float, default=8000.0, help="simulated prompt tokens/s per request")
    ap.add_argument("--answer-tokens", type=int, default=128)
    ap.add_argument("--time-scale", type=float, default=time_scale)


def chain_s(prompt_tokens: int, policy_calls: int, args: argparse.Namespace) -> float:
    """The real seconds of one chain of dependent calls on the simulated server: its prefill, then one
    sequence's decode per call, sped up by ``--time-scale``."""
    decode_s = args.answer_tokens / args.decode_rate
    return (prompt_tokens / args.prefill_rate + policy_calls * decode_s) / args.time_scale


def prompts(n: int) -> list[tpo.Prompt]:
    return [
        tpo.Prompt(f"q{i}", (tpo.Message("user", f"Question {i}: explain how a heat pump works in a cold climate."),))
        for i in range(n)
    ]


async def run_tpo(server: Server, n_prompts: int, concurrent: int, args: argparse.Namespace) -> dict[str, Any]:
    policy = policy_from_spec("openai:sim", base_url=server.base + "/v1", max_concurrency=args.max_in_flight)
    reward = FunctionReward(lambda messages, answer: float(sum(map(ord, answer[:64])) % 101))
    engine = tpo.Engine(
        policy,
        reward,
        config=tpo.TPOConfig(width=5, depth=2, max_tokens=args.answer_tokens, max_concurrent_prompts=concurrent),
    )
    server.reset()
    results = []
    t0 = time.perf_counter()
    async for r in engine.optimize_many(prompts(n_prompts)):
        results.append(r)
    wall = time.perf_counter() - t0
    close = getattr(policy, "aclose", None)
    if close is not None:
        await close()
    st = server.stats()
    failed = [r for r in results if r.status != "complete"]
    if failed:
        raise RuntimeError(f"{len(failed)} prompts failed, e.g. {failed[0].error}")
    scale = args.time_scale
    chains = [chain_s(r.usage.prompt_tokens, r.usage.policy_calls, args) for r in results]
    throughput_bound = st["busy_slot_s"] / args.slots / scale
    bound = max(throughput_bound, max(chains))
    return {
        "prompts": n_prompts,
        "concurrent_prompts": concurrent,
        "wall_s": wall,
        "bound_s": bound,
        "throughput_bound_s": throughput_bound,
        "chain_bound_s": max(chains),
        "ratio_to_bound": wall / bound,
        "requests": st["requests"],
        "sequences": st["sequences"],
        "completion_tokens": st["completion_tokens"],
        "peak_concurrency": st["peak_concurrency"],
        "slot_utilisation": st["busy_slot_s"] / scale / (args.slots * wall),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sim_args(ap, time_scale=15.0)
    ap.add_argument("--max-in-flight", type=int, default=512, help="the backend's limit on sequences in flight")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--reference-size", type=int, default=256)
    ap.add_argument("--reference-threads", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--quick", action="store_true", help="sizes 32 and 128, reference at 128 prompts with 4 and 32")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.reference_size, args.reference_threads = [32, 128], 128, [4, 32]
    os.environ.setdefault("OPENAI_API_KEY", "sk-simulated")
    server = Server(args)
    rows: list[dict[str, Any]] = []
    try:
        for n in sorted(set(args.sizes) | {args.reference_size}):
            row = asyncio.run(run_tpo(server, n, 256, args))
            row["structure"] = "tpo"
            rows.append(row)
            print(
                f"tpo        {n:>5} prompts: {row['wall_s']:7.1f} s, bound {row['bound_s']:6.1f} s "
                f"(throughput {row['throughput_bound_s']:.1f}, chain {row['chain_bound_s']:.1f}), "
                f"{row['ratio_to_bound']:.2f}x the bound, peak {row['peak_concurrency']} of {args.slots} slots, "
                f"utilisation {row['slot_utilisation']:.0%}",
                flush=True,
            )
        for threads in args.reference_threads:
            row = asyncio.run(run_tpo(server, args.reference_size, threads, args))
            row["structure"] = f"reference ({threads} at a time)"
            rows.append(row)
            print(
                f"reference  {args.reference_size:>5} prompts, {threads:>2} at a time: {row['wall_s']:7.1f} s, "
                f"{row['ratio_to_bound']:.2f}x the bound, peak {row['peak_concurrency']} slots",
                flush=True,
            )
    finally:
        server.stop()
    ours = next(r for r in rows if r["structure"] == "tpo" and r["prompts"] == args.reference_size)
    lines = [
        "| structure | prompts | wall s | bound s (throughput / chain) | wall ÷ bound | peak slots | slot utilisation |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['structure']} | {r['prompts']:,} | {r['wall_s']:.1f} | {r['bound_s']:.1f} "
            f"({r['throughput_bound_s']:.1f} / {r['chain_bound_s']:.1f}) | {r['ratio_to_bound']:.2f} | "
            f"{r['peak_concurrency']} / {args.slots} | {r['slot_utilisation']:.0%} |"
        )
    verdicts = []
    worst = max(r["ratio_to_bound"] for r in rows if r["structure"] == "tpo")
    verdicts.append(
        f"- tpo's wall time is at most {worst:.2f}x the lower bound (target ≤ 1.2): {'met' if worst <= 1.2 else 'MISSED'}"
    )
    for r in rows:
        if r["structure"] != "tpo":
            speedup = r["wall_s"] / ours["wall_s"]
            target = " (target ≥ 5 at the default 4)" if r["concurrent_prompts"] == 4 else ""
            met = "" if not target else (": met" if speedup >= 5 else ": MISSED")
            verdicts.append(
                f"- tpo is {speedup:.1f}x faster than the reference structure at {r['concurrent_prompts']} prompts at a time{target}{met}"
            )
    verdicts.append(
        f"- simulated server: {args.slots} slots, {args.decode_rate:g} tokens/s per sequence, prefill {args.prefill_rate:g} tokens/s, "
        f"{args.answer_tokens}-token answers, time scale {args.time_scale:g} (wall and bounds are in real seconds); "
        f"TPO D2-N5 through the openai backend (at most {args.max_in_flight} sequences in flight), 256 prompts in flight for tpo."
    )
    body = "\n".join(lines) + "\n\n" + "\n".join(verdicts)
    print("\n".join(verdicts))
    write_section("orchestration", "1. Orchestration efficiency against the physical limit", body)


if __name__ == "__main__":
    main()
