"""Rendered manifests for the tests of this directory (each target rendered once per run)."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from .routing import Routing, ServiceInfo, render_kustomize

REPO = Path(__file__).resolve().parents[2]
KNATIVE = REPO / "knative"
TARGETS = {
    "base": KNATIVE / "base",
    "dev": KNATIVE / "overlays" / "dev",
    "prod": KNATIVE / "overlays" / "prod",
    "cluster": KNATIVE / "cluster",
}
OVERLAYS = ("dev", "prod")


@cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render_kustomize(TARGETS[name]))


@pytest.fixture
def render() -> Callable[[str], list[dict[str, Any]]]:
    """``render("dev")``: the objects of one kustomize target (a fresh list each call)."""
    assert shutil.which("kubectl"), "kubectl (with kustomize) is required to render the manifests"
    return lambda name: copy.deepcopy(list(_render(name)))


@pytest.fixture
def jq() -> str:
    """The ``jq`` the runbook's commands are run with."""
    found = shutil.which("jq")
    assert found, "jq is required (apt-get install jq) to run the runbook's commands as written"
    return found


@pytest.fixture
def routing(render: Callable[[str], list[dict[str, Any]]]) -> Callable[[str], Routing]:
    """``routing("prod")``: the routing of one rendered overlay."""
    return lambda name: Routing(render(name))


def service_settings(service: ServiceInfo, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Settings a function builds from the Service's environment, and from nothing else."""
    from imagegen import settings as settings_module

    with monkeypatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("IMAGEGEN_"):
                patch.delenv(key)
        for key, value in service.env.items():
            patch.setenv(key, value)
        return settings_module.Settings(_env_file=None)
