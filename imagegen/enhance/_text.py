"""Cleaning an LLM's reply into a bare prompt, and fitting prompts to a model's budget.

No tokenizer is loaded in the enhance stage (it must stay light), so token counts are
estimated: one token per started four letters of each run of ASCII letters, one per digit and
per ASCII punctuation mark, and one per UTF-8 byte of any other character. English words
average about 1.3 tokens in CLIP's and Qwen3's BPE and T5's SentencePiece, and this count is
higher for nearly every word (``light`` → 2, ``photorealistic`` → 4). CLIP's pre-tokenizer
splits every digit off on its own (``[\\p{N}]`` in its pattern: ``simple_tokenizer.py`` in
openai/CLIP, ``tokenizer.py`` in open_clip), as Qwen's does, so ``2024`` is four tokens; and a
byte-level BPE spends at most one token per byte of a character it has no merge for (``狐`` is
three bytes, and often three tokens). So a prompt that fits the estimate fits the real
tokenizers.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Iterable

from imagegen.models import PROMPT_REFUSED_CHARACTERS
from imagegen.modelspec import ModelFamily

__all__ = ["clean_reply", "echoes", "estimate_tokens", "fit_budget", "join_fragments", "unusable"]

# Tab, line feed and carriage return: spaces, as in a request's prompt.
_SPACES = str.maketrans("\t\n\r", "   ")

# A run of ASCII letters, or one other character that is no space.
_PIECE = re.compile(r"[A-Za-z]+|[^\sA-Za-z]")
# Clauses end at ``, . ; : ! ?`` before a space, or at CJK punctuation (ideographic comma and
# full stop, fullwidth , ; : ! ?), which takes none.
_CJK_CLAUSE_MARKS = "\u3001\u3002\uff0c\uff1b\uff1a\uff01\uff1f"
_CLAUSE_END = re.compile(rf"((?<=[,.;:!?])\s+|(?<=[{_CJK_CLAUSE_MARKS}])\s*)")
_TRAILING = ",;: \u3001\uff0c\uff1b\uff1a"  # stripped from a prompt's end
# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, CJK, kana): a
# space-free run in them is a sentence, and is cut inside rather than dropped whole.
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3000-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff]"
)
_ASCII_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# A code fence's backticks; the word after them is its language only where the line ends
# there (```json), as Markdown reads an info string: "```Misty harbour```" keeps "Misty".
_FENCE = re.compile(r"```(?:[\w+.-]*[ \t]*(?=\r?\n))?")
_HEADING = re.compile(r"(?m)^[ \t]*#{1,6}[ \t].*$")
_LINE_MARKUP = re.compile(r"(?m)^[ \t]*(?:#{1,6}[ \t]+|>[ \t]?|[-*+•][ \t]+|\d{1,2}[.)][ \t]+)")
# Spans bounded in length: an unbounded lazy span makes each unmatched marker scan the rest
# of the reply (quadratic: 20,000 stars took 17 s).
_STRONG = re.compile(r"(\*\*|__)(.{1,300}?)\1", re.DOTALL)
# ``*soft*`` or ``_soft_``: the marker opening after no word character and before no space,
# and closing after a space-free character and before no word character, so that ``3 * 4``,
# a snake_case_word and ``a blank ___ to fill`` stay.
_EMPHASIS = re.compile(r"(?<![\w*])([*_])(?!\s|\1)(.{1,300}?)(?<=\S)\1(?![\w*])", re.DOTALL)
# ``~~harsh~~``: struck out, so what a reader sees as deleted. Two tildes, not one:
# ``~50mm to ~85mm`` is a prompt's. The comma or semicolon before it (its group) goes with it
# where a mark or the line's end follows it (``soft, ~~harsh~~, light`` is ``soft, light``);
# elsewhere the words around it stay apart and the mark stays (``soft light, ~~harsh~~ glow``
# is ``soft light, glow``, ``soft ~~harsh~~light`` is ``soft light``).
_STRUCK = re.compile(
    r"(?<![ \t])((?:[ \t]*+[,;])?[ \t]*+)(?<!~)~~(?=[^\s~])(?:.{1,300}?)(?<=[^\s~])~~(?!~)"
)
_ENDS_STRUCK = re.compile(r"[ \t]*+(?:[,.;:!?]|$)", re.MULTILINE)
# A thematic break (``---``, ``***``, ``* * *``, ``___``) on a line of its own: Markdown's
# separator, often between the prompt and a sign-off.
_RULE = re.compile(r"^[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*$", re.MULTILINE)
# A terminal's escape sequence (ECMA-48's CSI: ``ESC [``, parameter and intermediate bytes,
# a final byte; ``\x1b[1m`` bold, ``\x1b[0m`` reset): dropped whole, since only its ESC is
# a character that a request may not hold.
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# A tag around all of the reply (``<prompt>…</prompt>``, ``<answer lang="en">…</answer>``).
_TAGGED = re.compile(r"<([A-Za-z][\w-]*)(?:[ \t][^<>]*)?>(.*)</\1[ \t]*>", re.DOTALL)
# "Certainly!", "Sure thing," opening a reply: with the mark after it, never a prompt's word
# ("Certainly the finest fox" keeps it).
_INTERJECTION = (
    r"(?:sure(?: thing)?|okay|ok|certainly|of course|absolutely|alright|all right|great"
    r"|gladly|yes|happy to help|here you go)[!,.]"
)
_PREAMBLE = re.compile(
    rf"^\s*(?:{_INTERJECTION}\s*|(?:sure|okay|ok|certainly|of course|absolutely)\b\s*)?"
    # "Here is your enhanced prompt:", not "Here are two foxes:": the lead-in names what
    # it introduces; a short clause may open it ("As requested, here is the prompt:").
    r"(?:(?:[a-z]+[ \t]){0,3}[a-z]+,[ \t]*)?"
    r"(?:here(?:'s|\u2019s| is| are)\b[^:\n]{0,100}?"
    r"\b(?:prompts?|descriptions?|versions?|rewrites?|captions?)\b[^:\n]{0,40}:"
    r"|(?:\w+\s){0,2}prompt\s*:)\s*",
    re.IGNORECASE,
)
# An interjection alone before the prompt ("Certainly! A red fox").
_INTERJECTED = re.compile(rf"^\s*{_INTERJECTION}\s*(?=\S)", re.IGNORECASE)
# A title line above the prompt ("Title: Winter Fox", "**Title:** …"): a name, not the image.
_TITLE = re.compile(r"\A\s*title[ \t]*:[^\n]*\n\s*(?=\S)", re.IGNORECASE)
# The reply's first line announcing several prompts before a numbered list of them: one
# prompt is wanted, and the first is the one the model led with.
# A lead-in ("Here are three prompts you could use:") or a short label ("Three options:"), not
# a prompt that has a list ("A triptych of three versions of a fox:").
_SEVERAL = re.compile(
    rf"\A\s*(?:{_INTERJECTION}\s*)?"
    r"(?:here(?:'s|\u2019s| is| are)\b[^:\n]{0,60}?|(?:\w+[ \t]){0,2})"
    r"\b(?:prompts|options|variations|versions|alternatives|descriptions|captions)\b"
    r"[^:\n]{0,40}:[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBERED = re.compile(r"^[ \t]*(\d{1,2})[.)][ \t]+", re.MULTILINE)
# The label opening a list item ("Subject: …", "Serene Mountain Scene: …"), and the labels
# that name a field of one prompt: a bare field, or one of the usual two-word ones. Items
# labelled with them are the parts of one prompt, however whole each reads; a title that only
# ends in a field's word ("Dramatic Storm Scene:", "Soft Light:") names an alternative.
_LABELLED = re.compile(r"([A-Za-z]+(?:[ \t][A-Za-z]+){0,2})[ \t]*:")
_FIELDS = frozenset(
    {
        *("subject", "setting", "scene", "background", "foreground", "environment", "location"),
        *("lighting", "light", "style", "medium", "composition", "framing", "mood"),
        *("atmosphere", "tone", "color", "colors", "colour", "colours", "palette", "camera"),
        *("lens", "angle", "shot", "perspective", "detail", "details", "texture", "textures"),
        *("weather", "time of day", "pose", "action", "character", "quality"),
        *("main subject", "art style", "visual style", "artistic style", "color palette"),
        *("colour palette", "color scheme", "colour scheme", "camera angle", "camera lens"),
        *("shot type", "lighting style", "key details", "additional details", "art medium"),
    }
)
# "Option 1: … Option 2: …", on one line or several: the first option.
_OPTIONS = re.compile(
    r"\A\s*option[ \t]*1[ \t]*[:.)][ \t]*(\S.*?)\s*\boption[ \t]*2[ \t]*[:.)]",
    re.IGNORECASE | re.DOTALL,
)
# "Alternatively: …" (or "Alternatively, …") opening a line or a sentence after a prompt.
_ALTERNATIVELY = re.compile(
    r"(?:^|(?<=[.!?])[ \t]+)[ \t]*(?:or[ \t]+)?alternatively[ \t]*[:,]",
    re.IGNORECASE | re.MULTILINE,
)
# A sign-off ("Let me know …", "Enjoy!") opening a line, and what follows it: after a blank
# line (a rule is one, once taken off), it and all after it, and so a note ("Note: …",
# "**Note:** …") too; after a single line break, only as the reply's last line, opening with
# a capital as a sentence does and not after a colon, since a prompt's line may run on there
# ("Subject: a red fox" then "Note: orange fur", "A card that reads:" then "Enjoy your
# stay!", "a red fox" then "would you like to see a cat"). The match starts only where a run
# of spaces starts, each run read once and possessively: "\n\s*\n\s*" was cubic in a run of
# line breaks (1,000 took 15 s on the event loop), and a start inside the run quadratic.
_SIGN_OFF = r"(?:let me know|i hope|feel free|this prompt|enjoy|would you like)\b(?!-)"
_CHATTER = re.compile(
    rf"(?<!\s)(?:[^\S\n]*+\n[^\S\n]*+\n\s*+[*_]*+(?:{_SIGN_OFF}|notes?[*_]*:).*"
    rf"|(?<!:)[^\S\n]*+\n[^\S\n]*+[*_]*+(?-i:(?=[A-Z])){_SIGN_OFF}[^\n]*+\s*+)\Z",
    re.IGNORECASE | re.DOTALL,
)
# A negative prompt is what the image must not show: never part of the prompt. It starts at
# its label ("Negative prompt:", or "Negative:" opening a line) and runs to the reply's end.
_NEGATIVE = re.compile(
    r"\bnegative[ _-]?prompts?[ \t]*:|^[ \t]*negatives?[ \t]*:", re.IGNORECASE | re.MULTILINE
)
# Midjourney's parameters (``--ar 16:9 --v 6 --no text``) close a prompt's line: not words a
# diffusion model should read.
_FLAGS = re.compile(r"(?:^|[ \t])--[A-Za-z][^\n]*", re.MULTILINE)
# "Subject: a red fox": a label of one to three words opening a line of a structured reply.
_LABEL = re.compile(r"[ \t]*[A-Za-z]+(?:[ \t][A-Za-z]+){0,2}[ \t]*:[ \t]+(?=\S)")
_ITEM = "\x00"  # marks a line that was a list item or a labelled line until lines are joined
_ENDS_CLAUSE = tuple(",.;:!?\u3001\u3002\uff0c\uff1b\uff1a\uff01\uff1f")
# More than any budget's prompt (512 tokens): what is past it is cut before cleaning.
MAX_REPLY_CHARS = 16_000
# Opening → closing quote: ASCII, curly double and single, guillemets, German low-high, backtick.
_QUOTES = {
    '"': '"',
    "'": "'",
    "\u201c": "\u201d",
    "\u2018": "\u2019",
    "\u00ab": "\u00bb",
    "\u201e": "\u201c",
    "`": "`",
}

# CLIP counts its start and end tokens in its 77.
_CLIP_SPECIAL_TOKENS = 2


def estimate_tokens(text: str) -> int:
    """A conservative token count of ``text`` for CLIP and T5 (see the module docstring)."""
    # A piece that is no letters is one character: a digit or an ASCII mark is one byte.
    return sum(
        math.ceil(len(piece) / 4) if piece[0] in _ASCII_ALNUM else len(piece.encode())
        for piece in _PIECE.findall(text)
    )


def _strip_quotes(text: str) -> str:
    """``text`` without quotes or a tag (``<prompt>…</prompt>``) around all of it: not quotes
    that open its first words and close its last (``"Starry Night" style … named "Rusty"``),
    nor tags that do (``<b>Open</b> sign and <b>Closed</b> sign``), which it keeps."""
    while True:
        if (tag := _TAGGED.fullmatch(text)) is not None and f"</{tag[1]}" not in tag[2]:
            text = tag[2].strip()
        elif len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
            inner = text[1:-1]
            if text[0] in inner or text[-1] in inner:
                break
            text = inner.strip()
        else:
            break
    return text


def clean_reply(text: str) -> str:
    """The bare prompt in an LLM reply: no preamble, sign-off, quotes, wrapping tag, markdown
    (struck-out words dropped with it), negative prompt, Midjourney parameters, terminal
    escape sequences or line breaks (list items and labelled lines become clauses).

    The prompt rule of a request (:func:`imagegen.models.prompt_text`) holds for the reply:
    the characters a request may not hold are dropped here, and its tabs and line breaks end
    as spaces."""
    text = _ESCAPE.sub("", text[:MAX_REPLY_CHARS])
    text = PROMPT_REFUSED_CHARACTERS.sub("", text)  # _ITEM among them
    text = _RULE.sub("", _FENCE.sub("", text))
    # Markup off before the sign-off is looked for: "**Note:**" opens one as "Note:" does.
    text = _STRUCK.sub(_unstrike, _EMPHASIS.sub(r"\2", _STRONG.sub(r"\2", text)))
    text = _CHATTER.sub("", text.strip())
    text = _TITLE.sub("", text, count=1)
    without_headings = _HEADING.sub("", text)
    if without_headings.strip():  # a heading is a title, unless it is all there is
        text = without_headings
    if negative := _NEGATIVE.search(text):
        text = text[: negative.start()].rstrip(" \t\n([{-")
    text = _FLAGS.sub("", text)
    text = _items(_first_of_several(text))
    for _ in range(3):  # "Sure! Here is your prompt:" then "Prompt:" and the like
        stripped = _strip_quotes(_PREAMBLE.sub("", text.strip(), count=1))
        if stripped == text:
            break
        text = stripped
    return _strip_quotes(_join_lines(_INTERJECTED.sub("", text, count=1)))


def _unstrike(struck: re.Match[str]) -> str:
    """What a struck span (:data:`_STRUCK`) leaves: nothing where a mark or the line's end
    follows it, else the mark before it and a space (the spaces are made one later)."""
    if _ENDS_STRUCK.match(struck.string, struck.end()):
        return ""
    return struck.group(1) + " "


def _first_of_several(text: str) -> str:
    """The first of several prompts offered as alternatives, or ``text`` as it is.

    Alternatives are a numbered list that a line announces (``Here are three prompts:`` then
    ``1. …`` ``2. …``), a numbered list of whole prompts opening the reply (``1. A red fox
    asleep in snow, soft light.`` ``2. A grey wolf …``), ``Option 1: … Option 2: …``, or a
    prompt followed by ``Alternatively: …``. One prompt is wanted, and the first is the one
    the model led with. A list of short parts (``1. a red fox`` ``2. snow``), or one whose
    items open with a field (``1. Subject: …`` ``2. Setting: …``), is one prompt's parts,
    joined later.
    """
    if options := _OPTIONS.match(text):
        return options.group(1).strip()
    if (other := _ALTERNATIVELY.search(text)) and text[: other.start()].strip():
        text = text[: other.start()].rstrip()
    announced = _SEVERAL.search(text)
    start = announced.end() if announced is not None else 0
    items = list(_NUMBERED.finditer(text, start))
    if len(items) < 2 or (items[0].group(1), items[1].group(1)) != ("1", "2"):
        return text
    if text[start : items[0].start()].strip():  # the list must follow the line, or open
        return text
    first = text[items[0].end() : items[1].start()].strip()
    if announced is None:
        second_end = items[2].start() if len(items) > 2 else len(text)
        second = text[items[1].end() : second_end].strip()
        if not (_whole_prompt(first) and _whole_prompt(second)):
            return text
        if _fields(first, second):
            return text
    return first


def _label(item: str) -> str | None:
    """The label opening ``item`` (``Art style``), spaces single; None where it has none."""
    labelled = _LABELLED.match(item)
    return " ".join(labelled.group(1).split()) if labelled is not None else None


def _fields(first: str, second: str) -> bool:
    """Whether two list items are fields of one prompt: labelled differently, and one of the
    labels a field's name (:data:`_FIELDS`)."""
    labels = (_label(first), _label(second))
    named = any(label is not None and label.lower() in _FIELDS for label in labels)
    return named and labels[0] != labels[1]


