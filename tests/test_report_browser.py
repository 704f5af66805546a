"""The HTML report in a real headless Chromium: no console errors, curves drawn, search, no injected script, 1,000 prompts.

Chromium is driven over the DevTools protocol through ``--remote-debugging-pipe`` (file
descriptors 3 and 4), so the test needs no websocket package and opens no port; every
network request the page makes is recorded, and must be none.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import select
import shutil
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tpo
from tpo.analysis.evaluate import load_run
from tpo.analysis.judge import JudgeRun, read_verdicts, summarize_verdicts
from tpo.analysis.report import build_report
from tpo.testing import FunctionReward, ScriptedPolicy, default_reply


def _chromium() -> str | None:
    # The real binary first: Debian's /usr/bin/chromium is a shell wrapper that adds flags.
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"),
]

WORDS = [
    "flamingo",
    "glacier",
    "harpsichord",
    "lantern",
    "meridian",
    "nebula",
    "origami",
    "quartz",
    "saffron",
    "tundra",
]
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"


class Browser:
    """A minimal DevTools-protocol client for one headless Chromium over a pipe."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def wire_fds() -> None:  # in the child: the protocol reads fd 3 and writes fd 4
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-default-apps",
            "--disable-extensions",
            "--mute-audio",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        # close_fds=False: fds 3 and 4 must survive into chromium (Python's own fds close on exec anyway).
        self._proc = subprocess.Popen(
            args,
            close_fds=False,
            preexec_fn=wire_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._ids = itertools.count(1)
        #: Every event received, in order: (method, params, sessionId).
        self.events: list[tuple[str, dict[str, Any], str | None]] = []
        self.session: str | None = None

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = True, timeout_s: float = 30
    ) -> Any:
        """Send a command and wait for its reply; events that arrive meanwhile are kept in ``events``."""
        msg: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._next(deadline)
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append((reply["method"], reply.get("params", {}), reply.get("sessionId")))
                if reply["method"] == "Page.javascriptDialogOpening":
                    # An alert would block the page; answer it (the test fails on the event anyway).
                    os.write(
                        self._w,
                        json.dumps(
                            {
                                "id": next(self._ids),
                                "method": "Page.handleJavaScriptDialog",
                                "params": {"accept": True},
                                "sessionId": reply.get("sessionId"),
                            }
                        ).encode()
                        + b"\0",
                    )

    def _next(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the pipe")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)  # type: ignore[no-any-return]

    def open_page(self) -> None:
        """A fresh tab with the domains the checks listen to."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )

    def goto(self, url: str, timeout_s: float = 30) -> None:
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_for(
            "document.documentElement && document.documentElement.getAttribute('data-ready') === '1'", timeout_s
        )

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.js(f"Boolean({condition})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout_s} s: {condition}")
            time.sleep(0.05)

    def type_into(self, selector: str, text: str) -> None:
        """Focus a field, clear it, and type ``text`` as keyboard input (fires the page's input events)."""
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        self.call(
            "Input.dispatchKeyEvent",
            {"type": "keyDown", "key": "Backspace", "code": "Backspace", "windowsVirtualKeyCode": 8},
        )
        self.call(
            "Input.dispatchKeyEvent",
            {"type": "keyUp", "key": "Backspace", "code": "Backspace", "windowsVirtualKeyCode": 8},
        )
        for ch in text:
            self.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": ch, "key": ch})
            self.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": ch})

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (CSP violations among them)."""
        out = []
        for method, params, _ in self.events:
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out

    def network_requests(self) -> list[str]:
        """URLs the page asked the network for (its own file and data: URLs aside)."""
        return [
            p["request"]["url"]
            for m, p, _ in self.events
            if m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:"))
        ]

    def screenshot(self, path: Path) -> None:
        height = int(self.js("document.documentElement.scrollHeight"))
        shot = self.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1400, "height": min(height, 6000), "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout_s=5)
        except (TimeoutError, EOFError, OSError, RuntimeError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    assert CHROMIUM is not None
    b = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    try:
        b.open_page()
        yield b
    finally:
        b.close()


# --------------------------------------------------------------------------- fixtures: real runs


def _reward(messages: Any, answer: str) -> float:
    # Rewrites score higher than samples, so the curves rise; the hash spreads the samples.
    return (zlib.crc32(answer.encode()) % 1000) / 1000 + (0.7 if "Improved" in answer else 0.0)


def _write_run(path: Path, prompts: list[tpo.Prompt], **options: Any) -> Path:
    counter = itertools.count()

    def reply(request: tpo.GenerationRequest) -> list[str]:
        out = default_reply(request, counter)
        if request.prompt_id == "q-xss" and request.purpose == "sample":
            out[0] = f"Here you go: {XSS} and a closing </script> tag."
        return out

    with path.open("w", encoding="utf-8") as f:
        for result in tpo.optimize_many(
            prompts, policy=ScriptedPolicy(reply), reward=FunctionReward(_reward), **options
        ):
            f.write(result.to_json() + "\n")
    return path


def _prompts(n: int) -> list[tpo.Prompt]:
    out = [
        tpo.Prompt.of(f"Describe the {WORDS[i % len(WORDS)]} number {i} in two sentences.", id=f"q-{i:04d}")
        for i in range(n)
    ]
    out.append(tpo.Prompt.of("Reply with some HTML, please.", id="q-xss"))
    return out


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("report")
    runs = [
        load_run(_write_run(d / "tpo.jsonl", _prompts(10), width=5, depth=2)),
        load_run(_write_run(d / "tpo-d3.jsonl", _prompts(10), width=3, depth=3)),
        load_run(_write_run(d / "bon.jsonl", _prompts(10), mode="bon", width=15)),
    ]
    path = d / "report.html"
    path.write_text(build_report(runs), encoding="utf-8")
    return path


def _search(browser: Browser, text: str) -> str:
    """Type into the search box and wait until the list has been filtered for it; return the count line."""
    browser.type_into("#search", text)
    browser.wait_for(
        f"document.getElementById('list').getAttribute('data-query') === {json.dumps(text.strip().lower())}"
    )
    return browser.js("document.getElementById('count').textContent")  # type: ignore[no-any-return]


def _visible_ids(browser: Browser) -> list[str]:
    return browser.js(  # type: ignore[no-any-return]
        "Array.from(document.querySelectorAll('details.prompt'))"
        ".filter(d => !d.hidden && d.offsetParent !== null).map(d => d.dataset.id)"
    )


# --------------------------------------------------------------------------- the checks


def test_report_loads_without_errors_and_draws_the_curves(browser: Browser, report_file: Path) -> None:
    browser.goto(report_file.as_uri())

    assert browser.errors() == []
    assert browser.network_requests() == []
    # Every run has a visible mean curve and a best-so-far curve with real extent.
    boxes = browser.js(
        "Array.from(document.querySelectorAll('svg.chart path.series')).map(p => {"
        " const b = p.getBoundingClientRect(); return [p.closest('svg').id, b.width, b.height]; })"
    )
    by_chart: dict[str, list[tuple[float, float]]] = {}
    for chart, w, h in boxes:
        by_chart.setdefault(chart, []).append((w, h))
    # TPO D2-N5 and D3-N3 have rising curves; BoN-15 is a single step (a dot, no line).
    for chart in ("chart-mean", "chart-best"):
        assert sum(1 for w, h in by_chart[chart] if w > 50 and h > 5) == 2, (chart, by_chart[chart])
    assert browser.js("document.querySelectorAll('#chart-mean polygon.band').length") == 2
    assert browser.js("document.querySelectorAll('#chart-budget circle.dot').length") == 3
    assert browser.js("document.querySelectorAll('details.prompt').length") == 11
    assert browser.js("document.getElementById('count').textContent") == "Showing 11 of 11 prompts"


def test_search_by_id_and_by_text_shows_only_the_matches(browser: Browser, report_file: Path) -> None:
    browser.goto(report_file.as_uri())

    assert _search(browser, "q-0007") == "Showing 1 of 11 prompts"
    assert _visible_ids(browser) == ["q-0007"]

    # By text, whatever the case: the word "lantern" is in prompt 3's question only.
    assert _search(browser, "LANTERN") == "Showing 1 of 11 prompts"
    assert _visible_ids(browser) == ["q-0003"]

    # By an answer's text: every run's answers to q-0004 name it; no other prompt's do.
    assert _search(browser, "to prompt q-0004.") == "Showing 1 of 11 prompts"
    assert _visible_ids(browser) == ["q-0004"]

    assert _search(browser, "no such text anywhere") == "Showing 0 of 11 prompts"
    assert _visible_ids(browser) == []
    assert browser.js("document.querySelector('.empty-note').hidden") is False

    assert _search(browser, "") == "Showing 11 of 11 prompts"
    assert len(_visible_ids(browser)) == 11
    assert browser.errors() == []


def test_an_opened_trajectory_shows_steps_lineage_and_escapes_answers(
    browser: Browser, report_file: Path, tmp_path: Path
) -> None:
    browser.goto(report_file.as_uri())
    assert _search(browser, "alert(1)") == "Showing 1 of 11 prompts"
    assert _visible_ids(browser) == ["q-xss"]

    browser.js("document.querySelector('details[data-id=\"q-xss\"] > summary').click()")
    browser.wait_for("document.querySelector('details[data-id=\"q-xss\"] .body')")
    row = "document.querySelector('details[data-id=\"q-xss\"]')"
    # One section per run, a lineage chart with a dot per answer, the steps with chosen and rejected.
    assert browser.js(f"{row}.querySelectorAll('section.run').length") == 3
    assert browser.js(f"{row}.querySelectorAll('section.run')[0].querySelectorAll('.lineage circle').length") == 15
    assert browser.js(f"{row}.querySelectorAll('section.run')[0].querySelectorAll('.lineage line.edge').length") == 10
    assert browser.js(f"{row}.querySelectorAll('section.run')[0].querySelectorAll('.step').length") == 3
    text = browser.js(f"{row}.textContent")
    assert "Critique (textual loss)" in text and "Feedback (textual gradient)" in text
    assert "chosen" in text and "rejected" in text
    # The answer's markup is shown as text and never became elements, so nothing ran.
    assert XSS in text
    assert browser.js("document.querySelectorAll('#list script, #list img').length") == 0
    assert [m for m, _, _ in browser.events if m == "Page.javascriptDialogOpening"] == []
    assert browser.errors() == []

    shot = tmp_path / "report.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("TPO_REPORT_SCREENSHOT"):  # for a person to look at
        shutil.copy(shot, os.environ["TPO_REPORT_SCREENSHOT"])


def test_a_report_of_1000_prompts_opens_and_searches(browser: Browser, tmp_path: Path) -> None:
    run = load_run(_write_run(tmp_path / "big.jsonl", _prompts(1000), width=3, depth=1))
    path = tmp_path / "big.html"
    path.write_text(build_report([run]), encoding="utf-8")

    started = time.monotonic()
    browser.goto(path.as_uri(), timeout_s=40)
    load_s = time.monotonic() - started
    assert browser.js("document.querySelectorAll('details.prompt').length") == 1001
    # Trajectories are built on demand: none exists until a prompt is opened.
    assert browser.js("document.querySelectorAll('details.prompt .body').length") == 0

    assert _search(browser, "q-0777") == "Showing 1 of 1001 prompts"
    assert _visible_ids(browser) == ["q-0777"]
    assert browser.errors() == []
    assert load_s < 30  # generous: the box is shared; a slow page takes minutes, not seconds


# --------------------------------------------------------------------------- the paper's analyses


def _judge_file(path: Path, a: Path, b: Path) -> Path:
    def prefers_improved(request: tpo.GenerationRequest) -> list[str]:
        text = request.messages[-1].content
        first = text.split("<reply_1>", 1)[1].split("</reply_1>", 1)[0]
        return ["Reply 1 is better.\nWinner: 1" if "Improved" in first else "Reply 2 is better.\nWinner: 2"]

    JudgeRun(load_run(a), load_run(b), path, judge={"spec": "scripted"}).run(ScriptedPolicy(prefers_improved))
    return path


@pytest.fixture(scope="module")
def analyses_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("analyses")
    prompts = _prompts(10)
    paths = [
        _write_run(d / "tpo-d1-n3.jsonl", prompts, width=3, depth=1, policy_params=1e9),
        _write_run(d / "tpo-d2-n3.jsonl", prompts, width=3, depth=2, policy_params=1e9),
        _write_run(d / "tpo-d2-n5.jsonl", prompts, width=5, depth=2, policy_params=1e9),
        _write_run(d / "bon.jsonl", prompts, mode="bon", width=12, policy_params=1e9),
    ]
    verdicts = _judge_file(d / "verdicts.jsonl", paths[2], paths[3])
    page = build_report([load_run(p) for p in paths], judgements=[summarize_verdicts(read_verdicts(verdicts)[0])])
    path = d / "analyses.html"
    path.write_text(page, encoding="utf-8")
    return path


def _extent(browser: Browser, selector: str) -> list[list[float]]:
    return browser.js(  # type: ignore[no-any-return]
        f"Array.from(document.querySelectorAll({json.dumps(selector)})).map(e => {{"
        " const b = e.getBoundingClientRect(); return [b.width, b.height]; })"
    )


def test_the_figures_of_the_paper_s_analyses_are_drawn(browser: Browser, analyses_file: Path, tmp_path: Path) -> None:
    browser.goto(analyses_file.as_uri())
    assert browser.errors() == []
    assert browser.network_requests() == []

    # Reward against compute: the best-of-n curve is a real line, each TPO configuration a point.
    (curve,) = _extent(browser, "#chart-compute path.series:not([stroke-dasharray])")
    assert curve[0] > 60 and curve[1] > 20
    assert browser.js("document.querySelectorAll('#chart-compute circle.point').length") == 3
    assert browser.js("document.querySelectorAll('#chart-compute path.series[stroke-dasharray]').length") == 3
    # Every run recorded FLOPs (--policy-params), so the same figure is drawn against FLOPs too.
    assert browser.js("document.querySelectorAll('#chart-flops circle.point').length") == 3
    assert browser.js("document.querySelectorAll('#matched tbody tr').length") == 3

    # Width and depth: a line through the widths 3 and 5 at depth 2, and through the depths 1 and 2 at width 3.
    widths = _extent(browser, "#chart-width path.series")
    depths = _extent(browser, "#chart-depth path.series")
    assert len(widths) == 1 and widths[0][0] > 50 and len(depths) == 1 and depths[0][0] > 50
    ticks = browser.js("Array.from(document.querySelectorAll('#chart-depth text.tick')).map(t => t.textContent)")
    assert "1" in ticks and "2" in ticks and "1.5" not in ticks

    # The stability analysis: the spread of each step's rewards, a line for each TPO run (best-of-N is one step).
    assert sum(1 for w, h in _extent(browser, "#chart-std path.series") if w > 50) == 3

    # The judge's verdicts: bars that fill the width, the win rate with its interval, the length-controlled rate.
    bars = _extent(browser, "#chart-judge rect.bar")
    assert bars and sum(w for w, _ in bars) > 300
    assert browser.js("document.querySelectorAll('#chart-judge .judge-mark').length") == 1
    assert browser.js("document.querySelectorAll('#chart-judge .judge-lc').length") == 1
    text = browser.js("document.getElementById('judge').textContent")
    assert "TPO D2-N5 vs BoN-12" in text and "100.0%" in text

    shot = tmp_path / "analyses.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("TPO_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["TPO_REPORT_SCREENSHOT"] + ".analyses.png")
