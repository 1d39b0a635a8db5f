"""The persist function: :mod:`imagegen.stages.persist` over HTTP (target ``persist``)."""

from _adapter import entry_point

persist = entry_point("persist")
