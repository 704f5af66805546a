"""The python reward: the user's function from a module or a file, plain, batched or async, and its failures."""

from __future__ import annotations

import asyncio
import re
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import tpo
from tpo import ConfigError, Message, Score, ScoreRequest
from tpo.registry import reward_from_spec
from tpo.rewards.function import PythonReward, batched, load_function
from tpo.testing import ScriptedPolicy

CONVERSATION = (Message("system", "Be brief."), Message("user", "What is 2 + 2?"))


def req(text: str, prompt_id: str = "p", **metadata: object) -> ScoreRequest:
    return ScoreRequest(CONVERSATION, text, metadata, prompt_id)


def run(reward: PythonReward, *requests: ScoreRequest) -> list[Score]:
    return asyncio.run(reward.score(list(requests)))


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- loading


def test_function_from_a_file_gets_openai_style_messages_and_the_answer(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "rm.py",
        """
        seen = []

        def score(messages, answer):
            seen.append((messages, answer))
            return len(answer) + 0.5
    """,
    )
    reward = reward_from_spec(f"python:{path}:score")
    assert isinstance(reward, PythonReward)
    assert reward.batching is False
    assert reward.name == f"python:{path}:score"
    scores = run(reward, req("four"), req("it is 4"))
    assert [s.value for s in scores] == [4.5, 7.5]
    module = sys.modules[load_function(f"{path}:score").__module__]
    messages, answer = module.seen[0]
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert answer == "four"


def test_relative_file_path_and_a_function_in_a_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path,
        "rel_rm.py",
        """
        class Scorer:
            @staticmethod
            def by_words(messages, answer):
                return float(len(answer.split()))
    """,
    )
    monkeypatch.chdir(tmp_path)
    reward = PythonReward.from_spec("./rel_rm.py:Scorer.by_words")
    assert [s.value for s in run(reward, req("one two three"))] == [3.0]


