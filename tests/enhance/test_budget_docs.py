"""docs/plugins.md states the enhance function's budget as the stage counts it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from imagegen.plugins.pluginset import DEFAULT_PLUGIN_TIMEOUT
from imagegen.settings import Settings
from imagegen.stages.enhance import STAGE, STORAGE_ALLOWANCE, llm_deadline

PAGE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def test_the_plugins_page_states_the_enhance_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [name for name in os.environ if name.upper().startswith("IMAGEGEN_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env file: the defaults
    defaults = Settings()
    plugins = len(dict.fromkeys(defaults.plugins))
    budget = STAGE.timeout(defaults)
    # The rule: the LLM's attempts and waits, each enabled plugin's limit, the memo's calls.
    assert budget == llm_deadline(defaults) + plugins * DEFAULT_PLUGIN_TIMEOUT + STORAGE_ALLOWANCE

    text = " ".join(PAGE.read_text().split())
    found = re.search(r"the enhance function's own budget \(([^)]*)\)", text)
    assert found is not None, "docs/plugins.md no longer states enhance's budget"
    stated = found.group(1)
    assert "`IMAGEGEN_OLLAMA_RETRIES` + 1 Ollama attempts at `IMAGEGEN_OLLAMA_TIMEOUT`" in stated
    assert f"{DEFAULT_PLUGIN_TIMEOUT:g} s for each enabled plugin" in stated
    assert f"{STORAGE_ALLOWANCE:g} s for the prompt memo's two storage calls" in stated
    assert (
        f"{budget:g} s with the defaults, whose {plugins} plugins take "
        f"{plugins * DEFAULT_PLUGIN_TIMEOUT:g} s" in stated
    )
