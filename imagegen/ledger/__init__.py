"""The generation ledger: every imagegen event once, status and history, webhooks, replay.

:func:`open_ledger` picks the backend from a URL: PostgreSQL in deployments, a SQLite file on a
laptop (the default). Both share one implementation of the rules in :mod:`.fold`.
"""

from __future__ import annotations

from imagegen.ledger.models import (
    STATUS_RANK,
    WEBHOOK_EVENTS,
    Delivery,
    Generation,
    GenerationDetail,
    GenerationPage,
    IngestResult,
    LedgerEvent,
    Status,
    TimelineEntry,
    WebhookEvent,
    WebhookMessage,
)
from imagegen.ledger.store import Ledger, backend, default_ledger_path, ledger_path, open_ledger

__all__ = [
    "STATUS_RANK",
    "WEBHOOK_EVENTS",
    "Delivery",
    "Generation",
    "GenerationDetail",
    "GenerationPage",
    "IngestResult",
    "Ledger",
    "LedgerEvent",
    "Status",
    "TimelineEntry",
    "WebhookEvent",
    "WebhookMessage",
    "backend",
    "default_ledger_path",
    "ledger_path",
    "open_ledger",
]