def test_two_files_with_the_same_name_do_not_replace_each_other(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write(tmp_path / "a", "rm.py", "def f(messages, answer):\n    return 1.0\n")
    b = write(tmp_path / "b", "rm.py", "def f(messages, answer):\n    return 2.0\n")
    fa, fb = load_function(f"{a}:f"), load_function(f"{b}:f")
    assert (fa([], ""), fb([], "")) == (1.0, 2.0)


def test_windows_style_target_splits_at_the_last_colon(monkeypatch: pytest.MonkeyPatch) -> None:
    # The registry hands us everything after "python:"; the drive letter must stay in the path.
    with pytest.raises(ConfigError, match=r"the file 'C:\\\\rm\\\\rm.py' does not exist"):
        load_function("C:\\rm\\rm.py:score")


def test_function_from_an_importable_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "tpo_test_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    write(pkg, "rewards.py", "def politeness(messages, answer):\n    return 1.0 if 'please' in answer else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = reward_from_spec("python:tpo_test_user_pkg.rewards:politeness")
    assert [s.value for s in run(reward, req("yes please"), req("no"))] == [1.0, 0.0]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon_here", "expected MODULE:FUNCTION or FILE.py:FUNCTION"),
        ("tpo_no_such_module_xyz:fn", "no module named 'tpo_no_such_module_xyz'"),
        ("./missing_file.py:fn", "the file './missing_file.py' does not exist"),
        ("tpo.testing:no_such_function", "'tpo.testing' has no function 'no_such_function'"),
        ("tpo.testing:__all__", "is a list, not a function"),
    ],
)
def test_what_is_missing_is_a_config_error_naming_it(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        reward_from_spec(f"python:{target}")


def test_a_file_that_fails_to_run_or_imports_something_missing_is_a_config_error(tmp_path: Path) -> None:
    broken = write(tmp_path, "broken.py", "raise RuntimeError('half-written file')\n")
    with pytest.raises(ConfigError, match=r"running .*broken\.py.* failed: RuntimeError: half-written file"):
        load_function(f"{broken}:f")
    importer = write(tmp_path, "importer.py", "import tpo_definitely_not_installed_pkg\n")
    with pytest.raises(ConfigError, match="ModuleNotFoundError"):
        load_function(f"{importer}:f")
    # A module that imports something missing is not reported as the module itself missing.
    pkg = tmp_path / "tpo_test_pkg_bad_import"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import tpo_definitely_not_installed_pkg\n", encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="importing 'tpo_test_pkg_bad_import' failed"):
            load_function("tpo_test_pkg_bad_import:f")
    finally:
        sys.path.remove(str(tmp_path))


def test_unknown_option_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rm.py", "def f(messages, answer):\n    return 1\n")
    with pytest.raises(ConfigError, match="unknown option 'temperature'; it takes: batched, concurrency"):
        reward_from_spec(f"python:{path}:f", temperature=0.5)


# ---------------------------------------------------------------------------- results and failures


def test_exceptions_and_wrong_return_types_fail_only_that_answer() -> None:
    def fn(messages: list[dict[str, str]], answer: str) -> object:
        if answer == "boom":
            raise ValueError("cannot judge this")
        return {"ok": 1.0, "text": "high", "none": None, "nan": float("nan"), "bool": True, "int": 3}[answer]

    reward = PythonReward(fn)
    out = run(reward, req("ok"), req("boom"), req("text"), req("none"), req("nan"), req("bool"), req("int"))
    assert out[0] == Score(1.0)
    assert out[1].value is None and out[1].error is not None
    assert "ValueError: cannot judge this" in out[1].error
    assert out[2].error is not None and "returned str 'high', not a number" in out[2].error
    assert out[3].error is not None and "returned NoneType None, not a number" in out[3].error
    assert out[4].error is not None and "not a finite number" in out[4].error
    assert out[5] == Score(1.0)  # True/False count as 1.0/0.0, handy for checkers
    assert out[6] == Score(3.0)


def test_numpy_scalars_and_score_objects_are_accepted() -> None:
    numpy = pytest.importorskip("numpy")
    reward = PythonReward(lambda m, a: numpy.float32(0.25) if a == "np" else Score(2.0, details={"why": "rule"}))
    out = run(reward, req("np"), req("score"))
    assert out[0].value == pytest.approx(0.25)
    assert out[1] == Score(2.0, details={"why": "rule"})


def test_metadata_is_passed_to_a_function_that_asks_for_it() -> None:
    def check(messages: list[dict[str, str]], answer: str, metadata: dict[str, object]) -> float:
        return 1.0 if answer.strip() == metadata["answer"] else 0.0

    reward = PythonReward(check)
    assert [s.value for s in run(reward, req("4", answer="4"), req("5", answer="4"))] == [1.0, 0.0]


def test_messages_handed_to_the_function_are_copies() -> None:
    def vandal(messages: list[dict[str, str]], answer: str) -> float:
        messages[0]["content"] = "changed"
        messages.clear()
        return 0.0

    request = req("x")
    run(PythonReward(vandal), request, request)
    assert request.messages == CONVERSATION


# ---------------------------------------------------------------------------- batched and async


def test_batched_decorator_makes_one_call_per_batch() -> None:
    calls: list[tuple[list[list[dict[str, str]]], list[str]]] = []

    @batched
    def fn(messages_list: list[list[dict[str, str]]], answers: list[str]) -> list[float]:
        calls.append((messages_list, answers))
        return [float(len(a)) for a in answers]

    reward = PythonReward(fn)
    assert reward.batching is True
    assert [s.value for s in run(reward, req("a"), req("bbb"), req("cc"))] == [1.0, 3.0, 2.0]
    assert len(calls) == 1
    assert calls[0][1] == ["a", "bbb", "cc"]
    assert calls[0][0][0][-1] == {"role": "user", "content": "What is 2 + 2?"}


def test_batched_attribute_option_and_failures(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "brm.py",
        """
        def lengths(messages_list, answers):
            return [len(a) for a in answers]
        lengths.batched = True

        def plain(messages_list, answers):
            return [1.0] * len(answers)

        def short(messages_list, answers):
            return [1.0]

        def broken(messages_list, answers):
            raise KeyError("model not loaded")

        def mixed(messages_list, answers):
            return [1.0, "bad", float("inf")]
    """,
    )
    assert reward_from_spec(f"python:{path}:lengths").batching is True
    assert reward_from_spec(f"python:{path}:plain").batching is False
    plain = reward_from_spec(f"python:{path}:plain", batched=True)
    assert plain.batching is True
    assert [s.value for s in run(plain, req("a"), req("b"))] == [1.0, 1.0]  # type: ignore[arg-type]
    assert reward_from_spec(f"python:{path}:lengths", batched=False).batching is False
    s = PythonReward(load_function(f"{path}:short"), batched=True)
    out = run(s, req("a"), req("b"))
    assert all(o.error == f"{s.name} returned 1 scores for 2 answers" for o in out)
    b = PythonReward(load_function(f"{path}:broken"), batched=True)
    assert all("KeyError" in (o.error or "") for o in run(b, req("a"), req("b")))
    m = PythonReward(load_function(f"{path}:mixed"), batched=True)
    out = run(m, req("a"), req("b"), req("c"))
    assert out[0] == Score(1.0)
    assert "not a number" in (out[1].error or "") and "not a finite number" in (out[2].error or "")
    with pytest.raises(ConfigError, match="batched must be true or false, got 'yes'"):
        reward_from_spec(f"python:{path}:plain", batched="yes")


def test_batched_function_returning_a_scalar_fails_clearly() -> None:
    reward = PythonReward(lambda ms, ans: 1.0, batched=True)
    out = run(reward, req("a"), req("b"))
    assert all("is batched but returned float, not a list of 2 numbers" in (o.error or "") for o in out)


def test_async_functions_are_awaited_concurrently() -> None:
    running = 0
    peak = 0

    async def slow(messages: list[dict[str, str]], answer: str) -> float:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return float(len(answer))

    reward = PythonReward(slow)
    assert [s.value for s in run(reward, req("ab"), req("abc"), req("a"))] == [2.0, 3.0, 1.0]
    assert peak == 3

    @batched
    async def abatch(messages_list: list[object], answers: list[str]) -> list[float]:
        await asyncio.sleep(0)
        return [0.5] * len(answers)

    assert [s.value for s in run(PythonReward(abatch), req("a"), req("b"))] == [0.5, 0.5]


def test_plain_functions_run_off_the_event_loop_one_at_a_time_by_default() -> None:
    threads: set[str] = set()
    active = 0
    peak = 0
    lock = threading.Lock()

    def fn(messages: list[dict[str, str]], answer: str) -> float:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        threads.add(threading.current_thread().name)
        threading.Event().wait(0.02)
        with lock:
            active -= 1
        return 1.0

    run(PythonReward(fn), *[req(str(i)) for i in range(4)])
    assert peak == 1
    assert threading.main_thread().name not in threads
    peak = 0
    run(PythonReward(fn, concurrency=4), *[req(str(i)) for i in range(4)])
    assert peak > 1
    with pytest.raises(ConfigError, match="concurrency"):
        PythonReward(fn, concurrency=0)


def test_from_a_file_through_optimize(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "len_rm.py",
        """
        def longest(messages, answer):
            if "Answer 1" in answer:
                raise RuntimeError("this one is unscorable")
            return float(len(answer))
    """,
    )
    reward = reward_from_spec(f"python:{path}:longest")
    result = tpo.optimize("Say something.", policy=ScriptedPolicy(), reward=reward, width=3, depth=1)
    assert result.status == "complete"
    failed = [c for c in result.candidates if c.score is None]
    assert len(failed) == 1 and "this one is unscorable" in (failed[0].score_error or "")
    assert result.usage.reward_failures == 1
    assert result.score == max(c.score for c in result.candidates if c.score is not None)
