"""Strict JSON Schemas for every kind of object under knative/.

Knative kinds use the upstream CRD schemas vendored in ``crds/``; ConfigMap, Secret and
Namespace the small schemas in ``core-schemas/``; every other Kubernetes kind (Pod, Job,
PersistentVolumeClaim…) the strict OpenAPI schemas of ``KUBERNETES_VERSION`` that the
``kubernetes-validate`` package ships. The API server silently prunes fields a CRD schema does not
list, so a misspelt field is invisible at apply time; here it is an error:
``additionalProperties: false`` is set wherever a schema lists ``properties`` and does not
say ``x-kubernetes-preserve-unknown-fields``. A few objects that do say it are closed too,
because Knative's admission webhook decodes them strictly (see ``_CLOSED``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator, Draft202012Validator
from kubernetes_validate import utils as kubernetes_schemas
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

__all__ = [
    "CRD_DIR",
    "KUBERNETES_VERSION",
    "kubernetes_errors",
    "schema_for",
    "strict_schema",
    "validation_errors",
]

HERE = Path(__file__).parent
CRD_DIR = HERE / "crds"
CORE_DIR = HERE / "core-schemas"

_CORE = {
    ("v1", "ConfigMap"): "configmap.json",
    ("v1", "Secret"): "secret.json",
    ("v1", "Namespace"): "namespace.json",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy.json",
}

# The oldest Kubernetes release Knative Eventing 1.22 and Serving 1.23 run on
# (knative.dev/pkg version.go, defaultMinimumVersion): a field newer than that would be
# refused by some clusters these manifests are meant for.
KUBERNETES_VERSION = "1.34"

# Objects marked x-kubernetes-preserve-unknown-fields that Knative's webhook still decodes
# strictly, with the fields it knows beyond the CRD schema (feature-gated DeliverySpec
# fields are not in the CRD).
_DELIVERY_EXTRAS = {"timeout": {"type": "string"}, "retryAfterMax": {"type": "string"}}
_CLOSED: dict[tuple[str, str], dict[tuple[str, ...], dict[str, Any]]] = {
    ("eventing.knative.dev/v1", "Trigger"): {("spec",): {}, ("spec", "delivery"): _DELIVERY_EXTRAS},
    ("eventing.knative.dev/v1", "Broker"): {("spec", "delivery"): _DELIVERY_EXTRAS},
}


def strict_schema(
    schema: Mapping[str, Any],
    closed: Mapping[tuple[str, ...], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A copy of an OpenAPI v3 CRD schema that rejects unknown fields.

    Args:
        schema: An ``openAPIV3Schema``.
        closed: Paths (property names; ``[]`` for array items) of objects to close even
            though they preserve unknown fields, each with extra properties to allow.

    Returns:
        The strict schema, usable with a Draft 7 validator.
    """
    closed = closed or {}

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        node = dict(node)
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if "properties" in node:
            node["properties"] = {
                name: walk(child, (*path, name)) for name, child in node["properties"].items()
            }
            if path in closed:
                node["properties"].update(copy.deepcopy(dict(closed[path])))
                node["additionalProperties"] = False
            elif not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
        if isinstance(node.get("items"), dict):
            node["items"] = walk(node["items"], (*path, "[]"))
        if isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = walk(node["additionalProperties"], (*path, "{}"))
        for keyword in ("anyOf", "allOf", "oneOf"):
            if keyword in node:
                node[keyword] = [walk(child, path) for child in node[keyword]]
        return node

    strict: dict[str, Any] = walk(schema, ())
    return strict


def _crds() -> Iterator[dict[str, Any]]:
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                yield doc


@cache
def _object_meta() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CORE_DIR / "object-meta.json").read_text())
    return schema


@cache
def _registry() -> Registry:
    resources = [
        (
            path.name,
            Resource.from_contents(json.loads(path.read_text()), default_specification=DRAFT7),
        )
        for path in CORE_DIR.glob("*.json")
    ]
    return Registry().with_resources(resources)


@cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for crd in _crds():
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            key = (f"{group}/{version['name']}", kind)
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            # The CRD leaves metadata open (the API server checks it): check it here.
            schema.setdefault("properties", {})["metadata"] = _object_meta()
            schema["properties"].setdefault("apiVersion", {"type": "string"})
            schema["properties"].setdefault("kind", {"type": "string"})
            schema["required"] = sorted(
                {*schema.get("required", []), "apiVersion", "kind", "metadata"}
            )
            schemas[key] = strict_schema(schema, _CLOSED.get(key))
    return schemas


def schema_for(api_version: str, kind: str) -> dict[str, Any]:
    """The strict schema of one kind.

    Raises:
        KeyError: No schema is known for this kind: add one before using the kind.
    """
    if (api_version, kind) in _CORE:
        return {"$ref": _CORE[(api_version, kind)]}
    return _crd_schemas()[(api_version, kind)]


@cache
def _kubernetes_validator(api_version: str, kind: str) -> Draft202012Validator | None:
    """kubernetes_validate.validate's strict validator, kept so that it reports every error."""
    version = [
        v
        for v in kubernetes_schemas.all_versions()
        if kubernetes_schemas.major_minor(v) <= kubernetes_schemas.major_minor(KUBERNETES_VERSION)
    ][-1]
    directory = f"kubernetes-json-schema/v{version}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kubernetes_schemas.schema_contents(
            f"{directory}/{kind.lower()}-{group}.json", KUBERNETES_VERSION
        )
    except FileNotFoundError:
        return None
    definitions = kubernetes_schemas.schema_contents(
        f"{directory}/_definitions.json", KUBERNETES_VERSION
    )
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return Draft202012Validator(schema, registry=registry)


def kubernetes_errors(document: Mapping[str, Any]) -> list[str] | None:
    """Every violation of the Kubernetes schema of a built-in kind; None for other kinds."""
    api_version, kind = document.get("apiVersion", "?"), document.get("kind", "?")
    validator = _kubernetes_validator(api_version, kind)
    if validator is None:
        return None
    return _messages(document, validator)


def _messages(document: Mapping[str, Any], validator: Any) -> list[str]:
    kind = document.get("kind", "?")
    name = (document.get("metadata") or {}).get("name", "?")
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    messages = []
    for error in errors:
        # anyOf/oneOf: the branch errors say which field is wrong.
        for cause in error.context or [error]:
            where = ".".join(str(part) for part in cause.absolute_path) or "<root>"
            messages.append(f"{kind} {name}: {where}: {cause.message}")
    return messages


def validation_errors(document: Mapping[str, Any]) -> list[str]:
    """Every schema violation of one manifest, each naming the object and the field."""
    api_version, kind = document.get("apiVersion", "?"), document.get("kind", "?")
    name = (document.get("metadata") or {}).get("name", "?")
    try:
        schema = schema_for(api_version, kind)
    except KeyError:
        built_in = kubernetes_errors(document)
        if built_in is not None:
            return built_in
        return [f"{kind} {name}: no schema for {api_version} {kind}"]
    validator = Draft7Validator(schema, registry=_registry())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    messages = []
    for error in errors:
        where = ".".join(str(part) for part in error.absolute_path) or "<root>"
        messages.append(f"{kind} {name}: {where}: {error.message}")
    return messages
