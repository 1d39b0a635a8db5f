"""A reply's chat and markup around the prompt: stripped, and the prompt's own text kept."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from imagegen.enhance import clean_reply

PROMPT = "a red fox in a snowy birch forest, watercolor style"


@pytest.mark.parametrize(
    ("reply", "prompt"),
    [
        # A sign-off in bold, after a blank line, as a plain one is.
        (
            f"{PROMPT}\n\n**Note:** I added soft golden light. Let me know if you want changes!",
            PROMPT,
        ),
        (f"{PROMPT}\n\nNote: I focused on the winter mood.", PROMPT),
        (f"{PROMPT}\n\n__Note__: the style is loose.", PROMPT),
        (f"{PROMPT}\n\n*Let me know if you want any changes!*", PROMPT),
        (f"{PROMPT}\n\n_Enjoy!_", PROMPT),
        # After a single line break.
        (f"{PROMPT}\nLet me know if you want any changes!", PROMPT),
        (f"{PROMPT}  \nI hope this helps!", PROMPT),
        # After a horizontal rule, and the rule itself.
        (f"{PROMPT}\n\n---\n\nLet me know if you want any changes!", PROMPT),
        (f"{PROMPT}\n***\nEnjoy!", PROMPT),
        (f"{PROMPT}\n\n* * *\n\nFeel free to tweak it.", PROMPT),
        (f"{PROMPT}\n___", PROMPT),
        ("---\na red fox\n---", "a red fox"),
        # A tag around the prompt.
        (f"<prompt>{PROMPT}</prompt>", PROMPT),
        (f'<prompt lang="en">\n{PROMPT}\n</prompt>', PROMPT),
        (f'Here is your prompt: <answer>"{PROMPT}"</answer>', PROMPT),
        (f"<prompt>{PROMPT}</prompt>\n\nLet me know if you want any changes!", PROMPT),
        # Underscore emphasis and struck-out words (what a reader sees as deleted).
        ("a red fox, _soft_ light, ~~harsh~~", "a red fox, soft light"),
        ("a ~~dog~~ fox, ~~harsh light~~, _soft_ dawn", "a fox, soft dawn"),
        ("a __red__ fox in _fresh snow_", "a red fox in fresh snow"),
        # A struck span between words leaves a space, and the comma before it stays.
        ("soft ~~harsh~~light, a fox", "soft light, a fox"),
        ("soft light, ~~harsh shadows~~ gentle glow", "soft light, gentle glow"),
        ("a fox, ~~a wolf~~; snow", "a fox; snow"),
        ("a fox in ~~harsh~~.", "a fox in."),
        # A terminal's escape sequences, whole.
        ("\x1b[1ma red fox\x1b[0m in snow", "a red fox in snow"),
        (f"{PROMPT} \x00\x1b[31mred\x1b[0m", f"{PROMPT} red"),
        ("a \x1b[38;5;208morange\x1b[39m fox, \x1b[2Ksnow", "a orange fox, snow"),
    ],
)
def test_chat_and_markup_are_stripped(reply: str, prompt: str) -> None:
    assert clean_reply(reply) == prompt


@pytest.mark.parametrize(
    "prompt",
    [
        "a snake_case_word on a sign, a file_name label, soft light",
        "portrait, ~50mm to ~85mm lens, f/1.8, about ~1/250s",
        "a wavy ~~~ border ~~~ around a fox",
        "a fox ~ a wolf ~ an owl, triptych",
        "an _ underscore and a * star on a blackboard",
        "a blank ___ to fill in on an old form",
        "a red fox\nwith a note: pinned to a birch",
        "a neon sign that says let me know, on a brick wall",
        "a notebook full of notes, a desk, morning light",
        "a child's drawing: 3 < 4 > 2, crayon",
        "<b>Open</b> sign and <b>Closed</b> sign in a shop window",
        "a fox -- in the snow -- at dusk",
    ],
)
def test_a_prompts_own_text_is_kept(prompt: str) -> None:
    """Underscores and tildes inside words or alone, a note mid-sentence, tags that open and
    close only parts of it: the prompt's, every character."""
    assert clean_reply(prompt) == " ".join(prompt.split())


