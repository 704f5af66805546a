"""Plain, frozen values passed between the engine, backends and reward models."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import InputError

__all__ = [
    "Generation",
    "GenerationRequest",
    "Message",
    "Prompt",
    "PromptLike",
    "ReplicaReport",
    "SamplingParams",
    "Score",
    "ScoreRequest",
    "TokenLogprob",
    "to_messages",
]

Role = Literal["system", "user", "assistant"]
Purpose = Literal["sample", "loss", "gradient", "update", "judge", "other"]
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        """The OpenAI-style ``{"role": ..., "content": ...}`` form."""
        return {"role": self.role, "content": self.content}


PromptLike = Union[str, Sequence[Mapping[str, Any]], Sequence[Message], "Prompt"]


def to_messages(
    value: str | Sequence[Mapping[str, Any]] | Sequence[Message], *, where: str = "prompt"
) -> tuple[Message, ...]:
    """Normalise a plain string or an OpenAI-style list of messages into a validated conversation.

    The conversation must end with a user turn; a system turn may only come first.
    """
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: the prompt is empty")
        return (Message("user", value),)
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise InputError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")
    out: list[Message] = []
    for i, item in enumerate(value):
        if isinstance(item, Message):
            msg = item
        elif isinstance(item, Mapping):
            role, content = item.get("role"), item.get("content")
            if role not in _ROLES:
                raise InputError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(_ROLES)}")
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
                if len(parts) != len(content):
                    raise InputError(f"{where}: message {i} has non-text content parts; only text is supported")
                content = "".join(parts)
            if not isinstance(content, str):
                raise InputError(f"{where}: message {i} has no text content (got {type(content).__name__})")
            msg = Message(role, content)
        else:
            raise InputError(f"{where}: message {i} is a {type(item).__name__}, not a mapping with role and content")
        if msg.role == "system" and i != 0:
            raise InputError(f"{where}: message {i} is a system message; only the first message may be one")
        out.append(msg)
    if not out:
        raise InputError(f"{where}: the conversation has no messages")
    if out[-1].role != "user":
        raise InputError(f"{where}: the conversation must end with a user message, not {out[-1].role!r}")
    if not out[-1].content.strip():
        raise InputError(f"{where}: the last user message is empty")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A conversation to optimise an answer for, with a stable id and the caller's metadata.

    ``metadata`` is carried through to the result and to reward models (a verifier reads a
    reference answer from it).
    """

    id: str
    messages: tuple[Message, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: PromptLike, *, id: str, metadata: Mapping[str, Any] | None = None) -> Prompt:
        """Build a prompt from a string, a list of messages, or another ``Prompt``.

        A ``Prompt`` keeps its id; ``metadata``, when given, is added to its own.
        """
        if isinstance(value, Prompt):
            return value if not metadata else cls(value.id, value.messages, {**value.metadata, **metadata})
        return cls(id=id, messages=to_messages(value, where=f"prompt {id!r}"), metadata=dict(metadata or {}))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings for one generation request (the paper: 0.7, 0.95, 2048)."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 2048
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Ask a policy backend for ``n`` answers to one conversation.

    ``purpose`` and ``prompt_id`` say which step of which prompt asked, for logs, scripted
    test doubles and tracing; a backend must not change its behaviour on them.
    ``logprobs`` asks for the top-k log-probabilities of every generated token.
    """

    messages: tuple[Message, ...]
    n: int = 1
    sampling: SamplingParams = SamplingParams()
    logprobs: int | None = None
    purpose: Purpose = "other"
    prompt_id: str = ""
    step: int = 0

    def messages_as_dicts(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style dicts."""
        return [m.as_dict() for m in self.messages]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token with its log-probability and the top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Generation:
    """What a backend returns for one request: up to ``n`` texts and the usage it reports.

    Token counts are ``None`` when the backend cannot tell. ``logprobs[i]`` belongs to
    ``texts[i]`` when log-probabilities were asked for and the backend supports them.
    """

    texts: tuple[str, ...]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reasons: tuple[str | None, ...] = ()
    logprobs: tuple[tuple[TokenLogprob, ...] | None, ...] | None = None


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """Score ``answer`` as the assistant's reply to ``messages``.

    ``metadata`` is the prompt's metadata (a reference answer for a verifier, say).
    """

    messages: tuple[Message, ...]
    answer: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    prompt_id: str = ""


@dataclass(frozen=True, slots=True)
class Score:
    """A reward: ``value``, or ``error`` when it could not be computed (then ``value`` is None)."""

    value: float | None
    error: str | None = None
    details: Mapping[str, Any] | None = None

    @classmethod
    def failed(cls, error: str, details: Mapping[str, Any] | None = None) -> Score:
        """A score that could not be computed."""
        return cls(None, error, details)


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's share of a run so far, as a model spread over replicas (servers or Ray actors) reports it.

    Such a policy or reward has a method ``replica_reports() -> list[ReplicaReport]``; ``tpo run``
    and ``tpo batch`` show one line per replica after a run.
    """

    #: Where it is: a server's URL (credentials masked) or a Ray actor's host and process.
    label: str
    #: ``up``, ``cooling off`` (set aside after failures, probed again later), ``restarting`` or ``dead``.
    state: str
    #: Requests it completed (a generation request for ``n`` answers counts once).
    requests: int
    #: Sequences it produced (``n`` per generation request; one per score).
    sequences: int
    #: Calls or attempts that failed on it (and were sent to another replica, or retried).
    failures: int = 0
    #: The last failure, for the message when no replica is left.
    last_error: str | None = None
