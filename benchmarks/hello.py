"""The smallest functions-framework function: what a stage's overhead is measured against."""

import flask


def hello(request: flask.Request) -> str:
    """Answer every path (``/readyz`` included) with 200."""
    return "ok"
