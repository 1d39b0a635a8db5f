"""A function says once, at start-up, when a setting turns off a safeguard of the prod profile."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

AUTH_OFF = "IMAGEGEN_AUTH_REQUIRED=false with IMAGEGEN_PROFILE=prod"


class _Kept(logging.Handler):
    """The records a logger hands it, kept."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        pytest.param({"IMAGEGEN_AUTH_REQUIRED": "false"}, 1, id="prod-auth-turned-off"),
        pytest.param({"IMAGEGEN_AUTH_REQUIRED": "0"}, 1, id="prod-auth-turned-off-as-0"),
        pytest.param({}, 0, id="prod-as-it-comes"),
        pytest.param({"IMAGEGEN_AUTH_REQUIRED": "true"}, 0, id="prod-auth-said-on"),
        pytest.param({"IMAGEGEN_PROFILE": "dev"}, 0, id="dev-off-by-default"),
    ],
)
def test_prod_with_authentication_turned_off_is_warned_of_once(
    settings: dict[str, str], warned: int, tmp_path: Path
) -> None:
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_PROFILE": "prod", **settings}
    # On the functions' logger itself: start-up sets the root logger's handlers anew.
    # Its own level too: logging is set up once per process, and the root's level is whatever
    # the first function started here asked for (another module's may have said ERROR).
    kept, logger = _Kept(), logging.getLogger("imagegen.functions")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(kept)
    try:
        enhance = InProcessFunction("enhance", env)
        enhance.get("/healthz")  # a later request: started already, nothing said again
    finally:
        logger.removeHandler(kept)
        logger.setLevel(level)
    said = [r for r in kept.records if AUTH_OFF in r.getMessage()]
    assert len(said) == warned, [r.getMessage() for r in kept.records]
    for record in said:
        assert record.levelno == logging.WARNING
        assert "every invocation is admitted without a token" in record.getMessage()