def _whole_prompt(item: str) -> bool:
    """Whether a list item reads as a prompt of its own rather than a part of one: a sentence
    or several clauses, of five words or more."""
    return len(item.split()) >= 5 and (item.endswith((".", "!")) or "," in item)


def _items(text: str) -> str:
    """``text`` with list markup and (where two lines or more have them) labels taken off
    its lines, each such line marked as an item (:data:`_ITEM`) for :func:`_join_lines`."""
    lines = text.split("\n")
    labelled = sum(1 for line in lines if _LABEL.match(line)) >= 2
    marked = []
    for line in lines:
        bare = _LINE_MARKUP.sub("", line, count=1)
        if labelled:
            bare = _LABEL.sub("", bare, count=1)
        marked.append(_ITEM + bare if bare != line else line)
    return "\n".join(marked)


def _join_lines(text: str) -> str:
    """One line: an item (or a line opening with a capital after one that ends no clause)
    joins as a clause, after a comma; a line that goes on a sentence, with a space."""
    parts: list[str] = []
    for line in text.split("\n"):
        item = line.lstrip().startswith(_ITEM)
        line = " ".join(line.replace(_ITEM, "").split())
        if not line:
            continue
        if parts and not parts[-1].endswith(_ENDS_CLAUSE) and (item or line[0].isupper()):
            parts[-1] += ","
        parts.append(line)
    return " ".join(parts)


