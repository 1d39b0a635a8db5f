"""Model families as data: what each model needs, allows and costs.

A *family* fixes how a model is driven (pipeline class, default steps and guidance, prompt
budget, resolution rules, LoRA support); a *model* is one published checkpoint of a family
with its size, licence and pinned Hub revision. Validation, the enhance prompt budget, the
render backend and the model table in ``docs/models.md`` all read this table.

Pure data, safe to import anywhere (enhance reads it without torch).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "MODELS",
    "ModelFamily",
    "ModelSpec",
    "family_for",
    "known_spec",
    "looks_like_path",
    "markdown_tables",
    "request_errors",
    "resolution_errors",
    "served_errors",
    "spec_for",
]


@dataclass(frozen=True)
class ModelFamily:
    """How one family of models is driven.

    Attributes:
        name: Short identifier (``flux2-klein``).
        title: Human name (``FLUX.2 [klein]``).
        pipeline: The diffusers pipeline class that runs it.
        text_encoder: What reads the prompt.
        default_steps: Denoising steps when a request gives none.
        default_guidance: Guidance scale when a request gives none.
        prompt_tokens: The text encoder's budget (``max_sequence_length``) for the whole prompt.
        prompt_overhead: Tokens of that budget the pipeline spends around the prompt (T5's
            end token; Qwen3's chat template).
        subject_tokens: CLIP's budget, where the family has CLIP: the prompt's first clause
            (its subject) must fit in it. ``None``: one encoder reads the whole prompt.
        multiple_of: Width and height must be multiples of this (VAE factor x 2x2 packing).
        max_pixels: Width x height at most this.
        lora: Whether LoRA adapters can be loaded.
        text_encoder_layers: The hidden layers whose states feed the transformer, where the
            pipeline takes them as an argument; ``None`` for the pipeline's own choice.
    """

    name: str
    title: str
    pipeline: str
    text_encoder: str
    default_steps: int
    default_guidance: float
    prompt_tokens: int
    subject_tokens: int | None
    prompt_overhead: int = 1
    multiple_of: int = 16
    max_pixels: int = 2048 * 2048
    lora: bool = True
    text_encoder_layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One model of a family: the id requests name it by and what serving it takes.

    Attributes:
        id: Hub id, or the name of a pipeline built offline (``tiny``).
        family: How it is driven.
        revision: The Hub commit pinned for it (``None``: built offline, or not pinned here;
            set ``IMAGEGEN_MODEL_REVISIONS`` to pin one).
        gpu_memory_gb: GPU memory to serve it in bfloat16 at 1024², in GB (estimate).
        licence: The weights' licence.
        commercial: Whether the licence allows commercial use; a model whose licence does
            not is served only when ``IMAGEGEN_ALLOW_NON_COMMERCIAL`` is set.
        offline: Built on the spot with random weights (tests and demos), never downloaded.
    """

    id: str
    family: ModelFamily
    revision: str | None
    gpu_memory_gb: float | None
    licence: str
    commercial: bool = True
    offline: bool = False


# -- families ---------------------------------------------------------------------------------

# Flux2KleinPipeline wraps the prompt in Qwen3's chat template, thinking turned off:
# <|im_start|>user\n PROMPT <|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n
_QWEN3_CHAT_TOKENS = 12

# FLUX.2 [klein]: step-distilled (4 steps, guidance ignored above 1), one Qwen3 encoder whose
# 512-token window reads the whole prompt (diffusers' Flux2KleinPipeline.tokenizer_max_length).
FLUX2_KLEIN = ModelFamily(
    name="flux2-klein",
    title="FLUX.2 [klein]",
    pipeline="Flux2KleinPipeline",
    text_encoder="Qwen3",
    default_steps=4,
    default_guidance=1.0,
    prompt_tokens=512,
    subject_tokens=None,
    prompt_overhead=_QWEN3_CHAT_TOKENS,
    max_pixels=2048 * 2048,
)
# FLUX.1: CLIP (77 tokens, the subject) plus T5 (the whole prompt), up to 2 megapixels (Black
# Forest Labs' figure; FLUX.2 renders up to 4). dev is guidance-distilled; schnell is
# timestep-distilled, with T5 trained on 256 tokens and no guidance.
FLUX1_DEV = ModelFamily(
    name="flux1-dev",
    title="FLUX.1 [dev]",
    pipeline="FluxPipeline",
    text_encoder="CLIP-L + T5-XXL",
    default_steps=28,
    default_guidance=3.5,
    prompt_tokens=512,
    subject_tokens=77,
    max_pixels=2 * 1024 * 1024,
)
FLUX1_SCHNELL = replace(
    FLUX1_DEV,
    name="flux1-schnell",
    title="FLUX.1 [schnell]",
    default_steps=4,
    default_guidance=0.0,
    prompt_tokens=256,
)
# The offline tiny pipelines (imagegen.render.tiny, imagegen.render.tiny_klein): the real
# pipeline classes with random weights; fewer steps and shorter prompt windows keep them fast
# on a CPU. Their size is bounded by the sides alone.
TINY_FLUX1 = replace(
    FLUX1_DEV,
    name="tiny-flux1",
    title="tiny FLUX.1 (random weights)",
    text_encoder="CLIP + T5 (tiny)",
    default_steps=2,
    prompt_tokens=256,
    max_pixels=2048 * 2048,
)
TINY_FLUX2_KLEIN = replace(
    FLUX2_KLEIN,
    name="tiny-flux2-klein",
    title="tiny FLUX.2 [klein] (random weights)",
    text_encoder="Qwen3 (tiny)",
    default_steps=2,
    prompt_tokens=128,
    text_encoder_layers=(1, 2, 3),
)

FAMILIES: tuple[ModelFamily, ...] = (
    FLUX2_KLEIN,
    FLUX1_SCHNELL,
    FLUX1_DEV,
    TINY_FLUX1,
    TINY_FLUX2_KLEIN,
)

# -- models -----------------------------------------------------------------------------------

DEFAULT_MODEL = "black-forest-labs/FLUX.2-klein-4B"

_APACHE = "Apache-2.0"
_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        DEFAULT_MODEL,
        FLUX2_KLEIN,
        revision="e7b7dc27f91deacad38e78976d1f2b499d76a294",
        gpu_memory_gb=13,
        licence=_APACHE,
    ),
    ModelSpec(
        "black-forest-labs/FLUX.2-klein-9B",
        FLUX2_KLEIN,
        revision=None,
        gpu_memory_gb=29,
        licence="FLUX Non-Commercial License",
        commercial=False,
    ),
    ModelSpec(
        "black-forest-labs/FLUX.1-schnell",
        FLUX1_SCHNELL,
        revision=None,
        gpu_memory_gb=34,
        licence=_APACHE,
    ),
    ModelSpec(
        "black-forest-labs/FLUX.1-dev",
        FLUX1_DEV,
        revision=None,
        gpu_memory_gb=34,
        licence="FLUX.1 [dev] Non-Commercial License",
        commercial=False,
    ),
    ModelSpec("tiny", TINY_FLUX1, None, None, licence=_APACHE, offline=True),
    ModelSpec("tiny-klein", TINY_FLUX2_KLEIN, None, None, licence=_APACHE, offline=True),
)
MODELS: dict[str, ModelSpec] = {spec.id: spec for spec in _MODELS}
# The Hub resolves a repository's id in any case, so its licence, revision and family must
# too: ``black-forest-labs/flux.1-dev`` is FLUX.1 [dev], under its non-commercial licence.
_HUB_IDS = {spec.id.lower(): spec for spec in _MODELS if "/" in spec.id}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a filesystem path (a hub id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def known_spec(model: str) -> ModelSpec | None:
    """The table's spec of ``model``: its id as written, or a Hub id of the table in another
    case; None for any other name."""
    known = MODELS.get(model)
    if known is None and _HUB_ID.fullmatch(model):
        known = _HUB_IDS.get(model.lower())
    return known


_BY_PIPELINE = {"Flux2KleinPipeline": FLUX2_KLEIN, "FluxPipeline": FLUX1_DEV}

# What tells a saved tiny pipeline (``save_pretrained`` of imagegen.render.tiny or tiny_klein)
# from a published checkpoint of the same pipeline class, whatever its folder is called: its
# components' configs. No published FLUX has one transformer block of each kind or text encoders
# 16 or 32 wide; the [klein] one names its encoder's depth too, the 3 layers TINY_FLUX2_KLEIN
# reads (a deeper encoder is read at the real model's layers, 9, 18 and 27).
_SAVED_OFFLINE: dict[str, dict[str, dict[str, object]]] = {
    "tiny": {
        "transformer": {"num_layers": 1, "num_single_layers": 1},
        "text_encoder": {"hidden_size": 32},
        "text_encoder_2": {"d_model": 32},
    },
    "tiny-klein": {
        "transformer": {"num_layers": 1, "num_single_layers": 1},
        "text_encoder": {"hidden_size": 16, "num_hidden_layers": 3},
    },
}


def _json_object(path: Path) -> dict[str, object] | None:
    """The JSON object in ``path``; None for a file that is missing, unreadable or no object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _config_has(component: Path, wanted: dict[str, object]) -> bool:
    """Whether the ``config.json`` of ``component`` holds each of ``wanted``'s values."""
    config = _json_object(component / "config.json")
    return config is not None and all(config.get(k) == v for k, v in wanted.items())


def _saved_family(directory: Path) -> ModelFamily | None:
    """The family of the pipeline saved in ``directory``, read from its files: the class
    ``model_index.json`` names (``_class_name``), then its components' configs, which tell a
    saved tiny pipeline from a published model. None where they say nothing known."""
    index = _json_object(directory / "model_index.json")
    pipeline = index.get("_class_name") if index is not None else None
    if not isinstance(pipeline, str):
        return None
    for name, components in _SAVED_OFFLINE.items():
        spec = MODELS[name]
        if spec.family.pipeline != pipeline:
            continue
        if all(_config_has(directory / c, wanted) for c, wanted in components.items()):
            return spec.family
    return _BY_PIPELINE.get(pipeline)


def family_for(model: str) -> ModelFamily:
    """The family of ``model``: a known id, a local pipeline directory, or a Hub id.

    A local directory is read for what it holds, never for its name: the pipeline class in its
    ``model_index.json`` and its components' configs (a saved tiny pipeline is the tiny family
    in any folder). A name whose directory is not here (enhance runs where render's files are
    not), holds no pipeline or cannot be looked up (too long, a folder not to be searched, a
    ``~user`` of no user) is read by its spelling: a tiny pipeline's name as its last part
    (``…/tiny-klein``), else ``klein`` or ``schnell`` in it, else FLUX.1 [dev]'s rules. Any
    name is looked for on the disk: a caller's is checked against the served models first
    (:func:`served_errors`).
    """
    known = known_spec(model)
    if known is not None:
        return known.family
    local = Path(model)
    with suppress(RuntimeError):  # ``~user/…`` of no user here: no directory of this name
        local = local.expanduser()
    saved = _saved_family(local)  # None for a file it cannot read
    if saved is not None:
        return saved
    try:
        indexed = (local / "model_index.json").is_file()
    except OSError:
        # A name this filesystem cannot look up (too long, a folder it may not search): no
        # pipeline here. is_file itself answers False only for a missing path or a link loop.
        indexed = False
    if not indexed:
        offline = MODELS.get(local.name)
        if offline is not None and offline.offline:
            return offline.family
    name = model.lower()
    if "klein" in name:
        return FLUX2_KLEIN
    if "schnell" in name:
        return FLUX1_SCHNELL
    return FLUX1_DEV


def spec_for(model: str) -> ModelSpec:
    """The spec of ``model``; one not in the table gets its family's rules, no revision."""
    known = known_spec(model)
    if known is not None:
        return known
    return ModelSpec(model, family_for(model), None, None, licence="unknown")


def resolution_errors(family: ModelFamily, width: int, height: int) -> list[dict[str, str]]:
    """What is wrong with ``width`` x ``height`` for ``family``, one entry per field."""
    errors = []
    for field, value in (("width", width), ("height", height)):
        if value % family.multiple_of:
            errors.append(
                {
                    "field": field,
                    "message": f"{family.title} needs a multiple of {family.multiple_of}",
                }
            )
    if width * height > family.max_pixels:
        errors.append(
            {
                "field": "width",
                "message": f"{width}x{height} is over {family.title}'s "
                f"{family.max_pixels / 1e6:.1f} megapixels",
            }
        )
    return errors


def served_errors(model: str, served: Sequence[str]) -> list[dict[str, str]]:
    """Why ``model`` cannot be rendered here by its name alone: not among ``served`` (what the
    deployment's render services serve). Reads nothing: a caller's name is checked by this
    before :func:`family_for` looks for it on the disk, where only a served path is read."""
    if model in served:
        return []
    # A long name is said by its start, so the reason still shows where a reply cuts each
    # field's message short (imagegen.errors.MAX_ENTRY).
    said = repr(model) if len(model) <= _SAID_CHARS else f"{model[:_SAID_CHARS]!r}…"
    return [
        {
            "field": "model",
            "message": f"{said} is not served here; served (IMAGEGEN_SERVED_MODELS): "
            + ", ".join(served),
        }
    ]


_SAID_CHARS = 80


def request_errors(
    model: str, width: int, height: int, served: Sequence[str]
) -> list[dict[str, str]]:
    """Why ``model`` at ``width`` x ``height`` cannot be rendered here: not among ``served``
    (what the deployment's render services serve), or outside its family's rules."""
    return served_errors(model, served) or resolution_errors(family_for(model), width, height)


def markdown_tables() -> str:
    """The model and family tables of ``docs/models.md``, written from this module."""
    lines = [
        "| model | family | GPU memory (bf16) | licence | commercial use | pinned revision |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in MODELS.values():
        memory = f"~{spec.gpu_memory_gb:g} GB" if spec.gpu_memory_gb else "CPU, no weights"
        revision = f"`{spec.revision[:12]}`" if spec.revision else "—"
        lines.append(
            f"| `{spec.id}` | {spec.family.title} | {memory} | {spec.licence} | "
            f"{'yes' if spec.commercial else 'no (opt-in)'} | {revision} |"
        )
    lines += [
        "",
        "| family | pipeline | text encoder | steps | guidance | prompt tokens | subject tokens "
        "| max pixels | LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for family in FAMILIES:
        lines.append(
            f"| {family.title} | `{family.pipeline}` | {family.text_encoder} | "
            f"{family.default_steps} | {family.default_guidance:g} | {family.prompt_tokens} | "
            f"{family.subject_tokens or '—'} | {family.max_pixels / 1e6:.1f} MP | "
            f"{'yes' if family.lora else 'no'} |"
        )
    return "\n".join(lines) + "\n"
