"""Writes one benchmark's figures into benchmarks/RESULTS.md, replacing that benchmark's earlier section."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = (
    "# Benchmark results\n\n"
    "Each section is written by its script (the command is given) and replaced when the script runs again.\n"
    "Figures are from the machine named in the section; targets are compared side by side within one run.\n"
)


def machine() -> str:
    """A one-line description of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = float("nan")
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def command() -> str:
    """The command that ran this script, as a user would type it from the repository root."""
    if not sys.argv:
        return ".venv/bin/python"
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(RESULTS.parent.parent))
    except ValueError:
        script_text = str(script)
    return " ".join([".venv/bin/python", script_text, *sys.argv[1:]])


def write_section(key: str, title: str, body: str) -> None:
    """Put ``body`` under ``## title`` in RESULTS.md, replacing the section written before with this key."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- section:{key} -->\n## {title}\n\n"
        f"- date: {now}\n- machine: {machine()}\n- command: `{command()}`\n\n{body.strip()}\n<!-- end:{key} -->\n"
    )
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else _HEADER
    pattern = re.compile(rf"<!-- section:{re.escape(key)} -->.*?<!-- end:{re.escape(key)} -->\n", re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text, encoding="utf-8")
    print(f"\nwritten to {RESULTS}")