# A reply that declines (or talks about itself) rather than describing an image. An image
# prompt describes in the third person, and a refusal's words in it are the image's ("a robot
# unable to fly", "a sign that reads I can't stop now", "a rebel who breaks our rules",
# "unfortunately lit diner", "a sign reading 'we cannot help you'"): only an apology or a first
# person declining, opening the reply, counts, or in its first sentence (outside quotes) a
# first person declining to help or a policy of the model's.
_CANNOT = r"(?:can ?not|can['\u2019]?t|won['\u2019]?t|will not|unable|not able)"
_APOLOGY = re.compile(
    r"\W*(?:i(?:['\u2019]m| am) sorry|i apologi[sz]e|my apologies|apologies,"
    # "Sorry, I …", "Sorry but …", "Sorry, can't help", "Sorry!": not "Sorry Mr Bean, a comic
    # portrait".
    r"|sorry(?:[,!.\u2013\u2014-]?[ \t]+[\u2013\u2014-]?[ \t]*"
    rf"(?:but|i|i['\u2019]m|we|that|this|it|{_CANNOT})\b|[!.])"
    # "Unfortunately, …", "Unfortunately I …": not "Unfortunately lit diner" (and for that
    # one without a comma, see _UNFORTUNATELY).
    r"|unfortunately(?:,|[ \t]+(?:i|we)\b)"
    r"|as an ai\b|as a language model)",
    re.IGNORECASE,
)
# "Unfortunately the request cannot be fulfilled", "Unfortunately that is not something that
# can be generated": an opening "Unfortunately" whose first sentence declines.
_UNFORTUNATELY = re.compile(r"\W*unfortunately\b", re.IGNORECASE)
_UNFORTUNATE_DECLINE = re.compile(
    rf"\b{_CANNOT}\b|\bnot\b(?:[ \t]+\w+){{0,6}}?[ \t]+(?:be[ \t]+)?"
    r"(?:generated|fulfil+ed|created|produced|drawn|written|possible|allowed|permitted)\b",
    re.IGNORECASE,
)
# "I", "I'm", "we'll": the first person, and the words that may come before its refusal ("I'm
# afraid I"). Four at most: unbounded, a search through a run of them ("I I I …") was
# quadratic, 15 s on a reply's 16,000 characters.
_FIRST_PERSON = (
    r"\b(?:i(?:['\u2019](?:m|ll|d|ve))?|we(?:['\u2019](?:re|ll|d|ve))?)"
    r"(?:[ \t]+(?:am|are|must|have to|will|would|do|really|not|afraid|simply|just|sadly"
    r"|therefore|politely|respectfully|unfortunately|i|we)){0,4}[ \t]+"
)
# Opening the reply: "I can't", "I'm afraid I cannot", "I must decline", "I'm not
# comfortable", "Sadly, we won't"; or "Unable to help with that".
_DECLINES = re.compile(
    r"\W*(?:(?:sadly|regrettably|however|but|honestly)[, \t]+)?"
    rf"(?:{_FIRST_PERSON}"
    r"(?:can ?not|can['\u2019]?t|won['\u2019]?t|will not|shouldn['\u2019]?t|decline|refuse"
    r"|unable|not able|not comfortable|uncomfortable|not going to|afraid|don['\u2019]t feel)\b"
    r"|(?:unable to|can ?not|can['\u2019]?t)[ \t]+(?:help|assist|comply|fulfil+)\b)",
    re.IGNORECASE,
)
# The rules a model follows, as it names them: "my rules", "our guidelines", "the safety
# policy", "the content policy". A description says "the safety rules" and "our rules" too
# ("a skateboarder breaks the safety rules"), so these count only after a subject that is the
# request (_AGAINST_POLICY), or possessed by the model (_DECLINES_WITHIN).
_POLICY = (
    r"(?:against|violates?|violating|breach(?:es)?|breaks?|contravenes?)[ \t]+"
    r"(?:my|our|openai['\u2019]s|the[ \t]+(?:content|usage|safety))"
    r"(?:[ \t]+\w+)?[ \t]+(?:rules|guidelines|polic(?:y|ies)|principles|terms|standards)\b"
)
# Opening the reply: "This violates the safety guidelines", "That goes against my rules",
# "This request goes against the safety policy", "Creating this would violate …".
_AGAINST_POLICY = re.compile(
    r"\W*(?:(?:this|that|your|the|such(?:[ \t]+an?)?)[ \t]+"
    r"(?:request|prompt|image|idea|content|topic|subject|description)"
    r"|(?:creating|writing|generating|making|drawing|producing|depicting)[ \t]+"
    r"(?:this|that|it|such[ \t]+\w+)|this|that|it|doing so)(?:['\u2019]s)?"
    r"(?:[ \t]+(?:would|could|may|might|will|does|clearly|directly|unfortunately|also|is|be"
    r"|go|goes|going|run|runs)){0,3}[ \t]+" + _POLICY,
    re.IGNORECASE,
)
# In the first sentence: "this is something I am unable to help with", "I cannot write that";
# "… goes against my guidelines", "… violates the content policy" (the model's own policy: a
# possessive or "the content policy", never bare rules, which an image's rebel breaks).
_DECLINES_WITHIN = re.compile(
    rf"{_FIRST_PERSON}"
    r"(?:can ?not|can['\u2019]?t|won['\u2019]?t|will not|unable to|not able to)[ \t]+"
    r"(?:help|assist|comply|fulfil+|create|generate|write|provide|produce|draw|make)"
    r"(?:[ \t]+(?:you|with|that|this|such|your|a prompt|an image|the (?:image|prompt|request))"
    r"\b|[ \t]*[.!,]|[ \t]*\Z)"
    r"|\b(?:against|violates?|breach(?:es)?|breaks?)[ \t]+"
    r"(?:my|our|openai['\u2019]s|the[ \t]+(?:content|usage))"
    r"(?:[ \t]+\w+)?[ \t]+(?:guidelines|polic(?:y|ies)|principles|terms)\b",
    re.IGNORECASE,
)
# Quoted words (a sign's, a motto's) are the image's: in straight quotes, double or single, or
# in curly ones. A single quote opens after no letter and closes before none, so that the
# apostrophe of "can't" neither opens nor closes one.
_QUOTED = re.compile(
    r"\"[^\"\n]{0,300}\"|\u201c[^\u201d\n]{0,300}\u201d"
    r"|(?<![\w'\u2019])['\u2018](?:[^'\u2019\n]|(?<=\w)['\u2019](?=\w)){1,300}?['\u2019](?!\w)"
)
# A description's opening: "A shop window …", "An old sign …".
_DESCRIPTION = re.compile(r"\W*an?[ \t]+\w", re.IGNORECASE)
# The first sentence: up to the first . ! ? before a space or the end.
_FIRST_SENTENCE = re.compile(r"[^.!?]*(?:[.!?](?=\s|\Z))?")
# Meta text, no prompt: "here's a more detailed version of your idea", "here is an enhanced
# prompt", with no prompt after a colon (a lead-in with one is taken off by clean_reply). The
# noun is the reply's ("prompt", "rewrite") or the user's ("your idea"), not the image's ("a
# steampunk version of the Eiffel Tower", "old letters and ideas"), or it ends the reply.
_META = re.compile(
    r"\W*(?:here(?:['\u2019]s| is| are)|below is|this is|i(?:['\u2019]ve| have) (?:written|made))"
    r"\b[^:]{0,200}?(?:(?:\b(?:prompts?|rewrites?)\b"
    r"|\b(?:your|the user['\u2019]s|the original)[ \t]+(?:\w+[ \t]+){0,2}"
    r"(?:ideas?|requests?|concepts?|descriptions?|inputs?|texts?)\b)[^:]{0,200}"
    # Or ending on "version", "description": "Here's a more detailed version."
    r"|\b(?:versions?|descriptions?|captions?)(?:[ \t]+of[ \t]+(?:it|this|that))?[ \t]*[.!]?)"
    r"\Z",
    re.IGNORECASE | re.DOTALL,
)


