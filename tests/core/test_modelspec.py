"""The model table: every family complete and consistent, names resolved to families."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from imagegen.modelspec import (
    DEFAULT_MODEL,
    FAMILIES,
    FLUX1_DEV,
    FLUX1_SCHNELL,
    FLUX2_KLEIN,
    MODELS,
    TINY_FLUX2_KLEIN,
    family_for,
    markdown_tables,
    request_errors,
    served_errors,
    spec_for,
)


def test_every_model_belongs_to_a_listed_family() -> None:
    assert {spec.family for spec in MODELS.values()} <= set(FAMILIES)
    assert len({family.name for family in FAMILIES}) == len(FAMILIES)
    for family in FAMILIES:
        assert family.pipeline in {"FluxPipeline", "Flux2KleinPipeline"}
        assert family.prompt_overhead < family.prompt_tokens
        assert family.max_pixels >= 1024 * 1024  # the default request size fits every family


def test_the_default_is_klein_4b_apache_pinned() -> None:
    spec = MODELS[DEFAULT_MODEL]
    assert spec.family is FLUX2_KLEIN
    assert (spec.licence, spec.commercial) == ("Apache-2.0", True)
    assert spec.revision is not None and len(spec.revision) == 40
    assert (FLUX2_KLEIN.default_steps, FLUX2_KLEIN.default_guidance) == (4, 1.0)
    assert MODELS["black-forest-labs/FLUX.2-klein-9B"].commercial is False


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("black-forest-labs/FLUX.2-klein-4B", FLUX2_KLEIN),
        ("someone/FLUX.2-klein-4B-finetune", FLUX2_KLEIN),
        ("black-forest-labs/FLUX.1-schnell", FLUX1_SCHNELL),
        ("someone/other-model", FLUX1_DEV),
        ("/models/tiny-klein", TINY_FLUX2_KLEIN),
    ],
)
def test_names_resolve_to_families(model: str, family: object) -> None:
    assert family_for(model) is family
    assert spec_for(model).family is family


def test_a_local_directory_is_read_by_its_pipeline_class(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    assert family_for(str(tmp_path)) is FLUX2_KLEIN
    assert spec_for(str(tmp_path)).revision is None


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("m" * 256, FLUX1_DEV),  # ENAMETOOLONG
        ("/" + "k" * 300 + "-klein", FLUX2_KLEIN),
        ("~no-such-user-here/tiny-klein", TINY_FLUX2_KLEIN),  # no home to expand it to
        ("a\u0000b-schnell", FLUX1_SCHNELL),
    ],
)
def test_a_name_no_file_can_have_is_read_by_its_spelling(model: str, family: object) -> None:
    assert family_for(model) is family


def test_a_directory_that_cannot_be_searched_is_read_by_its_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a folder without search permission answers a user other than root (EACCES).
    locked = tmp_path / "locked" / "flux-schnell"
    stat = Path.stat

    def refused(path: Path, **kwargs: bool) -> os.stat_result:
        if path.is_relative_to(locked.parent):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return stat(path, **kwargs)

    monkeypatch.setattr(Path, "stat", refused)
    assert family_for(str(locked)) is FLUX1_SCHNELL
    assert family_for(str(locked.parent / "tiny-klein")) is TINY_FLUX2_KLEIN


def test_served_errors_read_only_the_name() -> None:
    assert served_errors("/etc", ["/models/house"]) == [
        {
            "field": "model",
            "message": "'/etc' is not served here; served (IMAGEGEN_SERVED_MODELS): /models/house",
        }
    ]
    assert served_errors("/models/house", ["/models/house"]) == []
    [long] = served_errors("m" * 256, ["tiny"])
    assert (
        long["message"]
        == f"{'m' * 80!r}… is not served here; served (IMAGEGEN_SERVED_MODELS): tiny"
    )


def test_request_errors_name_each_field() -> None:
    served = ["black-forest-labs/FLUX.1-schnell"]
    assert request_errors("black-forest-labs/FLUX.1-schnell", 1024, 1024, served) == []
    assert [e["field"] for e in request_errors("x/y", 1024, 1024, served)] == ["model"]
    too_big = request_errors("black-forest-labs/FLUX.1-schnell", 2048, 2048, served)
    assert too_big == [
        {"field": "width", "message": "2048x2048 is over FLUX.1 [schnell]'s 2.1 megapixels"}
    ]
    odd = request_errors("black-forest-labs/FLUX.1-schnell", 1000, 1016, served)
    assert [e["field"] for e in odd] == ["width", "height"]


def test_the_models_page_shows_the_table() -> None:
    from tests.conftest import ROOT

    page = (ROOT / "docs" / "models.md").read_text()
    begin, end = "<!-- model-table:begin -->\n", "<!-- model-table:end -->"
    shown = page[page.index(begin) + len(begin) : page.index(end)]
    assert shown == markdown_tables(), "docs/models.md drifted from imagegen/modelspec.py"
