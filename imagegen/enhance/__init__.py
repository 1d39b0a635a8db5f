"""The enhance stage: plugins add context, an LLM on Ollama writes the prompt.

Light on purpose: this package never imports torch or diffusers, so the enhance function runs
on a small CPU pod.
"""

from __future__ import annotations

from imagegen.enhance._text import clean_reply, estimate_tokens, fit_budget
from imagegen.enhance.llm import MalformedReply, OllamaEnhancer, PromptReply, build_messages
from imagegen.enhance.stage import EnhanceStage

__all__ = [
    "EnhanceStage",
    "MalformedReply",
    "OllamaEnhancer",
    "PromptReply",
    "build_messages",
    "clean_reply",
    "estimate_tokens",
    "fit_budget",
]