def _refusal(prompt: str) -> bool:
    """Whether ``prompt`` opens with an apology, a first person declining or the request
    breaking the model's rules, or declines in its first sentence (:data:`_DECLINES_WITHIN`,
    quoted words and a description opening with ``A`` aside)."""
    if _APOLOGY.match(prompt) or _DECLINES.match(prompt) or _AGAINST_POLICY.match(prompt):
        return True
    first = _FIRST_SENTENCE.match(_QUOTED.sub("\u2026", prompt))
    sentence = first.group() if first is not None else ""
    if _UNFORTUNATELY.match(sentence) and _UNFORTUNATE_DECLINE.search(sentence):
        return True
    return not _DESCRIPTION.match(sentence) and _DECLINES_WITHIN.search(sentence) is not None


_LETTERS = re.compile(r"[^\W\d_]+")
MIN_WORDS = 3
"""Words a usable prompt has at least (in scripts without spaces, characters)."""


def _latin(letter: str) -> bool:
    """Whether ``letter`` is of the Latin script (``é``, ``ß`` and the fullwidth letters included):
    its Unicode name says so (``LATIN SMALL LETTER E WITH ACUTE``)."""
    return letter < "\u0080" or "LATIN" in unicodedata.name(letter, "")


def unusable(prompt: str) -> str | None:
    """Why a cleaned LLM reply is no image prompt, or None when it is one.

    A reply with no letters (``...``, the placeholder of an example), one of fewer than
    :data:`MIN_WORDS` words (``N/A``), a refusal (``I'm sorry, but I can't``, ``I'm afraid I
    cannot help with that``: an apology or the first person declining opening it, or the
    first sentence declining to help; :func:`_refusal`), meta text with no prompt (``Here's a
    more detailed version of your idea``), or one written
    mostly in another script than Latin (the prompt is asked for in English, the language
    FLUX's text encoders were trained on; a name in its own script among English words is
    fine) is no prompt to send: better the template's prompt than that one.
    """
    runs = _LETTERS.findall(prompt)
    if not runs:
        return "no letters"
    words = sum(len(run) if _UNSPACED.search(run) else 1 for run in runs)
    if words < MIN_WORDS:
        return f"{words} word{'s' if words > 1 else ''}"
    if _refusal(prompt):
        return "a refusal"
    if _META.match(prompt):
        return "meta text, no prompt"
    letters = "".join(runs)  # digits and marks aside
    other = sum(1 for letter in letters if not _latin(letter))
    if 2 * other > len(letters):
        return f"not English: {other} of its {len(letters)} letters not Latin"
    return None


