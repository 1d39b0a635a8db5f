"""Cleaning an LLM's reply into a bare prompt, and fitting prompts to a model's budget.

No tokenizer is loaded in the enhance stage (it must stay light), so token counts are
estimated: one token per punctuation mark and one per started four characters of each word.
English words average about 1.3 tokens in CLIP's and Qwen3's BPE and T5's SentencePiece, and
this count is higher for nearly every word (``light`` → 2, ``photorealistic`` → 4), so a prompt
that fits the estimate fits the real tokenizers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from imagegen.modelspec import ModelFamily

__all__ = ["clean_reply", "estimate_tokens", "fit_budget", "join_fragments"]

_PIECE = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
_CLAUSE_END = re.compile(r"(?<=[,.;:!?])\s+")
_FENCE = re.compile(r"```[\w+-]*")
_HEADING = re.compile(r"(?m)^[ \t]*#{1,6}[ \t].*$")
_LINE_MARKUP = re.compile(r"(?m)^[ \t]*(?:#{1,6}[ \t]+|>[ \t]?|[-*+•][ \t]+|\d{1,2}[.)][ \t]+)")
_STRONG = re.compile(r"(\*\*|__)(.+?)\1", re.DOTALL)
_EMPHASIS = re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", re.DOTALL)
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course|absolutely)\b[,!.]?\s*)?"
    r"(?:here(?:'s|\u2019s| is| are)\b[^:\n]{0,100}:"
    r"|(?:\w+\s){0,2}prompt\s*:)\s*",
    re.IGNORECASE,
)
_CHATTER = re.compile(
    r"\n\s*\n\s*(?:let me know|i hope|feel free|this prompt|note:|enjoy|would you like)\b.*\Z",
    re.IGNORECASE | re.DOTALL,
)
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
    return sum(
        math.ceil(len(piece) / 4) if piece[0].isalnum() else 1 for piece in _PIECE.findall(text)
    )


def _strip_quotes(text: str) -> str:
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def clean_reply(text: str) -> str:
    """The bare prompt in an LLM reply: no preamble, quotes, markdown or line breaks."""
    text = _FENCE.sub("", text)
    text = _CHATTER.sub("", text.strip())
    text = _STRONG.sub(r"\2", text)
    text = _EMPHASIS.sub(r"\1", text)
    without_headings = _HEADING.sub("", text)
    if without_headings.strip():  # a heading is a title, unless it is all there is
        text = without_headings
    text = _LINE_MARKUP.sub("", text)
    for _ in range(3):  # "Sure! Here is your prompt:" then "Prompt:" and the like
        stripped = _strip_quotes(_PREAMBLE.sub("", text.strip(), count=1))
        if stripped == text:
            break
        text = stripped
    text = re.sub(r"\s+", " ", text).strip()
    return _strip_quotes(text)


def join_fragments(parts: Iterable[str]) -> str:
    """Comma-joined non-empty parts, each once, in order."""
    seen: dict[str, str] = {}
    for part in parts:
        part = part.strip().strip(",;").strip()
        if part and part.lower() not in seen:
            seen[part.lower()] = part
    return ", ".join(seen.values())


def _cut_words(text: str, budget: int) -> str:
    kept: list[str] = []
    used = 0
    for word in text.split():
        cost = estimate_tokens(word)
        if used + cost > budget:
            break
        kept.append(word)
        used += cost
    return " ".join(kept)


def fit_budget(text: str, spec: ModelFamily, *, subject: bool = True) -> str:
    """``text`` trimmed to ``spec``'s budget, at clause boundaries where possible.

    Args:
        text: A one-line prompt; clauses end with ``, . ; : ! ?``.
        spec: The target model's family, whose budget applies.
        subject: Also keep the first clause (the subject) within CLIP's budget, dropping its
            overflow words: CLIP sees only the start of the prompt. Families without CLIP
            read the whole prompt with one encoder and ignore this.

    Returns:
        The prompt, whole within the family's prompt budget.
    """
    clauses = [c for c in _CLAUSE_END.split(text.strip()) if c]
    if not clauses:
        return ""
    if subject and spec.subject_tokens is not None:
        clip_budget = spec.subject_tokens - _CLIP_SPECIAL_TOKENS
        if estimate_tokens(clauses[0]) > clip_budget:
            clauses[0] = _cut_words(clauses[0], clip_budget).rstrip(",;:") + ","
    budget = spec.prompt_tokens - spec.prompt_overhead
    kept: list[str] = []
    used = 0
    for clause in clauses:
        cost = estimate_tokens(clause)
        if used + cost > budget:
            if not kept:  # a single clause over budget: keep what fits of it
                kept.append(_cut_words(clause, budget))
            break
        kept.append(clause)
        used += cost
    return " ".join(kept).rstrip(",;: ")
