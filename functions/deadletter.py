"""The deadletter function: :mod:`imagegen.stages.deadletter` over HTTP (target ``deadletter``)."""

from _adapter import entry_point

deadletter = entry_point("deadletter")