_ECHO_WORD = re.compile(r"[^\W_]+")
ECHO_WORDS = 8
"""Words in a row of the instructions that make a reply an echo of them: the shortest of their
sentences a reply would repeat (``You write prompts for the text-to-image model FLUX.1`` is
ten), and more than an image prompt shares with them by chance."""


@functools.lru_cache(maxsize=32)
def _runs(instructions: tuple[str, ...]) -> frozenset[tuple[str, ...]]:
    """Every run of :data:`ECHO_WORDS` words in each of ``instructions``, lower-case."""
    runs: set[tuple[str, ...]] = set()
    for text in instructions:
        words = _ECHO_WORD.findall(text.lower())
        runs.update(tuple(words[i : i + ECHO_WORDS]) for i in range(len(words) - ECHO_WORDS + 1))
    return frozenset(runs)


def echoes(prompt: str, instructions: tuple[str, ...]) -> bool:
    """Whether ``prompt`` repeats :data:`ECHO_WORDS` or more words in a row of one of
    ``instructions`` (case, punctuation and markup aside): a model that answers with its
    system message, or a sentence of it, wrote no prompt."""
    words = _ECHO_WORD.findall(prompt.lower())
    runs = _runs(instructions)
    return any(tuple(words[i : i + ECHO_WORDS]) in runs for i in range(len(words) - ECHO_WORDS + 1))


