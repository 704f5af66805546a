"""The loss, gradient and update prompt templates, and their rendering.

Templates are plain data with ``{{name}}`` placeholders. A ``PromptSet`` holds one of each;
``PromptSet.load(path)`` reads a user's overrides from a TOML or JSON file (any template
not given keeps its default). Rendering is a pure function: values are inserted once and
never re-scanned, so an answer that contains ``{{chosen}}`` or the answer tags stays text.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, PromptTemplateError
from ..types import Message

__all__ = [
    "DEFAULT_PROMPTS",
    "Extraction",
    "PromptSet",
    "check_template",
    "extract_answer",
    "render",
    "render_conversation",
]

_PLACEHOLDER = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")

LOSS_TPO = """\
You are reviewing two candidate replies to the conversation below. An evaluator preferred \
reply A over reply B.

<conversation>
{{conversation}}
</conversation>

<reply_A>
{{chosen}}
</reply_A>

<reply_B>
{{rejected}}
</reply_B>

Compare the two replies. For each, name what it does well and where it falls short: \
accuracy, relevance to what was asked, completeness, clarity, tone and safety. Then explain \
what makes reply A the better one, and what reply A still gets wrong or leaves out. \
Be specific and brief. Do not write a new reply."""

LOSS_REVISION = """\
You are reviewing a reply to the conversation below.

<conversation>
{{conversation}}
</conversation>

<reply>
{{chosen}}
</reply>

Assess the reply: name what it does well and where it falls short on accuracy, relevance to \
what was asked, completeness, clarity, tone and safety. Be specific and brief. Do not write \
a new reply."""

GRADIENT = """\
Based on your assessment, give concrete instructions for improving the better reply (reply A, \
or the one reply if you reviewed only one) so that it meets those criteria better: what to \
add, remove, correct or restructure. Keep the instructions short and actionable. Do not write \
the improved reply yourself."""

UPDATE = """\
Improve a reply to the conversation below by following the feedback.

<conversation>
{{conversation}}
</conversation>

<current_reply>
{{chosen}}
</current_reply>

<assessment>
{{critique}}
</assessment>

<feedback>
{{feedback}}
</feedback>

