"""Benchmark 5: `tpo serve` under many concurrent clients, against the physical limit of the model server.

Starts benchmarks/sim_server.py (the simulated continuous-batching server of benchmark 1) and
`tpo serve` in front of it (TPO D2-N5 through the openai backend, a function reward), each as a
process of its own, then runs C concurrent official `openai` async clients, each sending R
requests one after another (distinct prompts), for several C.

For each C it reports the total wall time ÷ the lower bound of benchmark 1, max(busy slot-time
÷ K, the longest dependent chain), where a client's R requests form one chain (each waits for
the one before) and a request's chain is the sum over its calls of prefill plus one sequence's
decode (from the call counts and tokens the server reports in `usage` and `tpo.usage`). Target:
≤ 1.25 at C = 64. Also p50/p95 request latency ÷ one request's dependent-chain time (a
request cannot be faster than its chain; when the model server is the bottleneck, latency rises
with C as the slots are shared, which the last column's bound accounts for), and requests/s.

Run: .venv/bin/python benchmarks/bench_serve.py            (about 2 minutes)
     .venv/bin/python benchmarks/bench_serve.py --quick    (C = 1 and 16 only, about 30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from _results import write_section
from bench_orchestration import Server, add_sim_args, chain_s, free_port

HERE = Path(__file__).resolve().parent
REWARD = "def score(messages, answer):\n    return float(sum(map(ord, answer[:64])) % 101)\n"


class TPOServe:
    """`tpo serve` as a process of its own, in front of the simulated server."""

    def __init__(self, sim: Server, args: argparse.Namespace, workdir: Path) -> None:
        (workdir / "reward.py").write_text(REWARD)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "serve.log").open("w")
        env = {**os.environ, "OPENAI_API_KEY": "sk-simulated"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tpo",
                "serve",
                "--policy",
                "openai:sim",
                "--base-url",
                sim.base + "/v1",
                "--policy-option",
                f"max_concurrency={args.max_in_flight}",
                "--reward",
                f"python:{workdir / 'reward.py'}:score",
                "--width",
                "5",
                "--depth",
                "2",
                "--max-tokens",
                str(args.answer_tokens),
                "--max-concurrent",
                str(max(args.clients)),
                "--max-queue",
                "0",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tpo serve did not start; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def run_clients(
    serve: TPOServe, sim: Server, clients: int, per_client: int, args: argparse.Namespace
) -> dict[str, Any]:
    sim.reset()
    latencies: list[float] = []
    chains: dict[int, float] = {}
    request_chains: list[float] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with openai.AsyncOpenAI(
        base_url=serve.base + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=600,
        http_client=httpx.AsyncClient(limits=limits, timeout=600),
    ) as client:

        async def one_client(c: int) -> None:
            for r in range(per_client):
                question = f"Question {c}-{r}: explain how a heat pump works in a cold climate."
                t0 = time.perf_counter()
                messages = [{"role": "user", "content": question}]
                reply = await client.chat.completions.create(model="tpo", messages=messages)
                latencies.append(time.perf_counter() - t0)
                if not reply.choices or not reply.choices[0].message.content:
                    raise RuntimeError(f"request {c}-{r} got no answer")
                usage = reply.model_extra["tpo"]["usage"]
                chain = chain_s(usage["prompt_tokens"], usage["policy_calls"], args)
                request_chains.append(chain)
                chains[c] = chains.get(c, 0.0) + chain

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    st = sim.stats()
    throughput_bound = st["busy_slot_s"] / args.slots / args.time_scale
    chain_bound = max(chains.values())
    bound = max(throughput_bound, chain_bound)
    one_chain = statistics.median(request_chains)
    # A request shares the slots with the C - 1 others in flight: it cannot finish faster than
    # its chain, nor faster than C requests' slot-time spread over the K slots.
    per_request_slot_s = st["busy_slot_s"] / args.time_scale / len(latencies)
    latency_bound = max(one_chain, clients * per_request_slot_s / args.slots)
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "clients": clients,
        "requests": len(latencies),
        "wall_s": wall,
        "bound_s": bound,
        "throughput_bound_s": throughput_bound,
        "chain_bound_s": chain_bound,
        "ratio_to_bound": wall / bound,
        "one_chain_s": one_chain,
        "p50_s": statistics.median(latencies),
        "p95_s": q[18],
        "latency_bound_s": latency_bound,
        "requests_per_s": len(latencies) / wall,
        "peak_concurrency": st["peak_concurrency"],
        "slot_utilisation": st["busy_slot_s"] / args.time_scale / (args.slots * wall),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sim_args(ap, time_scale=15.0)
    ap.add_argument("--max-in-flight", type=int, default=512, help="the backend's limit on sequences in flight")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="C = 1 and 16, 2 requests each")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests_per_client = [1, 16], 2
    sim = Server(args)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            serve = TPOServe(sim, args, Path(tmp))
            try:
                for clients in args.clients:
                    row = asyncio.run(run_clients(serve, sim, clients, args.requests_per_client, args))
                    rows.append(row)
                    print(
                        f"C={clients:>4} x R={args.requests_per_client}: {row['wall_s']:6.1f} s, "
                        f"bound {row['bound_s']:5.1f} s "
                        f"(throughput {row['throughput_bound_s']:.1f}, chain {row['chain_bound_s']:.1f}) = "
                        f"{row['ratio_to_bound']:.2f}x; p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s "
                        f"(one chain {row['one_chain_s']:.2f} s); {row['requests_per_s']:.1f} requests/s; "
                        f"peak {row['peak_concurrency']} slots",
                        flush=True,
                    )
            finally:
                serve.stop()
    finally:
        sim.stop()
    lines = [
        "| clients C | requests | wall s | bound s (throughput / chain) | wall ÷ bound | p50 s | p95 s "
        "| p50 ÷ chain | p95 ÷ chain | p50 ÷ latency bound | requests/s | peak slots | slot utilisation |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['wall_s']:.1f} | {r['bound_s']:.1f} "
            f"({r['throughput_bound_s']:.1f} / {r['chain_bound_s']:.1f}) | {r['ratio_to_bound']:.2f} | "
            f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | "
            f"{r['p50_s'] / r['one_chain_s']:.2f} | {r['p95_s'] / r['one_chain_s']:.2f} | "
            f"{r['p50_s'] / r['latency_bound_s']:.2f} | {r['requests_per_s']:.1f} | "
            f"{r['peak_concurrency']} / {args.slots} | {r['slot_utilisation']:.0%} |"
        )
    verdicts = []
    at64 = next((r for r in rows if r["clients"] == 64), None)
    if at64 is not None:
        met = "met" if at64["ratio_to_bound"] <= 1.25 else "MISSED"
        verdicts.append(
            f"- at C = 64, wall time is {at64['ratio_to_bound']:.2f}x the lower bound (target ≤ 1.25): {met}"
        )
    chain = statistics.median(r["one_chain_s"] for r in rows)
    verdicts.append(
        f"- one request's dependent chain (7 calls: prefill + one sequence's decode each) is {chain:.2f} s; "
        '"latency bound" is the larger of that and C requests\' slot-time shared by the K slots'
    )
    verdicts.append(
        f"- `tpo serve` (one process: uvicorn, one shared engine) in front of the simulated server "
        f"({args.slots} slots, {args.decode_rate:g} tokens/s per sequence, prefill {args.prefill_rate:g} tokens/s, "
        f"{args.answer_tokens}-token answers, time scale {args.time_scale:g}; times in real seconds); TPO D2-N5, "
        f"openai backend with at most {args.max_in_flight} sequences in flight; each of C official `openai` async "
        f"clients sends {args.requests_per_client} requests one after another"
    )
    body = "\n".join(lines) + "\n\n" + "\n".join(verdicts)
    print("\n".join(verdicts))
    write_section("serve", "5. `tpo serve` under concurrent clients", body)


if __name__ == "__main__":
    main()
