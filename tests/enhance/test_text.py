"""Cleaning LLM replies and fitting prompts to a model's budget."""

from __future__ import annotations

import itertools
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from imagegen.enhance import clean_reply, estimate_tokens, fit_budget
from imagegen.enhance._template import DREAM_SUBJECTS, compose, dream_subject
from imagegen.enhance._text import unusable
from imagegen.models import Contribution
from imagegen.modelspec import FAMILIES, ModelFamily, family_for

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
        ("```json \r\na red fox\n```", "a red fox"),
        # A word glued to the backticks with no line break after it is the prompt's, not the
        # fence's language (Markdown's info string ends its line).
        ("```Misty harbour at dawn, oil painting```", "Misty harbour at dawn, oil painting"),
        ("```watercolour fox in snow\n```", "watercolour fox in snow"),
        # A list's items, and labelled lines, are clauses: not run together as one.
        ("- a red fox\n- snowy forest\n- morning light", "a red fox, snowy forest, morning light"),
        ("1. a red fox\n2) snow", "a red fox, snow"),
        (
            "**Subject:** A red fox\n**Setting:** a snowy birch forest\n**Light:** dawn",
            "A red fox, a snowy birch forest, dawn",
        ),
        ("Tokyo: a neon street at night", "Tokyo: a neon street at night"),  # one line: no label
        ("A red fox in the snow\nSoft dawn light", "A red fox in the snow, Soft dawn light"),
        ("A red fox, soft light.\nSnowy birches", "A red fox, soft light. Snowy birches"),
        # A negative prompt says what the image must not show: cut, not folded in.
        (
            "A red fox in the snow\n\nNegative prompt: blurry, lowres, watermark",
            "A red fox in the snow",
        ),
        ("A red fox in the snow. **Negative Prompt:** blurry", "A red fox in the snow."),
        ("A red fox (negative prompt: blurry, text)", "A red fox"),
        ("A red fox\nNegative: blurry", "A red fox"),
        # Midjourney's parameters are no words for a diffusion model.
        ("A red fox in the snow --ar 16:9 --v 6 --no text", "A red fox in the snow"),
        ("a fox -- in the snow", "a fox -- in the snow"),
        ("a red fox\n\nLet me know if you want any changes!", "a red fox"),
        ("a snake_case_word stays, 3 * 4 stays", "a snake_case_word stays, 3 * 4 stays"),
        ("   a   red\tfox  ", "a red fox"),
        ("a red fox\n \n\t\nI hope this helps", "a red fox"),
        # Quotes that open the first words and close the last are the prompt's own.
        (
            '"Starry Night" style painting of a fox named "Rusty"',
            '"Starry Night" style painting of a fox named "Rusty"',
        ),
        ("'Tis the season: a fox, 'cozy'", "'Tis the season: a fox, 'cozy'"),
        # A lead-in names what it introduces; "two foxes" is the subject.
        ("Here are two foxes: one red, one white", "Here are two foxes: one red, one white"),
        ("Here's a more detailed version: a red fox", "a red fox"),
        # Lead-ins: an interjection alone, a clause before "here is", a title line.
        ("Certainly! A red fox in snow", "A red fox in snow"),
        ("Sure thing,\nA red fox in snow", "A red fox in snow"),
        ("Of course!\n\nA red fox in snow", "A red fox in snow"),
        ("As requested, here is the prompt: a red fox in snow", "a red fox in snow"),
        ("Title: Winter Fox\n\nA red fox curled in snow", "A red fox curled in snow"),
        ("**Title:** Winter Fox\nA red fox curled in snow", "A red fox curled in snow"),
        # Several prompts announced: the first, not all of them run together.
        (
            "Here are three prompts:\n1. A red fox in snow\n2. A wolf\n3. An owl",
            "A red fox in snow",
        ),
        (  # a list inside one prompt, not several prompts
            "A triptych of three versions of a fox:\n1. in snow\n2. in rain",
            "A triptych of three versions of a fox: in snow, in rain",
        ),
        (
            "Sure!\n\nThree prompt options:\n\n1. **A red fox** in snow\n\n2. A wolf",
            "A red fox in snow",
        ),
    ],
)
def test_clean_reply(reply: str, prompt: str) -> None:
    assert clean_reply(reply) == prompt