def join_fragments(parts: Iterable[str]) -> str:
    """Comma-joined non-empty parts, each once, in order.

    A plugin's fragment follows the prompt rule of a request (:func:`clean_reply`): a
    terminal's escape sequence is dropped whole and the other characters a request may not
    hold alone, its tabs and line breaks become spaces.
    """
    seen: dict[str, str] = {}
    for part in parts:
        part = PROMPT_REFUSED_CHARACTERS.sub("", _ESCAPE.sub("", part)).translate(_SPACES)
        part = part.strip().strip(",;\u3001\uff0c\uff1b").strip()
        if part and part.lower() not in seen:
            seen[part.lower()] = part
    return ", ".join(seen.values())


def _joins(before: str, after: str) -> bool:
    """Whether ``before`` and ``after`` (adjacent characters) are one grapheme.

    A subset of UAX #29 that needs no library: marks, joiners, variation selectors, emoji
    modifiers and tags stay with their base, Hangul jamo with their syllable (flags, pairs of
    regional indicators, are kept whole by :func:`_cut_inside`).
    """
    a = ord(after)
    if unicodedata.category(after) in ("Mn", "Me", "Mc") or a in (0x200C, 0x200D):
        return True
    if 0xFE00 <= a <= 0xFE0F or 0xE0100 <= a <= 0xE01EF or 0x1F3FB <= a <= 0x1F3FF:
        return True
    if 0xE0020 <= a <= 0xE007F or ord(before) == 0x200D:
        return True
    if 0xDC00 <= a <= 0xDFFF and 0xD800 <= ord(before) <= 0xDBFF:  # a surrogate pair
        return True
    return 0x1100 <= ord(before) <= 0x11FF and (0x1160 <= a <= 0x11FF)


