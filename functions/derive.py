"""The derive function: :mod:`imagegen.stages.derive` over HTTP (target ``derive``)."""

from _adapter import entry_point

derive = entry_point("derive")
