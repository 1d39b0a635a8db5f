"""``import imagegen.render`` must not pull torch in: enhance and persist import it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    "module",
    # The stage checks a job's LoRAs against the settings (render._lora) before admission.
    ["imagegen.render", "imagegen.render.png", "imagegen.render.base", "imagegen.render.stage"],
)
def test_import_does_not_load_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == ""


def test_backend_is_reachable_from_the_package() -> None:
    import imagegen.render
    from imagegen.render.diffusers_backend import DiffusersBackend

    assert imagegen.render.DiffusersBackend is DiffusersBackend
    with pytest.raises(AttributeError):
        _ = imagegen.render.NoSuchThing
