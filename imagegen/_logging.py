"""JSON log lines: one object per line, tied to the current span, with secrets redacted."""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import sys
import typing
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from pydantic import SecretStr

from imagegen.settings import Settings, _given
from imagegen.telemetry import current_generation, current_stage

__all__ = ["JsonFormatter", "route_library_logs", "setup_logging"]

# Extras that can carry a prompt (personal data): logged only with settings.log_prompts.
_PROMPT_KEYS = frozenset({"prompt", "original_prompt", "final_prompt"})
# Model libraries that log through a plain-text stderr handler of their own, not propagating.
_LIBRARIES = ("transformers", "diffusers", "huggingface_hub")
# What the model libraries quote of a prompt: diffusers' pipelines warn with the part of it the
# text encoder cut (``The following part of your input was truncated because CLIP can only
# handle sequences up to 77 tokens: [...]``, and the same for ``max_sequence_length``).
_QUOTED_INPUT = re.compile(r"(part of your input was truncated\b[^:]*):.*", re.DOTALL)
# Attributes every LogRecord has; anything else was passed with ``extra=``.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, logger, stage, ids and extras.

    ``generation_id`` and ``stage`` come from the record's extras, else from the current span
    (``imagegen.generation_id``, ``imagegen.stage``), else from the stage being run
    (:data:`~imagegen.telemetry.current_generation`, ``current_stage``: a span that is not
    sampled records no attributes); ``trace_id`` and ``span_id`` from the current span.
    Every value in ``secrets`` is replaced by ``***`` wherever it appears, in the values
    before they are written, so a line stays JSON whatever a secret is.

    Args:
        stage: The stage to name when neither the record, the span nor the stage being run
            does (the process's: ``cli`` for the command line).
        secrets: Values that must never appear in a log line.
        log_prompts: Whether ``prompt`` extras, and the text a model library quotes of a
            prompt (:data:`_QUOTED_INPUT`), are written.
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
        # Its repr too: a secret with a quote or backslash logged with %r is written escaped.
        forms = {form for s in secrets if s for form in (s, repr(s)[1:-1])}
        self._secrets = sorted(forms, key=len, reverse=True)

    @classmethod
    def from_environment(cls, stage: str | None = None) -> JsonFormatter:
        """A formatter for lines written without the settings (they could not be read, or are
        not read yet: gunicorn's own lines): prompts left out, and every value given to a
        secret setting's variable (the environment over ``.env``) redacted as it was given."""
        return cls(stage, secrets=_given_secret_values())

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not self.log_prompts and record.name.split(".")[0] in _LIBRARIES:
            message = _QUOTED_INPUT.sub(r"\1: (withheld: prompts are not logged)", message)
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "message": message,
            "logger": record.name,
        }
        span = trace.get_current_span()
        # A span the sampler dropped keeps no attributes: the stage being run says them then.
        attributes: Mapping[str, Any] = getattr(span, "attributes", None) or {}
        running = current_stage.get()
        stage = attributes.get("imagegen.stage") or (running if running != "none" else self.stage)
        if stage:
            entry["stage"] = stage
        if gid := attributes.get("imagegen.generation_id") or current_generation.get():
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
        return json.dumps(self._clean(entry))  # only JSON types are left

    def _clean(self, value: Any) -> Any:
        """``value`` as JSON can hold it: secrets redacted in every string (keys included),
        keys made strings, NaN and infinities written as strings."""
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, "***")
            return value
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, Mapping):
            return {self._clean(str(k)): self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(each) for each in value]
        if isinstance(value, bool | int | float) or value is None:
            return value
        return self._clean(str(value))  # what json.dumps(default=str) would write, redacted


def _secret_values(settings: Settings) -> list[str]:
    """Every secret setting's value, those in lists (the webhook secrets) included."""
    values = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        for each in value if isinstance(value, list) else [value]:
            if isinstance(each, SecretStr) and each.get_secret_value():
                values.append(each.get_secret_value())
    return values


def _is_secret(annotation: Any) -> bool:
    """Whether a setting of this type holds secrets (``SecretStr``, optional or in a list)."""
    return annotation is SecretStr or any(_is_secret(arg) for arg in typing.get_args(annotation))


def _given_secret_values() -> list[str]:
    """What the secret settings' variables are set to (the environment over ``.env``), as
    given: the values to redact where the settings could not be read. A list's variable (the
    webhook secrets, comma-separated) is redacted whole and item by item."""
    given = _given()
    values = []
    for name, field in Settings.model_fields.items():
        if not _is_secret(field.annotation):
            continue
        for variable in Settings.variables(name):
            value = given.get(variable.upper(), "")
            values.append(value)
            if typing.get_origin(field.annotation) is list:
                values += [item.strip() for item in value.split(",")]
    return [value for value in values if value]


def setup_logging(settings: Settings | None, stage: str | None = None) -> None:
    """JSON log lines on stderr at ``settings.log_level``; the settings' secrets redacted.

    ``settings`` None: the settings could not be read, and the process still logs why as JSON
    lines: at the default level, no prompts, and every value given to a secret setting's
    variable redacted. As :func:`logging.basicConfig`, that is a no-op where the root logger
    has handlers already (a set-up of this process's own, an embedding program's): the
    settings that would say otherwise are unknown.
    """
    root = logging.getLogger()
    if settings is None and root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if settings is None:
        level = Settings.model_fields["log_level"].default
        formatter = JsonFormatter.from_environment(stage)
    else:
        level = settings.log_level
        secrets = _secret_values(settings)
        formatter = JsonFormatter(stage, secrets=secrets, log_prompts=settings.log_prompts)
    handler.setFormatter(formatter)
    root.handlers = [handler]
    root.setLevel(level)
    # httpx logs every request line at INFO, full URL included (credentials, query tokens).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # botocore logs each request at DEBUG with its headers (botocore/endpoint.py, "Sending http
    # request"), SigV4's Authorization among them, and the string it signs (botocore/auth.py):
    # a signature that can be replayed for minutes. urllib3 and s3transfer log the requests'
    # URLs, presigned ones included. Their INFO lines (where credentials were found) stay.
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
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
