from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from imagegen.settings import DEFAULT_MODEL, Settings


def test_defaults_are_a_laptop() -> None:
    settings = Settings()
    assert settings.profile == "dev"
    assert settings.model == DEFAULT_MODEL
    assert settings.storage_url == "./output"
    assert settings.device == "auto"
    assert settings.log_prompts is True


def test_prod_profile_changes_only_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_PROFILE", "prod")
    settings = Settings()
    assert (settings.device, settings.log_prompts) == ("cuda", False)
    monkeypatch.setenv("IMAGEGEN_LOG_PROMPTS", "true")
    assert Settings().log_prompts is True


def test_environment_lists_and_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGEN_OLLAMA_HOST")
    monkeypatch.setenv("OLLAMA_HOST", "http://ollama:11434")
    monkeypatch.setenv("IMAGEGEN_HOLIDAY_COUNTRIES", "US, DE")
    monkeypatch.setenv("IMAGEGEN_ALLOWED_MODELS", '["tiny"]')
    monkeypatch.setenv("IMAGEGEN_PLUGIN_OPTIONS", '{"art_style": {"style": "ukiyo-e"}}')
    settings = Settings()
    assert settings.ollama_host == "http://ollama:11434"
    assert settings.holiday_countries == ["US", "DE"]
    assert settings.allowed_models == ["tiny"]
    assert settings.plugin_options == {"art_style": {"style": "ukiyo-e"}}


def test_prefixed_ollama_host_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "http://a:1")
    monkeypatch.setenv("IMAGEGEN_OLLAMA_HOST", "http://b:2")
    assert Settings().ollama_host == "http://b:2"


def test_secrets_stay_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_S3_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("IMAGEGEN_URL_SIGNING_SECRET", "signing-secret-value")
    settings = Settings()
    assert "very-secret-value" not in repr(settings)
    assert "signing-secret-value" not in str(settings.model_dump())
    assert settings.s3_secret_access_key is not None
    assert settings.s3_secret_access_key.get_secret_value() == "very-secret-value"


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("IMAGEGEN_MODEL=tiny\n")
    assert Settings().model == "tiny"


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()
