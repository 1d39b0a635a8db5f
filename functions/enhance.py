"""The enhance function: :mod:`imagegen.stages.enhance` over HTTP (target ``enhance``)."""

from _adapter import entry_point

enhance = entry_point("enhance")
