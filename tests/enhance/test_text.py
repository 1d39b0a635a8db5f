"""Cleaning LLM replies and fitting prompts to a model's budget."""

from __future__ import annotations

import pytest

from imagegen.enhance import clean_reply, estimate_tokens, fit_budget
from imagegen.enhance._template import DREAM_SUBJECTS, compose, dream_subject
from imagegen.models import Contribution
from imagegen.modelspec import family_for

SCHNELL = family_for("black-forest-labs/FLUX.1-schnell")
DEV = family_for("black-forest-labs/FLUX.1-dev")


@pytest.mark.parametrize(
    ("reply", "prompt"),
    [
        ("a red fox in the snow", "a red fox in the snow"),
        ('"a red fox in the snow"', "a red fox in the snow"),
        ("\u201ca red fox\u201d", "a red fox"),
        ("Here is your prompt: a red fox", "a red fox"),
        ("Sure! Here's an enhanced version of your prompt:\n\n'a red fox'", "a red fox"),
        ("Prompt: a red fox", "a red fox"),
        ("**Enhanced prompt:** a **red** fox, *soft* light", "a red fox, soft light"),
        ("# A fox\n\na red fox\nin the snow", "a red fox in the snow"),
        ("```\na red fox\n```", "a red fox"),
        ('```text\n"a red fox"\n```', "a red fox"),
        ("- a red fox\n- snowy forest\n- morning light", "a red fox snowy forest morning light"),
        ("1. a red fox\n2) snow", "a red fox snow"),
        ("a red fox\n\nLet me know if you want any changes!", "a red fox"),
        ("a snake_case_word stays, 3 * 4 stays", "a snake_case_word stays, 3 * 4 stays"),
        ("   a   red\tfox  ", "a red fox"),
    ],
)
def test_clean_reply(reply: str, prompt: str) -> None:
    assert clean_reply(reply) == prompt


def test_estimate_is_conservative() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a cat") == 2
    assert estimate_tokens("light,") == 3
    assert estimate_tokens("photorealistic") == 4
    # Typical English runs about 1.3 real tokens a word; the estimate stays above that.
    text = "a quiet harbour at dawn with mist over the water and fishing boats returning home"
    assert estimate_tokens(text) >= 1.3 * len(text.split())


def test_fit_budget_keeps_short_prompts() -> None:
    assert fit_budget("a red fox, soft light.", SCHNELL) == "a red fox, soft light."


def test_fit_budget_drops_trailing_clauses_past_t5() -> None:
    clauses = [f"detail number {i} with several extra words" for i in range(200)]
    text = "a red fox, " + ", ".join(clauses)
    for spec in (SCHNELL, DEV):
        fitted = fit_budget(text, spec)
        assert estimate_tokens(fitted) <= spec.prompt_tokens - 1
        assert fitted.startswith("a red fox, detail number 0")
        assert fitted.endswith("extra words")  # ends on a whole clause
    assert len(fit_budget(text, DEV)) > len(fit_budget(text, SCHNELL))


def test_fit_budget_keeps_the_subject_within_clip() -> None:
    subject = "a fox " + "with a very long tail " * 30
    fitted = fit_budget(subject + ", soft light", SCHNELL)
    first = fitted.split(",")[0]
    assert estimate_tokens(first) <= SCHNELL.subject_tokens - 2
    assert fitted.endswith(", soft light")
    # Without the subject rule, only T5's budget applies.
    assert (
        fit_budget(subject + ", soft light", SCHNELL, subject=False)
        == (subject + ", soft light").strip()
    )


def test_fit_budget_cuts_one_endless_clause() -> None:
    fitted = fit_budget("word " * 1000, SCHNELL, subject=False)
    assert 0 < estimate_tokens(fitted) <= SCHNELL.prompt_tokens - 1


def test_template() -> None:
    contributions = [
        Contribution(plugin="time_of_day", text="soft morning light"),
        Contribution(plugin="lora", text=""),
        Contribution(plugin="echo", text="soft morning light"),
        Contribution(plugin="art_style", text="Ukiyo-e style, flat colour"),
    ]
    assert (
        compose("a red fox", contributions, SCHNELL)
        == "a red fox, soft morning light, Ukiyo-e style, flat colour"
    )
    assert dream_subject(5) == dream_subject(5) in DREAM_SUBJECTS
    assert len({dream_subject(s) for s in range(50)}) > 10