@pytest.mark.parametrize(
    "reply",
    [
        "Certainly the finest fox in the snow",  # a word of the sentence, not an interjection
        "Great white shark under a red sky",
        "1990s street scene, neon signs",
        "Title card of a silent film, a fox in snow",
        "Title: Winter Fox",  # all there is
        "Certainly!",
        "A red fox, here is the den: a hollow under birch roots",
    ],
)
def test_clean_reply_keeps_every_word_of_a_prompt(reply: str) -> None:
    """What looks like a lead-in but is the prompt's own words stays: a word dropped from a
    prompt changes the image, a lead-in kept only adds a word."""
    words = re.findall(r"\w+", reply)
    assert re.findall(r"\w+", clean_reply(reply)) == words


@pytest.mark.parametrize(
    "reply",
    ["a" + "\n" * 3000 + "b", "a" + "\n " * 3000 + "b", " *a" * 20000, "**a" * 20000],
    ids=["line breaks", "blank lines", "stars", "double stars"],
)
def test_clean_reply_is_linear_in_what_the_model_sends(reply: str) -> None:
    """The cleaning runs on the event loop: patterns that backtrack held a worker for
    seconds to minutes on a few kilobytes (3,000 line breaks: minutes). A generous bound,
    far from those, catches their return."""
    started = time.perf_counter()
    cleaned = clean_reply(reply)
    assert time.perf_counter() - started < 2.0
    assert cleaned and "\n" not in cleaned


def test_estimate_is_conservative() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a cat") == 2
    assert estimate_tokens("light,") == 3
    assert estimate_tokens("photorealistic") == 4
    assert estimate_tokens("GT500") == 4  # a digit is a token (CLIP splits each off)
    assert estimate_tokens("狐") == 3  # a token per UTF-8 byte
    # Typical English runs about 1.3 real tokens a word; the estimate stays above that.
    text = "a quiet harbour at dawn with mist over the water and fishing boats returning home"
    assert estimate_tokens(text) >= 1.3 * len(text.split())


# Real CLIP token counts (without its start and end tokens) of these strings, computed once
# with open_clip's SimpleTokenizer (open_clip/tokenizer.py, bpe_simple_vocab_16e6.txt.gz, the
# vocabulary of openai/CLIP's simple_tokenizer.py): len(SimpleTokenizer().encode(text)).
# CLIP's pre-tokenizer splits off every digit (``[\p{N}]``), and its byte-level BPE spends up to
# a token per UTF-8 byte of a character it has few merges for: the estimate charges both.
_CLIP_COUNTS = {
    "a red fox in a snowy birch forest, soft morning light, watercolor": 14,
    "A 1967 Ford Mustang GT500 on Route 66 at 5:45 pm on 12/24/2024, 35mm f/1.8 1/250s ISO 400": 51,
    "1234567890 0.5 3.14159 1,000,000": 29,
    "café crème brûlée on a Parisian terrace, Zürich, São Paulo, naïve façade": 27,
    "一只毛色鲜红的小狐狸蜷缩在白雪覆盖的白桦林中央": 63,
    "富士山の夕焼け、桜の花びら、浮世絵スタイル": 39,
    "Красная лиса спит в снегу, акварель": 36,
    "Ωμέγα ἀλώπηξ ὕπνος": 34,
    "ثعلب أحمر نائم في الثلج": 22,
    "a fox 🦊 in the snow ❄️ with 🇯🇵 flag": 11,
    "portrait of Hokusai (葛飾北斎) painting the Great Wave off Kanagawa": 25,
}


