"""The ledger function: :mod:`imagegen.stages.ledger` over HTTP (target ``ledger``)."""

from _adapter import entry_point

ledger = entry_point("ledger")