Write a better reply to the last user message that keeps the strengths of the current reply \
and acts on the feedback. Reply with the improved text only, placed between <{{tag}}> and \
</{{tag}}>."""

_REQUIRED: dict[str, frozenset[str]] = {
    "loss_tpo": frozenset({"conversation", "chosen", "rejected"}),
    "loss_revision": frozenset({"conversation", "chosen"}),
    "gradient": frozenset(),
    "update": frozenset({"conversation", "chosen", "feedback", "tag"}),
}
_ALLOWED: dict[str, frozenset[str]] = {
    "loss_tpo": frozenset({"conversation", "chosen", "rejected"}),
    "loss_revision": frozenset({"conversation", "chosen"}),
    "gradient": frozenset({"conversation", "chosen", "rejected", "critique"}),
    "update": frozenset({"conversation", "chosen", "critique", "feedback", "tag"}),
}


def placeholders(template: str) -> set[str]:
    """The placeholder names a template uses."""
    return set(_PLACEHOLDER.findall(template))


def check_template(label: str, text: object, required: set[str]) -> str:
    """``text`` as a template that uses exactly the placeholders ``required``; else raise, naming it by ``label``.

    ``label`` opens each message (``"the judge's case template"``): a non-string raises
    ``ConfigError``, a missing or unknown placeholder ``PromptTemplateError``.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{label} must be a string, not {type(text).__name__}")
    found = placeholders(text)
    if found != required:
        wanted = " and ".join("{{" + n + "}}" for n in sorted(required))
        missing, unknown = sorted(required - found), sorted(found - required)
        raise PromptTemplateError(
            f"{label} must use {wanted}"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    return text


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{{name}}`` placeholders in one pass; raise if one has no value."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise PromptTemplateError(f"no value for placeholder {{{{{name}}}}}")
        return values[name]

    return _PLACEHOLDER.sub(sub, template)


def render_conversation(messages: tuple[Message, ...]) -> str:
    """The conversation as readable text for inclusion in a critique prompt.

    A single user turn is shown as its bare text; longer conversations are labelled by role.
    """
    if len(messages) == 1:
        return messages[0].content
    labels = {"system": "System instructions", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"[{labels[m.role]}]\n{m.content}" for m in messages)


@dataclass(frozen=True)
class PromptSet:
    """One template per role of the method, and the tag that delimits a rewritten answer."""

    loss_tpo: str = LOSS_TPO
    loss_revision: str = LOSS_REVISION
    gradient: str = GRADIENT
    update: str = UPDATE
    tag: str = "improved_reply"

    def __post_init__(self) -> None:
        for name, required in _REQUIRED.items():
            template = getattr(self, name)
            if not isinstance(template, str):
                raise PromptTemplateError(f"prompt template {name!r} must be a string, not {type(template).__name__}")
            if not template.strip():
                raise PromptTemplateError(f"prompt template {name!r} is empty")
            used = placeholders(template)
            missing = required - used
            if missing:
                raise PromptTemplateError(
                    f"prompt template {name!r} lacks the placeholder(s) "
                    + ", ".join(f"{{{{{m}}}}}" for m in sorted(missing))
                )
            unknown = used - _ALLOWED[name]
            if unknown:
                raise PromptTemplateError(
                    f"prompt template {name!r} uses unknown placeholder(s) "
                    + ", ".join(f"{{{{{u}}}}}" for u in sorted(unknown))
                    + f"; it may use {', '.join(sorted(_ALLOWED[name]))}"
                )
        if not isinstance(self.tag, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", self.tag):
            raise PromptTemplateError(f"answer tag {self.tag!r} must be a plain word (letters, digits, _ or -)")

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        """Read template overrides from a ``.toml`` or ``.json`` file; unnamed ones keep their default."""
        p = Path(path)
        try:
            raw = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read prompt file {p}: {e.strerror or e}") from e
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(raw)
            elif p.suffix.lower() == ".toml":
                if sys.version_info >= (3, 11):
                    import tomllib
                else:  # pragma: no cover - Python 3.10
                    import tomli as tomllib
                data = tomllib.loads(raw)
            else:
                raise ConfigError(f"prompt file {p}: expected a .toml or .json file")
        except (ValueError, TypeError) as e:
            raise ConfigError(f"prompt file {p} is not valid {p.suffix[1:].upper()}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"prompt file {p}: expected a table of templates at the top level")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"prompt file {p}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        try:
            return replace(cls(), **data)
        except PromptTemplateError as e:
            raise PromptTemplateError(f"prompt file {p}: {e}") from e

    def to_dict(self) -> dict[str, str]:
        """All templates by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULT_PROMPTS = PromptSet()

ExtractionKind = Literal["tagged", "unclosed", "unopened", "untagged"]


@dataclass(frozen=True, slots=True)
class Extraction:
    """The answer taken out of an update reply, and how it was found."""

    text: str
    kind: ExtractionKind

    @property
    def fallback(self) -> bool:
        """True when the reply did not hold a properly tagged answer."""
        return self.kind != "tagged"


def extract_answer(reply: str, tag: str) -> Extraction:
    """Take the rewritten answer out of an update reply.

    The text between the first opening tag and the last closing tag after it (so an answer
    that itself mentions the tags survives); failing that, everything after an unclosed
    opening tag, everything before a closing tag with no opening, or the whole reply.
    """
    open_t, close_t = f"<{tag}>", f"</{tag}>"
    start = reply.find(open_t)
    if start >= 0:
        body_start = start + len(open_t)
        end = reply.rfind(close_t)
        if end >= body_start:
            return Extraction(reply[body_start:end].strip(), "tagged")
        return Extraction(reply[body_start:].strip(), "unclosed")
    end = reply.rfind(close_t)
    if end >= 0:
        return Extraction(reply[:end].strip(), "unopened")
    return Extraction(reply.strip(), "untagged")