@pytest.mark.parametrize(("text", "clip"), _CLIP_COUNTS.items(), ids=range(len(_CLIP_COUNTS)))
def test_estimate_is_at_least_clips_count_of_digits_and_other_scripts(text: str, clip: int) -> None:
    """A 1967 Ford … 12/24/2024 was estimated at 57 tokens, CLIP's 82 with its own two; 70
    Chinese characters at 65, CLIP's 176: a subject within the estimate overran CLIP's 77."""
    assert estimate_tokens(text) >= clip


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
    when = datetime(2026, 11, 24, 8, 15, tzinfo=UTC)
    assert dream_subject(5, when) == dream_subject(5, when) in DREAM_SUBJECTS
    off_the_tick = when + timedelta(minutes=7)
    assert len({dream_subject(s, off_the_tick) for s in range(50)}) > 10


# Prompts without spaces: CJK, emoji, one endless word. Each is cut inside, never emptied.
_UNSPACED_PROMPTS = [  # each over every family's budget
    "猫" * 600,
    "x" * 2400,
    "😀" * 600,
    "👨\u200d👩\u200d👧" * 120,  # family: three people joined by ZWJs
    "🇯🇵" * 300,  # flags: pairs of regional indicators
    "e\u0301" * 300,  # e and a combining acute accent
]


def _graphemes(text: str) -> list[str]:
    """UAX #29 grapheme clusters, as the ``regex`` package (diffusers' dependency) finds them."""
    import regex

    return list(regex.findall(r"\X", text))


def _whole_start(fitted: str, text: str) -> bool:
    """Whether ``fitted`` is ``text``'s start (spaces aside), ending between two of ``text``'s
    graphemes: as ``text`` has them, spaces and all (a mark after a space is that space's, not
    the grapheme's before it)."""
    end = 0
    for char in "".join(fitted.split()):
        while end < len(text) and text[end].isspace():
            end += 1
        if end == len(text) or text[end] != char:
            return False
        end += 1
    return end in {0, *itertools.accumulate(len(g) for g in _graphemes(text))}


@pytest.mark.parametrize("text", _UNSPACED_PROMPTS)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda spec: spec.name)
def test_fit_budget_cuts_inside_a_word_over_budget(text: str, spec: ModelFamily) -> None:
    budget = spec.prompt_tokens - spec.prompt_overhead
    for subject in (True, False):
        fitted = fit_budget(text, spec, subject=subject)
        assert fitted and _whole_start(fitted, text)
        assert estimate_tokens(fitted) <= budget
        if subject and spec.subject_tokens is not None:
            assert estimate_tokens(fitted) <= spec.subject_tokens - 2
        elif estimate_tokens(text) > budget:
            # What fits is kept: short of the budget by less than one more grapheme.
            grapheme = max(estimate_tokens(g) for g in _graphemes(text))
            assert estimate_tokens(fitted) > budget - grapheme
    # The pass-through and the template: the caller's prompt, cut; the fragments, dropped.
    prompt = compose(text, [Contribution(plugin="time_of_day", text="soft morning light")], spec)
    assert prompt and _whole_start(prompt.removesuffix(", soft morning light"), text)
    assert estimate_tokens(prompt) <= budget


def test_fit_budget_keeps_what_fits_of_cjk() -> None:
    prompt = "猫が窓辺で寝ている、柔らかい朝の光、浮世絵風"
    assert fit_budget(prompt, SCHNELL) == prompt
    # CJK punctuation ends a clause: the subject is the first, and the rest stays.
    # Each 猫 is three UTF-8 bytes, three tokens: 24 of them and the comma are CLIP's 75.
    assert fit_budget("猫" * 100 + "、柔らかい朝の光", SCHNELL) == "猫" * 24 + ", 柔らかい朝の光"
    # Text after words is cut inside too, when written without spaces: 2 + 3 * 84 <= 255.
    assert fit_budget("a cat " + "猫" * 300, SCHNELL, subject=False) == "a cat " + "猫" * 84
    # A Latin word is still kept whole or dropped.
    assert fit_budget("a " * 254 + "photorealistic", SCHNELL, subject=False) == "a " * 253 + "a"