def _cut_inside(word: str, budget: int, *, whole_runs: bool) -> str:
    """The longest start of ``word`` within ``budget`` that ends on a grapheme boundary.

    With ``whole_runs``, a run of ASCII letters and digits (a Latin word) is not cut either.
    """
    ends: list[int] = []
    regional = 0  # regional indicators so far in a row: flags are pairs of them
    for i in range(1, len(word)):
        before, after = word[i - 1], word[i]
        regional = regional + 1 if 0x1F1E6 <= ord(before) <= 0x1F1FF else 0
        if _joins(before, after) or (regional % 2 and 0x1F1E6 <= ord(after) <= 0x1F1FF):
            continue
        if whole_runs and before in _ASCII_ALNUM and after in _ASCII_ALNUM:
            continue
        ends.append(i)
    # A start's estimate grows with its length, so the longest one that fits is bisected.
    low, high = 0, len(ends)
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_tokens(word[: ends[middle - 1]]) <= budget:
            low = middle
        else:
            high = middle - 1
    return word[: ends[low - 1]] if low else ""


def _cut_words(text: str, budget: int) -> str:
    """The longest start of ``text`` within ``budget``, cut between words where it can be.

    A word is cut inside when it is the first (a prompt with no spaces, or one endless word) or
    written in a script without spaces: dropping it would drop all of it.
    """
    kept: list[str] = []
    used = 0
    for word in text.split():
        cost = estimate_tokens(word)
        if used + cost > budget:
            if not kept or _UNSPACED.search(word):
                part = _cut_inside(word, budget - used, whole_runs=True)
                if not part and not kept:
                    part = _cut_inside(word, budget, whole_runs=False)
                if part:
                    kept.append(part)
            break
        kept.append(word)
        used += cost
    return " ".join(kept)


