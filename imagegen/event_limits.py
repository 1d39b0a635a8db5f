"""How long an event's attributes may be: the ledger's bounds, which every stage enforces too.

The ledger keeps each event under its ``source`` and ``id`` and refuses one past these bounds
(:class:`imagegen.ledger.LedgerEvent`); a stage that took such an event would run the
generation while the ledger, refusing it, never learned of it (nor of the webhook it names).
So each stage's binding (``functions/_binding.py``) refuses what the ledger would, from this
one definition. Lengths are characters (Unicode code points), as pydantic counts them.

Nothing is imported here: every function reads this at start-up.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

__all__ = ["ATTRIBUTE_MAX_LENGTHS", "ID_MAX_LENGTH", "SOURCE_MAX_LENGTH", "TYPE_MAX_LENGTH"]

SOURCE_MAX_LENGTH: Final = 1024
ID_MAX_LENGTH: Final = 1024
TYPE_MAX_LENGTH: Final = 256

ATTRIBUTE_MAX_LENGTHS: Final = MappingProxyType(
    {"source": SOURCE_MAX_LENGTH, "id": ID_MAX_LENGTH, "type": TYPE_MAX_LENGTH}
)
"""Each bounded attribute's most characters; the others (``subject`` among them) are unbounded."""
