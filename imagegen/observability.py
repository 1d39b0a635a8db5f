"""Process-wide telemetry set-up: JSON logs and the OpenTelemetry SDK.

Configured only by the standard ``OTEL_*`` variables (and ``IMAGEGEN_LOG_LEVEL``): an OTLP
exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or a per-signal endpoint) is set, none otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from imagegen.settings import Settings

__all__ = ["JsonFormatter", "setup_logging", "setup_observability"]

_configured = False

# Attributes every LogRecord has; anything else was passed with ``extra=``.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, logger, trace ids and extras."""

    def __init__(self, stage: str | None = None) -> None:
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
        }
        if self.stage:
            entry["stage"] = self.stage
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
            entry["span_id"] = f"{span.span_id:016x}"
        for key, value in vars(record).items():
            if key not in _RESERVED and value is not None and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(settings: Settings, stage: str | None = None) -> None:
    """JSON log lines on stderr at ``settings.log_level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(stage))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level)


def setup_observability(service_name: str, settings: Settings) -> None:
    """Logs and the OpenTelemetry SDK for one function process (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    setup_logging(settings, service_name.removeprefix("imagegen-"))
    os.environ.setdefault("OTEL_SERVICE_NAME", service_name)
