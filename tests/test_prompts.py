"""Prompt templates: snapshots of the defaults, rendering, answer extraction, and loading user overrides.

Snapshots live in ``tests/snapshots``. After changing a template on purpose, regenerate them with
``TPO_UPDATE_SNAPSHOTS=1 pytest tests/test_prompts.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import tpo
from tpo import DEFAULT_PROMPTS, Message, PromptSet, PromptTemplateError, extract_answer
from tpo.engine.prompts import placeholders, render, render_conversation
from tpo.testing import FunctionReward, ScriptedPolicy

SNAPSHOTS = Path(__file__).parent / "snapshots"

CONVERSATION = (
    Message("system", "You are a careful assistant."),
    Message("user", "How do I boil an egg?"),
    Message("assistant", "Soft or hard?"),
    Message("user", "Hard, please."),
)
VALUES = {
    "conversation": render_conversation(CONVERSATION),
    "chosen": "Put the egg in boiling water for 10 minutes, then cool it in cold water.",
    "rejected": "Microwave it for five minutes.",
    "critique": "The chosen reply is safe and correct; the rejected one risks the egg bursting.",
    "feedback": "Say to lower the egg gently, and give a range of times for egg sizes.",
    "tag": DEFAULT_PROMPTS.tag,
}


def _check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("TPO_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if not path.exists():
        pytest.fail(f"no snapshot {path}; create it with TPO_UPDATE_SNAPSHOTS=1")
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} changed; if on purpose, regenerate with TPO_UPDATE_SNAPSHOTS=1 and review"


@pytest.mark.parametrize("template", ["loss_tpo", "loss_revision", "gradient", "update"])
def test_default_template_snapshot(template: str) -> None:
    rendered = render(getattr(DEFAULT_PROMPTS, template), VALUES)
    _check_snapshot(f"{template}.txt", rendered)


def test_the_requests_of_a_whole_run_snapshot() -> None:
    """Pins what the engine sends, in order: templates, the loss conversation, tags, roles, n."""
    policy = ScriptedPolicy()
    reward = FunctionReward(lambda m, a: float(a.count("1")))  # sample 1 beats sample 0: a TPO step
    tpo.optimize([m.as_dict() for m in CONVERSATION], policy=policy, reward=reward, width=2, depth=1)
    calls = [
        {"purpose": r.purpose, "step": r.step, "n": r.n, "messages": r.messages_as_dicts()} for r in policy.requests
    ]
    _check_snapshot("run_requests.json", json.dumps(calls, indent=2, ensure_ascii=False) + "\n")


def test_the_templates_follow_the_method() -> None:
    loss = render(DEFAULT_PROMPTS.loss_tpo, VALUES)
    assert VALUES["chosen"] in loss and VALUES["rejected"] in loss
    assert loss.index(VALUES["chosen"]) < loss.index(VALUES["rejected"])
    assert "Do not write a new reply" in loss
    revision = render(DEFAULT_PROMPTS.loss_revision, VALUES)
    assert VALUES["chosen"] in revision and VALUES["rejected"] not in revision
    assert "Do not write the improved reply" in DEFAULT_PROMPTS.gradient
    update = render(DEFAULT_PROMPTS.update, VALUES)
    for key in ("chosen", "critique", "feedback"):
        assert VALUES[key] in update
    assert f"<{DEFAULT_PROMPTS.tag}>" in update and f"</{DEFAULT_PROMPTS.tag}>" in update
    assert VALUES["rejected"] not in update


# --------------------------------------------------------------------------- rendering


def test_render_is_one_pass_so_values_stay_text() -> None:
    out = render("A={{a}} B={{ b }}", {"a": "{{b}}", "b": "<improved_reply>{{a}}"})
    assert out == "A={{b}} B=<improved_reply>{{a}}"


def test_render_without_a_value_raises() -> None:
    with pytest.raises(PromptTemplateError, match=r"\{\{missing\}\}"):
        render("{{missing}}", {})


def test_render_conversation() -> None:
    assert render_conversation((Message("user", "hi"),)) == "hi"
    assert render_conversation(CONVERSATION) == (
        "[System instructions]\nYou are a careful assistant.\n\n[User]\nHow do I boil an egg?\n\n"
        "[Assistant]\nSoft or hard?\n\n[User]\nHard, please."
    )


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("reply", "text", "kind"),
    [
        ("<t>answer</t>", "answer", "tagged"),
        ("Sure!\n<t>\n  answer\n</t>\nanything else?", "answer", "tagged"),
        ("<t>use <t> and </t> to tag</t>", "use <t> and </t> to tag", "tagged"),
        ("<t>first</t> and <t>second</t>", "first</t> and <t>second", "tagged"),
        ("<t>never closed", "never closed", "unclosed"),
        ("</t>closing before<t>opening", "opening", "unclosed"),
        ("only closing</t> trailing", "only closing", "unopened"),
        ("no tags at all", "no tags at all", "untagged"),
        ("<T>other case</T>", "<T>other case</T>", "untagged"),
        ("", "", "untagged"),
        ("<t></t>", "", "tagged"),
        ("<t>😀 中文 עברית e\u0301 \x00</t>", "😀 中文 עברית e\u0301 \x00", "tagged"),
    ],
)
def test_extract_answer(reply: str, text: str, kind: str) -> None:
    ex = extract_answer(reply, "t")
    assert (ex.text, ex.kind) == (text, kind)
    assert ex.fallback == (kind != "tagged")


# --------------------------------------------------------------------------- user overrides


def test_prompt_set_load_toml_overrides_some_templates(tmp_path: Path) -> None:
    path = tmp_path / "prompts.toml"
    path.write_text(
        'tag = "answer"\ngradient = "How should the preferred reply change? {{critique}}"\n',
        encoding="utf-8",
    )
    prompts = PromptSet.load(path)
    assert prompts.tag == "answer"
    assert prompts.gradient.startswith("How should")
    assert prompts.loss_tpo == DEFAULT_PROMPTS.loss_tpo


def test_prompt_set_load_json(tmp_path: Path) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"loss_revision": "Judge {{chosen}} for {{conversation}}."}), encoding="utf-8")
    assert PromptSet.load(path).loss_revision == "Judge {{chosen}} for {{conversation}}."


def test_custom_prompts_are_used_by_the_engine(tmp_path: Path) -> None:
    path = tmp_path / "prompts.toml"
    path.write_text(
        'tag = "final"\n'
        'update = """MY UPDATE for {{conversation}}: improve {{chosen}} per {{feedback}}; answer between <{{tag}}> and </{{tag}}>."""\n',
        encoding="utf-8",
    )
    policy = ScriptedPolicy()  # writes its rewrites between the tags the update prompt names
    result = tpo.optimize(
        "q", policy=policy, reward=FunctionReward(lambda m, a: 1.0), width=2, depth=1, prompts=PromptSet.load(path)
    )
    update = policy.requests_for("update")[0].messages[0].content
    assert update.startswith("MY UPDATE for q: improve Answer 0") and "<final>" in update
    assert result.steps[1].extraction == {"tagged": 2}
    assert result.config["prompts"]["tag"] == "final"


@pytest.mark.parametrize(
    ("template", "value", "message"),
    [
        (
            "update",
            "Improve {{chosen}} per {{feedback}} in <{{tag}}>.",
            r"lacks the placeholder\(s\) \{\{conversation\}\}",
        ),
        ("loss_tpo", "Compare {{chosen}} with {{conversation}}.", r"lacks the placeholder\(s\) \{\{rejected\}\}"),
        ("loss_revision", "{{chosen}} {{conversation}} {{rejected}}", r"unknown placeholder\(s\) \{\{rejected\}\}"),
        ("gradient", "Fix {{answer}}", r"unknown placeholder\(s\) \{\{answer\}\}"),
        ("gradient", "   ", "is empty"),
        ("gradient", 3, "must be a string"),
    ],
)
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_prompt_set_load_names_the_template_and_the_file(
    tmp_path: Path, template: str, value: object, message: str, suffix: str
) -> None:
    path = tmp_path / f"my-prompts{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({template: value}), encoding="utf-8")
    else:  # a JSON string or number is also a TOML one
        path.write_text(f"{template} = {json.dumps(value)}\n", encoding="utf-8")
    with pytest.raises(PromptTemplateError, match=message) as info:
        PromptSet.load(path)
    assert str(path) in str(info.value)
    assert repr(template) in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.toml", 'lose_tpo = "x"', r"unknown key\(s\) lose_tpo"),
        ("p.toml", "gradient = ", "is not valid TOML"),
        ("p.json", "{not json", "is not valid JSON"),
        ("p.json", "[1, 2]", "expected a table"),
        ("p.yaml", "gradient: x", "expected a .toml or .json file"),
        ("p.toml", 'tag = "two words"', "must be a plain word"),
        ("p.toml", "tag = 5", "must be a plain word"),
    ],
)
def test_prompt_set_load_errors_are_config_errors_naming_the_file(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(tpo.ConfigError, match=message) as info:
        PromptSet.load(path)
    assert str(path) in str(info.value)


def test_prompt_set_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(tpo.ConfigError, match="cannot read prompt file"):
        PromptSet.load(tmp_path / "nope.toml")


def test_prompt_set_validates_on_construction() -> None:
    with pytest.raises(PromptTemplateError, match="'update' lacks"):
        PromptSet(update="no placeholders at all")
    assert placeholders(DEFAULT_PROMPTS.update) == {"conversation", "chosen", "critique", "feedback", "tag"}
    assert PromptSet(**DEFAULT_PROMPTS.to_dict()) == DEFAULT_PROMPTS