def fit_budget(text: str, spec: ModelFamily, *, subject: bool = True) -> str:
    """``text`` trimmed to ``spec``'s budget, at clause boundaries where possible.

    Args:
        text: A one-line prompt; clauses end with ``, . ; : ! ?`` or CJK punctuation.
        spec: The target model's family, whose budget applies.
        subject: Also keep the first clause (the subject) within CLIP's budget, dropping its
            overflow words: CLIP sees only the start of the prompt. Families without CLIP
            read the whole prompt with one encoder and ignore this.

    Returns:
        The prompt, whole within the family's prompt budget; never empty when ``text`` has
        words. A first word over budget, or text in a script without spaces (CJK), is cut
        inside, between graphemes.
    """
    parts = _CLAUSE_END.split(text.strip())
    # Each clause with the space after it: none after CJK punctuation.
    clauses = [
        (c, " " if s else "") for c, s in zip(parts[::2], [*parts[1::2], ""], strict=True) if c
    ]
    if not clauses:
        return ""
    if subject and spec.subject_tokens is not None:
        clip_budget = spec.subject_tokens - _CLIP_SPECIAL_TOKENS
        if estimate_tokens(clauses[0][0]) > clip_budget:
            # Cut to leave room for the comma that ends it, as an uncut clause's comma counts.
            cut = _cut_words(clauses[0][0], clip_budget - 1).rstrip(",;:")
            clauses[0] = (cut + ",", " ")
    budget = spec.prompt_tokens - spec.prompt_overhead
    kept: list[str] = []
    used = 0
    for clause, space in clauses:
        cost = estimate_tokens(clause)
        if used + cost > budget:
            if not kept:  # a single clause over budget: keep what fits of it
                kept.append(_cut_words(clause, budget))
            break
        kept += (clause, space)
        used += cost
    return "".join(kept).rstrip(_TRAILING)