_WORD_CHARS = st.characters(
    codec="utf-8",
    exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc"),
    exclude_characters=",;:\u3001\uff0c\uff1b\uff1a",
)
_WORDS = st.lists(
    st.text(_WORD_CHARS, min_size=1, max_size=600)
    | st.sampled_from(
        ["猫", "a", "photorealistic", "😀", "🇯🇵", "e\u0301", "👨\u200d👩\u200d👧"]
    ).map(lambda s: s * 40),
    min_size=1,
    max_size=12,
)
_SEPARATORS = st.sampled_from([" ", ", ", ". ", "、", "。", "; ", ""])


@settings(max_examples=150, deadline=None)
@example(  # a variation selector after a space: the space's, and the cut before it whole
    words=["0 0 0 0 0", "\U000e0100\u00a1 000", "猫" * 40, "🇭" * 30 + "🇳" * 40, "😀" * 40],
    separators=[". ", " ", " ", " ", *[""] * 8],
    spec=family_for("tiny-klein"),
    subject=False,
)
@given(
    words=_WORDS,
    separators=st.lists(_SEPARATORS, min_size=12, max_size=12),
    spec=st.sampled_from(FAMILIES),
    subject=st.booleans(),
)
def test_fit_budget_properties(
    words: list[str], separators: list[str], spec: ModelFamily, subject: bool
) -> None:
    text = "".join(w + s for w, s in zip(words, separators, strict=False))[:2000]
    fitted = fit_budget(text, spec, subject=subject)
    assert fitted  # the caller gave a prompt: one comes back
    assert estimate_tokens(fitted) <= spec.prompt_tokens - spec.prompt_overhead
    if subject and spec.subject_tokens is not None:
        first = re.split(
            r"(?<=[,.;:!?])\s|(?<=[\u3001\u3002\uff0c\uff1b\uff1a\uff01\uff1f])", fitted
        )[0]
        assert estimate_tokens(first) <= spec.subject_tokens - 2
    else:
        assert _whole_start(fitted, text)
    assert fit_budget(fitted, spec, subject=subject) == fitted


def test_a_reply_follows_the_prompt_rule_of_a_request() -> None:
    """What a request may not hold is dropped from a reply (an escape sequence, a right-to-left
    override); its tabs and line breaks end as spaces, so the reply is a valid request's prompt."""
    from imagegen.models import GenerationRequest

    reply = "a red\x1b fox\u202e in\tthe\r\nsnow\x85 at\x00 dusk\u2066, \x7fink\u2069 wash\x0c"
    cleaned = clean_reply(reply)
    assert cleaned == "a red fox in the snow at dusk, ink wash"
    assert GenerationRequest(prompt=cleaned).prompt == cleaned


def test_a_plugins_fragment_follows_the_prompt_rule_of_a_request() -> None:
    """A plugin's text (a remote endpoint's value, say) reaches the template prompt as a
    request's prompt would: what a request may not hold dropped (a terminal's escape sequence
    whole, not its ESC alone), line breaks as spaces."""
    from imagegen.models import GenerationRequest

    odd = Contribution(plugin="remote_context", text="snow\x1b[31m\u202estorm\non\tthe\x85 hills")
    prompt = compose("a fox", [odd], family_for("tiny"))
    assert prompt == "a fox, snowstorm on the hills"
    assert GenerationRequest(prompt=prompt).prompt == prompt


