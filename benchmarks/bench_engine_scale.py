"""Benchmark 4: the engine's own cost per prompt-step, and its memory, over 1,000 and 10,000 prompts.

The policy and reward are in-memory doubles that take no time, so what is measured is the
engine: building requests, fitting them to the context window, dispatching, extracting,
storing and selecting. Input is a generator and results are written to a file as they
arrive, as ``tpo batch`` does, so memory should not grow with the number of finished prompts.

Run: .venv/bin/python benchmarks/bench_engine_scale.py [--prompts 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import tpo
from _results import write_section
from tpo.testing import default_reply
from tpo.types import Generation, GenerationRequest, Score, ScoreRequest

TARGET_MS_PER_PROMPT_STEP = 2.0


class InstantPolicy:
    """Replies at once with distinct texts, records nothing (so it holds no memory itself)."""

    name = "instant"
    batching = True
    supports_n = True
    supports_logprobs = False

    def __init__(self) -> None:
        self.calls = 0

    async def context_window(self) -> int:
        return 32768

    def count_tokens(self, messages: Sequence[tpo.Message]) -> None:
        return None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.calls += 1
        return [Generation(tuple(default_reply(r)), 100, 50 * r.n) for r in requests]


class InstantReward:
    name = "length"
    batching = True

    async def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        return [Score(float(len(r.answer) % 97)) for r in requests]


def prompts(n: int) -> Iterator[tpo.Prompt]:
    for i in range(n):
        yield tpo.Prompt(str(i), (tpo.Message("user", f"Question {i}: how do tides work, and why twice a day?"),))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(n: int, out_dir: str) -> dict[str, float]:
    """One measurement, in this process (the caller starts a fresh process per size)."""
    policy, reward = InstantPolicy(), InstantReward()
    rss_at: dict[str, float] = {"start": _rss_mib()}
    marks = {max(1, n // 10): "10%", max(1, n // 2): "50%", n: "100%"}
    done = 0
    t0 = time.perf_counter()
    with open(os.path.join(out_dir, f"out-{n}.jsonl"), "w", encoding="utf-8") as out:
        for result in tpo.optimize_many(prompts(n), policy=policy, reward=reward, width=5, depth=2):
            out.write(result.to_json() + "\n")
            done += 1
            if done in marks:
                rss_at[marks[done]] = _rss_mib()
    elapsed = time.perf_counter() - t0
    prompt_steps = n * 3  # the sampling step and two improvement steps
    return {
        "prompts": n,
        "wall_s": elapsed,
        "ms_per_prompt_step": elapsed / prompt_steps * 1000,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_10pct_mib": rss_at["10%"],
        "rss_end_mib": rss_at["100%"],
        "backend_calls": policy.calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run(args.one, args.out_dir)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.prompts:
            # A fresh process per size, so peak memory belongs to that size alone.
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(n), "--out-dir", tmp],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{n:>6} prompts: {row['wall_s']:.2f} s, {row['ms_per_prompt_step']:.3f} ms per prompt-step, "
                f"peak RSS {row['peak_rss_mib']:.1f} MiB (RSS {row['rss_10pct_mib']:.1f} MiB at 10% done, "
                f"{row['rss_end_mib']:.1f} MiB at the end), {row['backend_calls']} backend calls"
            )
    worst = max(r["ms_per_prompt_step"] for r in rows)
    small, large = rows[0], rows[-1]
    growth = large["peak_rss_mib"] / small["peak_rss_mib"]
    ok_time = worst < TARGET_MS_PER_PROMPT_STEP
    ok_mem = growth < 1.5
    table = "\n".join(
        [
            "| prompts | wall s | ms per prompt-step | peak RSS MiB | RSS at 10% / at end MiB | backend calls |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        + [
            f"| {r['prompts']:,} | {r['wall_s']:.2f} | {r['ms_per_prompt_step']:.3f} | {r['peak_rss_mib']:.1f} | "
            f"{r['rss_10pct_mib']:.1f} / {r['rss_end_mib']:.1f} | {r['backend_calls']} |"
            for r in rows
        ]
    )
    verdict = (
        f"- engine time per prompt-step: worst {worst:.3f} ms (target < {TARGET_MS_PER_PROMPT_STEP} ms): "
        f"{'met' if ok_time else 'MISSED'}\n"
        f"- peak memory at {large['prompts']:,} prompts is {growth:.2f}x that at {small['prompts']:,} "
        f"(the process's whole peak RSS, interpreter included; target: no growth with finished prompts, < 1.5x): {'met' if ok_mem else 'MISSED'}\n"
        "- D2-N5, in-memory doubles (no model time), 256 prompts in flight, results streamed to a JSONL file."
    )
    print(verdict)
    write_section("engine-scale", "4. Scale of the engine itself", table + "\n\n" + verdict)


if __name__ == "__main__":
    main()
