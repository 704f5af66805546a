"""The public surface: ``tpo.__all__``, the import paths the docs cite, and the direction of imports between layers."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tpo

SRC = Path(tpo.__file__).parent

EXPECTED_ALL = {
    "DEFAULT_PROMPTS",
    "BackendError",
    "Candidate",
    "CandidateStore",
    "ConfigError",
    "Engine",
    "Generation",
    "GenerationRequest",
    "InputError",
    "MalformedResponseError",
    "Message",
    "MissingDependencyError",
    "Models",
    "PolicyBackend",
    "Prompt",
    "PromptSet",
    "PromptTemplateError",
    "RewardError",
    "RewardModel",
    "RunError",
    "SamplingParams",
    "Score",
    "ScoreRequest",
    "StepRecord",
    "TPOConfig",
    "TPOError",
    "TPOResult",
    "TokenLogprob",
    "Usage",
    "UserError",
    "__version__",
    "answer_id",
    "aoptimize",
    "aoptimize_many",
    "build_models",
    "derive_seed",
    "extract_answer",
    "optimize",
    "optimize_many",
}


def test_all_is_pinned_and_every_name_exists() -> None:
    assert set(tpo.__all__) == EXPECTED_ALL
    assert len(tpo.__all__) == len(set(tpo.__all__))
    for name in tpo.__all__:
        assert hasattr(tpo, name), name


ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Backticked ``tpo.NAME`` in the docs that are no Python path: fields of a ``tpo serve`` request body.
NOT_PATHS = {"tpo.width", "tpo.depth"}


def _imports_cited() -> dict[str, set[str]]:
    """Every ``from tpo... import a, b`` (and ``import tpo...``) in the README and docs/, with the names taken."""
    cited: dict[str, set[str]] = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for module, listed, bare in re.findall(
            r"^\s*from (tpo(?:\.\w+)*) import (?:\(([^)]*)\)|([\w, ]+)$)", text, re.MULTILINE
        ):
            names = (listed or bare).replace("\n", ",").split(",")
            cited.setdefault(module, set()).update(n.strip() for n in names if n.strip())
        for module in re.findall(r"^\s*import (tpo(?:\.\w+)*)\s*$", text, re.MULTILINE):
            cited.setdefault(module, set())
    return cited


def _references_cited() -> set[str]:
    """Every dotted ``tpo.x.Name`` the README and docs/ write in backticks (a call's arguments left off)."""
    found = {ref for page in PAGES for ref in re.findall(r"`(tpo(?:\.\w+)+)(?:\([^`]*\))?`", page.read_text("utf-8"))}
    return found - NOT_PATHS


#: Every path the README and docs/ cite, and what they use from it, read from the pages themselves.
CITED = _imports_cited()
REFERENCES = _references_cited()

# The paths the docs cited before the layers moved (the old aliases among them), and what they used
# from them: they must keep working.
OLD_PATHS = {
    "tpo.runner": ["run_batch", "arun_batch", "BatchRun", "BatchObserver", "BatchState", "BatchSummary", "sidecar_dir"],
    "tpo.datasets": ["read_prompts", "PromptDataset"],
    "tpo.evaluate": ["evaluate", "load_run", "compare_runs", "summarize_run", "read_results"],
    "tpo.export": [],
    "tpo.report": ["write_report", "build_report"],
    "tpo.algorithm": ["Engine", "derive_seed"],
    "tpo.prompts": ["DEFAULT_PROMPTS", "PromptSet", "extract_answer"],
    "tpo.store": ["CandidateStore", "Candidate", "answer_id"],
    "tpo.testing": ["ScriptedPolicy", "FunctionReward", "forbid_real_requests"],
    "tpo.registry": ["policy_from_spec", "reward_from_spec", "take_options"],
    "tpo.models": ["build_models", "Models"],
    "tpo.backends.llamacpp": ["LlamaCppPolicy"],
    "tpo.backends.openai_server": ["OpenAIPolicy"],
    "tpo.rewards.judge": ["JudgeReward"],
    "tpo.rewards.combine": ["WeightedReward"],
    "tpo.rewards.verifier": ["MathReward"],
    "tpo.cli.batch": [],
}

HOMES = {
    "tpo.runner": "tpo.batch.runner",
    "tpo.datasets": "tpo.batch.datasets",
    "tpo.evaluate": "tpo.analysis.evaluate",
    "tpo.export": "tpo.analysis.export",
    "tpo.report": "tpo.analysis.report",
    "tpo.algorithm": "tpo.engine.algorithm",
    "tpo.prompts": "tpo.engine.prompts",
    "tpo.store": "tpo.engine.store",
}


def test_the_docs_are_read_for_their_citations() -> None:
    assert {"tpo.batch.runner", "tpo.analysis.evaluate", "tpo.rewards.judge"} <= set(CITED)
    assert "run_batch" in CITED["tpo.batch.runner"] and "tpo.batch.runner.BatchRun" in REFERENCES


@pytest.mark.parametrize("path", sorted(set(CITED) | set(OLD_PATHS)))
def test_cited_import_paths_work(path: str) -> None:
    module = importlib.import_module(path)
    for name in sorted(CITED.get(path, set()) | set(OLD_PATHS.get(path, []))):
        assert hasattr(module, name), f"{path}.{name}"
    exec(f"from {path} import *", {})


@pytest.mark.parametrize("ref", sorted(REFERENCES))
def test_cited_names_exist(ref: str) -> None:
    parts = ref.split(".")
    # The longest prefix that imports is the module; the rest are attributes of it.
    for i in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            assert hasattr(found, name), ref
            found = getattr(found, name)
        return
    pytest.fail(f"{ref}: no part of it imports")


@pytest.mark.parametrize("old", sorted(HOMES))
def test_old_paths_are_the_very_modules_in_their_new_homes(old: str) -> None:
    module = importlib.import_module(old)
    assert module is importlib.import_module(HOMES[old])
    assert module.__name__ == HOMES[old] and module.__spec__.name == HOMES[old]
    assert sys.modules[old] is module


def _loaded_by(module: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of ``candidates`` a fresh interpreter has loaded after ``import module``."""
    code = f"import sys, {module}\nprint([m for m in {candidates!r} if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(out.strip())


def test_import_tpo_loads_no_layer_it_does_not_need() -> None:
    heavy = ("tpo.batch.runner", "tpo.analysis.report", "tpo.analysis.evaluate", "tpo.cli")
    assert _loaded_by("tpo", (*heavy, "torch", "transformers", "vllm", "llama_cpp", "openai", "httpx", "ray")) == []


def test_the_command_line_loads_the_analysis_layers_only_when_a_command_runs() -> None:
    analysis = ("tpo.analysis.evaluate", "tpo.analysis.compute", "tpo.analysis.stats", "tpo.analysis.judge")
    late = (*analysis, "tpo.analysis.report", "tpo.batch.runner", "tpo.batch.sweep")
    assert _loaded_by("tpo.cli", late) == []


def _imports(path: Path) -> set[str]:
    """The tpo modules a source file imports, as absolute names."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                out.add(".".join([*base, node.module] if node.module else base))
            elif node.module and node.module.startswith("tpo"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tpo"))
    return out


# What each layer may not import: the method knows no plugin, batch or analysis layer or front end;
# plugins know no front end; nothing below the front ends imports them.
FORBIDDEN = {
    "engine": (
        "tpo.backends",
        "tpo.rewards",
        "tpo.batch",
        "tpo.analysis",
        "tpo.cli",
        "tpo.serve",
        "tpo._http",
        "tpo._local",
    ),
    "backends": ("tpo.batch", "tpo.analysis", "tpo.cli", "tpo.serve"),
    "rewards": ("tpo.batch", "tpo.analysis", "tpo.cli", "tpo.serve"),
    "batch": ("tpo.cli", "tpo.serve", "tpo.backends", "tpo.rewards"),
    # analysis may use a verifier reward to check answers (tpo eval's accuracy), never a policy backend
    "analysis": ("tpo.cli", "tpo.serve", "tpo.backends"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer: str) -> None:
    offending = []
    for path in sorted((SRC / layer).rglob("*.py")):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[layer]):
                offending.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offending, "\n".join(offending)


def test_core_modules_import_no_backend() -> None:
    core = ["types.py", "config.py", "errors.py", "protocols.py", "result.py", "api.py"]
    for name in core:
        bad = [m for m in _imports(SRC / name) if m.startswith(("tpo.backends", "tpo.rewards", "tpo.cli", "tpo._http"))]
        assert not bad, f"{name} imports {bad}"


def test_every_core_module_imports_first_in_a_fresh_interpreter() -> None:
    """No import cycle that only shows when a module other than ``tpo`` is imported first."""
    names = sorted(
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        for layer in ("", "engine", "batch", "analysis")
        for p in (SRC / layer).glob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import subprocess, sys\n"
        "bad = [n for n in sys.argv[1:] if subprocess.run([sys.executable, '-c', 'import ' + n]).returncode]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stderr[-3000:]