@pytest.mark.parametrize(
    ("reply", "prompt"),
    [
        (  # a numbered list of whole prompts, no lead-in: alternatives, the first kept
            "1. A red fox asleep in fresh snow, soft light.\n"
            "2. A grey wolf howling at a full moon, night.",
            "A red fox asleep in fresh snow, soft light.",
        ),
        (
            "Option 1: A red fox asleep in fresh snow, soft light. "
            "Option 2: A red fox hunting at dusk, dramatic sky.",
            "A red fox asleep in fresh snow, soft light.",
        ),
        (
            "**Option 1:** A red fox asleep in snow\n**Option 2:** A wolf at night",
            "A red fox asleep in snow",
        ),
        (
            "A red fox asleep in fresh snow, soft light.\n\n"
            "Alternatively: A red fox hunting at dusk under a dramatic sky.",
            "A red fox asleep in fresh snow, soft light.",
        ),
        (
            "A red fox asleep in fresh snow. Alternatively, a fox hunting at dusk.",
            "A red fox asleep in fresh snow.",
        ),
        # Parts of one prompt, numbered: joined, as before.
        ("1. a red fox\n2. snowy birch forest\n3. dawn", "a red fox, snowy birch forest, dawn"),
        (  # whole scenes, each named (not a field of one prompt): the first
            "1. Morning: a red fox asleep in fresh snow, soft light.\n"
            "2. Night: a grey wolf howling at a full moon, stars.",
            "Morning: a red fox asleep in fresh snow, soft light.",
        ),
        # Titles that end in a field's word name alternatives, not fields.
        (
            "1. Serene Mountain Scene: A serene mountain lake at sunrise, mist over the water, "
            "photorealistic.\n"
            "2. Dramatic Storm Scene: A lighthouse battered by waves under storm clouds, "
            "cinematic.",
            "Serene Mountain Scene: A serene mountain lake at sunrise, mist over the water, "
            "photorealistic.",
        ),
        (
            "1. Soft Light: A red fox sleeping in snow, soft morning light, shallow depth of "
            "field.\n"
            "2. Dramatic Light: A red fox on a ridge at sunset, backlit fur, epic.",
            "Soft Light: A red fox sleeping in snow, soft morning light, shallow depth of field.",
        ),
        (  # one field's name twice: two versions of it, not two fields
            "1. Subject: a red fox curled asleep in fresh snow, eyes closed.\n"
            "2. Subject: a grey wolf howling at a full moon, night.",
            "Subject: a red fox curled asleep in fresh snow, eyes closed.",
        ),
    ],
)
def test_clean_reply_keeps_the_first_of_several_alternatives(reply: str, prompt: str) -> None:
    assert clean_reply(reply) == prompt


@pytest.mark.parametrize(
    "reply",
    [
        "I'm afraid I can't help with that request.",
        "Unfortunately I cannot create that image as it depicts a real person.",
        "I must decline to create this prompt because it involves violence.",
        "I'm not comfortable generating a prompt for that kind of content.",
        "This request goes against my guidelines, so I will not write it.",
        "Sorry but that is not something I can draw for you.",
        "I won't write a prompt that shows a real person.",
        "Sadly this is something I am unable to help with.",
        "Sorry, I can only describe images that are safe for everyone.",
        "Unfortunately, that is not something I can write.",
        "As an AI, I do not make prompts about real people.",
        "We can't create that image.",
        "Creating this violates the content policy of the service.",
        # Without the first person: a declining verb after "Sorry", a decline in a sentence
        # that "Unfortunately" opens, the request breaking the model's own rules.
        "Sorry, can't help with that.",
        "Sorry, cannot help with this request.",
        "Sorry \u2013 can't do that one.",
        "Unfortunately the request cannot be fulfilled.",
        "Unfortunately that is not something that can be generated.",
        "This violates the safety guidelines.",
        "This goes against the safety policy I follow.",
        "That goes against my rules, so I will pass.",
        "Creating this would violate the safety guidelines.",
    ],
)
def test_a_refusal_is_unusable(reply: str) -> None:
    assert unusable(clean_reply(reply)) == "a refusal"


