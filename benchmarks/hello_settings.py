"""A bare hello that reads one setting with pydantic-settings, as every stage reads its settings:
the least a function with validated settings starts in (the ``startup`` rows' floor)."""

import os

# As functions/_process.py: no entry-point scan for pydantic plugins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import flask
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_")

    model: str = "tiny"


SETTINGS = Settings()


def hello_settings(request: flask.Request) -> str:
    """Answer every path (``/readyz`` included) with 200."""
    return SETTINGS.model
