"""Stand-ins for third-party packages that cannot run on the test machines, and the loader the tests use for them.

Each stand-in is a file here that a test loads with ``load_stub`` and puts in ``sys.modules``
under the real package's name for one test (see the file's ``install``)::

    from stubs import load_stub

    vllm_stub = load_stub("tpo_tests_vllm_stub", "vllm_stub.py")
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_stub"]


def load_stub(name: str, file: str) -> ModuleType:
    """The stand-in in ``tests/stubs/<file>`` as module ``name``, loaded once and shared by every test file.

    Use a name no real package has (``tpo_tests_...``): the module is registered under it in
    ``sys.modules`` before it runs, since dataclasses look their module up there.
    """
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the test stand-in {file!r} from {Path(__file__).parent}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # a half-run module must not be handed out by the next call
            raise
    return sys.modules[name]
