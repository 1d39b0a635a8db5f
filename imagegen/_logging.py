"""JSON log lines: one object per line, tied to the current span, with secrets redacted."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from pydantic import SecretStr

from imagegen.settings import Settings

__all__ = ["JsonFormatter", "route_library_logs", "setup_logging"]

# Extras that can carry a prompt (personal data): logged only with settings.log_prompts.
_PROMPT_KEYS = frozenset({"prompt", "original_prompt", "final_prompt"})
# Model libraries that log through a plain-text stderr handler of their own, not propagating.
_LIBRARIES = ("transformers", "diffusers", "huggingface_hub")
# Attributes every LogRecord has; anything else was passed with ``extra=``.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, logger, stage, ids and extras.

    ``generation_id`` and ``stage`` come from the record's extras, else from the current span
    (``imagegen.generation_id``, ``imagegen.stage``); ``trace_id`` and ``span_id`` from the
    current span. Every value in ``secrets`` is replaced by ``***`` wherever it appears.

    Args:
        stage: The stage to name when neither the record nor the span does.
        secrets: Values that must never appear in a log line.
        log_prompts: Whether ``prompt`` extras are written.
    """

    def __init__(
        self,
        stage: str | None = None,
        *,
        secrets: Iterable[str] = (),
        log_prompts: bool = False,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.log_prompts = log_prompts
        # The JSON-escaped form too: a secret with a quote or backslash is written escaped.
        forms = {form for s in secrets if s for form in (s, json.dumps(s)[1:-1])}
        self._secrets = sorted(forms, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
        }
        span = trace.get_current_span()
        attributes: Mapping[str, Any] = getattr(span, "attributes", None) or {}
        stage = attributes.get("imagegen.stage") or self.stage
        if stage:
            entry["stage"] = stage
        if gid := attributes.get("imagegen.generation_id"):
            entry["generation_id"] = gid
        context = span.get_span_context()
        if context.is_valid:
            entry["trace_id"] = trace.format_trace_id(context.trace_id)
            entry["span_id"] = trace.format_span_id(context.span_id)
        for key, value in vars(record).items():
            if key in _RESERVED or value is None or key.startswith("_"):
                continue
            if key in _PROMPT_KEYS and not self.log_prompts:
                continue
            entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str)
        # Redacted last, over the whole line: message, extras and tracebacks alike.
        for secret in self._secrets:
            line = line.replace(secret, "***")
        return line


def _secret_values(settings: Settings) -> list[str]:
    return [
        value.get_secret_value()
        for name in type(settings).model_fields
        if isinstance(value := getattr(settings, name), SecretStr) and value.get_secret_value()
    ]


def setup_logging(settings: Settings, stage: str | None = None) -> None:
    """JSON log lines on stderr at ``settings.log_level``; the settings' secrets redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(stage, secrets=_secret_values(settings), log_prompts=settings.log_prompts)
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level)
    # httpx logs every request line at INFO, full URL included (credentials, query tokens).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    route_library_logs()


def route_library_logs(*, import_libraries: bool = False) -> None:
    """Send the model libraries' records, and ``warnings.warn``, through the root handler.

    transformers and diffusers attach their own plain-text stderr handler and stop
    propagation; their public switches undo both, so their lines are JSON like ours.

    Args:
        import_libraries: Also set up those not imported yet (render, before loading a model:
            the libraries are imported during the load and warn while loading).
    """
    logging.captureWarnings(True)
    for name in _LIBRARIES:
        if name not in sys.modules and not import_libraries:
            continue
        try:
            library_logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        for switch in ("disable_default_handler", "enable_propagation"):
            function = getattr(library_logging, switch, None)
            if function is not None:
                function()
