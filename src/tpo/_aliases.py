"""The import paths tpo has published since 0.1 (``tpo.runner``, ``tpo.evaluate``, ...), kept working after the layers moved.

Each old path is the same module object as its new home (``tpo.runner is tpo.batch.runner``), so
attributes, ``isinstance`` checks and ``monkeypatch.setattr("tpo.runner.x", ...)`` behave exactly
as before. A module is imported only when its old path is imported, never at ``import tpo``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

#: Old public path -> the module's home in the layered tree.
ALIASES: dict[str, str] = {
    "tpo.algorithm": "tpo.engine.algorithm",
    "tpo.prompts": "tpo.engine.prompts",
    "tpo.store": "tpo.engine.store",
    "tpo.runner": "tpo.batch.runner",
    "tpo.datasets": "tpo.batch.datasets",
    "tpo.evaluate": "tpo.analysis.evaluate",
    "tpo.export": "tpo.analysis.export",
    "tpo.report": "tpo.analysis.report",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self._target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self._target)
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The target already ran; undo the import system's relabelling so the module keeps its own spec.
        module.__spec__ = self._own_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        home = ALIASES.get(fullname)
        if home is None:
            return None
        module = importlib.import_module(home)
        # The import system keeps an existing module's own __spec__; it only files it under the old name.
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(home), origin=getattr(module, "__file__", None))


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
