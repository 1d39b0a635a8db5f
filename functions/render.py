"""The render function: :mod:`imagegen.stages.render` over HTTP (target ``render``)."""

from _adapter import entry_point

render = entry_point("render")