@pytest.mark.parametrize(
    "reply",
    [
        "1. Subject: a red fox curled asleep in fresh snow, eyes closed.\n"
        "2. Setting: a pine forest at dawn, mist drifting between trees.\n"
        "3. Lighting: soft golden backlight, long shadows, cinematic.",
        "1. Main subject: a red fox curled asleep in fresh snow, eyes closed.\n"
        "2. Art style: a watercolor wash on rough paper, muted colours.",
    ],
)
def test_clean_reply_joins_the_numbered_fields_of_one_prompt(reply: str) -> None:
    """Numbered lines that open with a field of the image (``Subject:``, ``Setting:``) are the
    parts of one prompt, however whole each reads: all of them are kept."""
    items = [line.split(". ", 1)[1] for line in reply.split("\n")]
    assert clean_reply(reply) == " ".join(items)


@pytest.mark.parametrize(
    "reply",
    [
        "Sure, here's a more detailed version of your idea that keeps the subject.",
        "Here is an enhanced prompt that keeps your subject and intent.",
        "This is the prompt you asked for, with more detail.",
        "I have written a rewrite that keeps your idea.",
        "Here's a more detailed version.",
    ],
)
def test_meta_text_with_no_prompt_is_unusable(reply: str) -> None:
    assert unusable(clean_reply(reply)) == "meta text, no prompt"


@pytest.mark.parametrize(
    "prompt",
    [
        "a lonely robot unable to fly, rain",
        "a sad clown who cannot help smiling, circus tent, dusk",
        "A red fox asleep in snow. A sign behind it reads: sorry, I can't help with that.",
        "a knight who refuses to decline a duel, against the rules of the tournament",
        "Here is the fox den, a hollow under birch roots, soft light",
        # Words of a refusal not opening the reply, or not the first person's: the image's.
        "A teenage skateboarder breaks the safety rules in an abandoned pool, golden hour, film "
        "grain",
        "A punk rebel who breaks our rules, neon alley at night, rain, cinematic",
        "Unfortunately lit diner at 3am, lone waitress, Edward Hopper style, muted colours",
        "A sign that reads I can't stop now, hand painted on a brick wall, warm afternoon light",
        "A wizard who cannot create these potions fast enough, cluttered lab, candlelight, "
        "fantasy art",
        "Sorry Mr Bean, a comic portrait of a clumsy man in a tweed jacket, watercolor",
        # A sign's or a motto's words, quoted, in a description.
        "A shop window with a sign reading 'Unfortunately, we cannot help you today', dusty "
        "office, film grain.",
        "A tired barista behind a counter with a handwritten sign: 'We can't make this any "
        "faster', cozy cafe.",
        "A neon sign in a dive bar that says \u201cI can't make this up\u201d, moody, rain on "
        "the window.",
        "A toddler in a high chair, speech bubble saying I won't make that mess again, cartoon",
        "A child who will not eat this broccoli, sitting at a kitchen table, comic style",
        # "version", "ideas" naming the image's things, not the reply or the user's idea.
        "This is a steampunk version of the Eiffel Tower at dusk, brass gears glowing, warm "
        "cinematic light",
        "Here is a weathered lighthouse keeper reading old letters and ideas by candlelight, oil "
        "painting",
    ],
)
def test_a_prompt_with_a_refusals_words_is_usable(prompt: str) -> None:
    """Words of a refusal in the image itself, or past the first sentence, are the prompt's."""
    assert unusable(clean_reply(prompt)) is None


@pytest.mark.parametrize(
    "reply",
    ["I " * 8000, "I am " * 3000, "we really " * 1600, "Here is " + "your the " * 1700],
    ids=["I", "I am", "we really", "your the"],
)
def test_unusable_is_linear_in_what_the_model_sends(reply: str) -> None:
    """It runs on the event loop, on up to 16,000 characters: a run of first persons ("I I
    I …") made the refusal search quadratic (15 s). A generous bound, far from that."""
    started = time.perf_counter()
    unusable(reply)
    assert time.perf_counter() - started < 2.0
