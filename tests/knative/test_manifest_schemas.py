"""Every rendered object validates against its strict schema, and the check can fail."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import TARGETS
from .manifest_schemas import schema_for, strict_schema, validation_errors

Render = Callable[[str], list[dict[str, Any]]]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_rendered_objects_validate_strictly(render: Render, target: str) -> None:
    docs = render(target)
    assert docs, f"{target} renders nothing"
    errors = [error for doc in docs for error in validation_errors(doc)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("target", ["dev", "prod"])
def test_overlay_renders_the_whole_pipeline(render: Render, target: str) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in render(target)}
    expected = {
        ("Broker", "imagegen"),
        ("PingSource", "imagegen-dream"),
        ("ConfigMap", "imagegen-config"),
        *(
            ("Service", f"imagegen-{n}")
            for n in ("enhance", "render", "persist", "derive", "deadletter")
        ),
    }
    assert expected <= kinds


# A misspelt or mistyped field in each kind of object: the API server would drop or reject
# it at apply time; the strict check must reject it here.
TYPOS: list[tuple[str, str, str, Callable[[dict[str, Any]], None], str]] = [
    (
        "Service",
        "imagegen-render",
        "spec field",
        lambda d: d["spec"]["template"]["spec"].update(containerConcurency=5),
        "containerConcurency",
    ),
    (
        "Service",
        "imagegen-render",
        "container field",
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(resoures={}),
        "resoures",
    ),
    (
        "Service",
        "imagegen-render",
        "annotation value not a string",
        lambda d: d["spec"]["template"]["metadata"]["annotations"].update(
            {"autoscaling.knative.dev/min-scale": 1}
        ),
        "is not of type 'string'",
    ),
    (
        "Service",
        "imagegen-render",
        "int-or-string given a float",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"].update(
            port=80.5
        ),
        "port",
    ),
    (
        "Trigger",
        "imagegen-render",
        "delivery field",
        lambda d: d["spec"]["delivery"].update(retrys=3),
        "retrys",
    ),
    (
        "Trigger",
        "imagegen-render",
        "spec field under preserve-unknown-fields",
        lambda d: d["spec"].update(subscribr={}),
        "subscribr",
    ),
    (
        "Trigger",
        "imagegen-render",
        "metadata field",
        lambda d: d["metadata"].update(annotaions={}),
        "annotaions",
    ),
    (
        "PingSource",
        "imagegen-dream",
        "spec field",
        lambda d: d["spec"].update(schedul="* * * * *"),
        "schedul",
    ),
    (
        "Broker",
        "imagegen",
        "metadata name",
        lambda d: d["metadata"].update(name="Imagegen"),
        "does not match",
    ),
    (
        "EventType",
        "imagegen-image-rendered",
        "spec field",
        lambda d: d["spec"].update(dataschema="x"),
        "dataschema",
    ),
    (
        "ConfigMap",
        "imagegen-config",
        "number as data",
        lambda d: d["data"].update(X=4),
        "is not of type 'string'",
    ),
]


@pytest.mark.parametrize(
    ("kind", "name", "what", "mutate", "message"), TYPOS, ids=[f"{t[0]}-{t[2]}" for t in TYPOS]
)
def test_strict_check_rejects_a_typo(
    render: Render,
    kind: str,
    name: str,
    what: str,
    mutate: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    doc = copy.deepcopy(_find(render("dev"), kind, name))
    assert validation_errors(doc) == []
    mutate(doc)
    errors = validation_errors(doc)
    assert any(message in error for error in errors), errors


def test_an_unknown_kind_is_an_error() -> None:
    errors = validation_errors(
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}}
    )
    assert errors == ["Widget x: no schema for example.com/v1 Widget"]


def test_built_in_kinds_use_the_kubernetes_schemas(render: Render) -> None:
    job = _find(render("prod"), "Job", "imagegen-models-pull")
    assert validation_errors(job) == []
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    job["spec"]["backoffLimit"] = "4"
    errors = validation_errors(job)
    assert any("volumeMount" in e for e in errors), errors
    assert any("backoffLimit" in e for e in errors), errors


def test_objects_that_preserve_unknown_fields_stay_open(render: Render) -> None:
    # tolerations and emptyDir are free-form in the CRD: Kubernetes validates them later.
    doc = _find(render("dev"), "Service", "imagegen-render")
    spec = doc["spec"]["template"]["spec"]
    spec["tolerations"] = [{"key": "example.com/any", "operator": "Exists", "tolerationSeconds": 1}]
    spec["volumes"][0]["emptyDir"]["medium"] = "Memory"
    assert validation_errors(doc) == []


def test_trigger_filter_accepts_any_attribute(render: Render) -> None:
    doc = _find(render("dev"), "Trigger", "imagegen-enhance")
    doc["spec"]["filter"]["attributes"]["source"] = "/somewhere"
    assert validation_errors(doc) == []


def test_strict_schema_closes_only_listed_objects() -> None:
    schema = {
        "type": "object",
        "properties": {
            "open": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {},
            },
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "port": {"x-kubernetes-int-or-string": True},
        },
    }
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["closed"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["open"]
    assert strict["properties"]["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    forced = strict_schema(schema, {("open",): {"extra": {"type": "string"}}})
    assert forced["properties"]["open"]["additionalProperties"] is False
    assert forced["properties"]["open"]["properties"] == {"extra": {"type": "string"}}


def test_every_knative_kind_used_has_a_served_schema() -> None:
    for api_version, kind in [
        ("serving.knative.dev/v1", "Service"),
        ("eventing.knative.dev/v1", "Broker"),
        ("eventing.knative.dev/v1", "Trigger"),
        ("eventing.knative.dev/v1beta2", "EventType"),
        ("sources.knative.dev/v1", "PingSource"),
    ]:
        assert schema_for(api_version, kind)["type"] == "object"


def test_the_pull_job_can_be_applied_alone_with_the_next_models(render: Render) -> None:
    """The runbook's rollout pulls new weights before imagegen-config names them: the Job is
    applied alone by its label, and reads imagegen-models-next after imagegen-config (the
    later envFrom source wins), optional so that a plain apply needs none."""
    job = _find(render("prod"), "Job", "imagegen-models-pull")
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "models-pull"
    labelled = [
        d
        for d in render("prod")
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "models-pull"
    ]
    assert [d["kind"] for d in labelled] == ["Job"]
    sources = job["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    maps = [s["configMapRef"] for s in sources if "configMapRef" in s]
    assert [m["name"] for m in maps] == ["imagegen-config", "imagegen-models-next"]
    assert maps[1]["optional"] is True


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_every_imagegen_variable_in_the_manifests_is_a_setting(
    render: Render, overlay: str
) -> None:
    """A misspelled variable in a ConfigMap or a container's env is read by no one: the
    default would serve instead, without a word but the function's warning at start-up."""
    from imagegen.settings import Settings

    names: dict[str, str] = {}
    for doc in render(overlay):
        if doc["kind"] == "ConfigMap":
            names.update(dict.fromkeys(doc.get("data", {}), "x"))

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for entry in node.get("env", []) if isinstance(node.get("env"), list) else []:
                    names[entry["name"]] = "x"
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(doc.get("spec", {}))
    assert any(name.startswith("IMAGEGEN_") for name in names)
    assert Settings.unknown_variables(environ=names, dotenv=None) == []
    assert Settings.unknown_variables(environ={"IMAGEGEN_MODLE": "x"}, dotenv=None) == [
        "IMAGEGEN_MODLE is no setting (ignored); did you mean IMAGEGEN_MODEL?"
    ]