@pytest.mark.parametrize(
    ("reply", "prompt"),
    [
        # A line after a single line break is a sign-off only as the reply's last line, and
        # opening as a sentence does; a note only after a blank line.
        (
            "Subject: a red fox\nNote: orange fur\nStyle: watercolor\nLighting: golden hour",
            "a red fox, orange fur, watercolor, golden hour",
        ),
        (
            "A café chalkboard that reads:\nEnjoy your coffee!\nwarm light, bokeh",
            "A café chalkboard that reads: Enjoy your coffee! warm light, bokeh",
        ),
        (
            "A red fox in the snow,\nthis prompt-like poster style, golden hour",
            "A red fox in the snow, this prompt-like poster style, golden hour",
        ),
        ("A red fox\nwould you like to see a cat", "A red fox would you like to see a cat"),
        ("A greeting card:\nFeel free to smile", "A greeting card: Feel free to smile"),
        (
            "A sign that reads\nEnjoy your stay!\nwarm light, bokeh",
            "A sign that reads, Enjoy your stay! warm light, bokeh",
        ),
        (
            "A poster of a red fox\nThis prompt-like layout, golden hour",
            "A poster of a red fox, This prompt-like layout, golden hour",
        ),
        (
            f"{PROMPT}\nNotes: soft light suits the mood.",
            f"{PROMPT}, Notes: soft light suits the mood.",
        ),
    ],
)
def test_a_line_that_only_opens_like_a_sign_off_is_kept(reply: str, prompt: str) -> None:
    assert clean_reply(reply) == prompt


# Words as prompts have them: snake_case, a tilde before a number, plain words.
_WORD = st.from_regex(r"[a-z]{2,8}(?:_[a-z]{2,8}){0,2}|~[0-9]{1,3}mm|[a-z]{2,9}", fullmatch=True)
_SIGN_OFFS = [
    "Let me know if you want any changes!",
    "I hope this helps.",
    "Feel free to adjust the lighting.",
    "This prompt emphasises the mood.",
    "Note: I added soft golden light.",
    "Notes: warm tones.",
    "Enjoy!",
    "Would you like another version?",
]
_BREAKS = ["\n", "\n\n", " \n\t\n ", "\n\n---\n\n", "\n***\n", "\n\n_ _ _\n"]
_MARKERS = ["", "**", "__", "*", "_"]


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(_WORD, min_size=3, max_size=12),
    line_break=st.sampled_from(_BREAKS),
    sign_off=st.sampled_from(_SIGN_OFFS),
    marker=st.sampled_from(_MARKERS),
)
def test_a_sign_off_goes_and_the_prompt_stays(
    words: list[str], line_break: str, sign_off: str, marker: str
) -> None:
    """Whatever the prompt's words, a sign-off on a line of its own (bold or not, after a
    line break, a blank line or a rule; a note after a blank line or a rule) is stripped,
    and the prompt is kept whole."""
    prompt = " ".join(words)
    parts = re.match(r"(\w+(?: \w+)*:?)(.*)", sign_off, re.DOTALL)
    assert parts is not None
    opening, rest = parts.groups()
    assume(line_break != "\n" or not opening.startswith("Note"))
    reply = prompt + line_break + marker + opening + marker + rest
    assert clean_reply(prompt) == prompt
    assert clean_reply(reply) == prompt


@pytest.mark.parametrize(
    "reply",
    [
        "a" + " " * 15000 + "b",
        "a" + ", " * 7000 + "b",
        "~~a " * 4000,
        " _a" * 5000,
        "a" + " \n" * 7000 + "b",
        "\x1b[" * 7000 + "a",
        "<p>" * 5000 + "a",
        "a\n" + "- " * 7000 + "b",
        "a" + "\n" * 16000,
        "a" + "~" * 16000,
        "a ~~b~~" * 2300,
        "a" + "*" * 16000,
        "a" + "_" * 16000,
        "a\nnote:" * 2300,
        "a\n\nnote:" * 2000,
        "a\nEnjoy b" * 2000,
        "a\n" + "Enjoy " * 2700,
        "a" + ", ~~b" * 3000,
    ],
    ids=[
        *("spaces", "commas", "tildes", "underscores", "lines", "escapes", "tags", "rule"),
        *("line-breaks", "tilde-run", "struck", "stars", "underscore-run", "notes"),
        *("blank-notes", "sign-off-lines", "sign-off-words", "struck-after-commas"),
    ],
)
def test_stripping_is_linear_in_what_the_model_sends(reply: str) -> None:
    """The cleaning runs on the event loop: a generous bound that a pattern backtracking
    through a run of one character would pass far beyond."""
    started = time.perf_counter()
    clean_reply(reply)
    assert time.perf_counter() - started < 2.0
