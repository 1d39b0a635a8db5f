"""The runbook's model rollout and deploy.md's first apply produce objects Knative accepts."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import KNATIVE, OVERLAYS, REPO
from .routing import render_kustomize
from .test_auth_manifests import label_selector_matches
from .trigger_validation import destination_errors, trigger_spec_errors

Render = Callable[[str], list[dict[str, Any]]]
RUNBOOK = REPO / "docs" / "runbook.md"
DEPLOY = REPO / "docs" / "deploy.md"
NEXT_FILE = "render-trigger-next.yaml"
NEW_MODEL = "black-forest-labs/FLUX.1-schnell"


def _triggers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Trigger"}


def _rollout_overlay(tmp_path: Path) -> list[dict[str, Any]]:
    """The prod overlay as the runbook's "Another model", change 1, leaves it: the shipped
    next Trigger, its imagegenmodel the new id, listed under resources."""
    text = " ".join(RUNBOOK.read_text().split())
    assert f"overlays/prod/{NEXT_FILE}" in text, "the runbook names the file to add"
    copied = tmp_path / "knative"
    shutil.copytree(KNATIVE, copied)
    prod = copied / "overlays" / "prod"
    nxt = prod / NEXT_FILE
    nxt.write_text(nxt.read_text().replace("NEW-MODEL-ID", NEW_MODEL))
    kustomization = prod / "kustomization.yaml"
    source = kustomization.read_text()
    assert "resources:\n" in source
    kustomization.write_text(source.replace("resources:\n", f"resources:\n  - {NEXT_FILE}\n", 1))
    return render_kustomize(prod)


def test_the_rollouts_second_render_trigger_is_complete(tmp_path: Path) -> None:
    docs = _rollout_overlay(tmp_path)
    triggers = _triggers(docs)
    for name, trigger in triggers.items():
        assert trigger_spec_errors(trigger) == [], name
    current, nxt = triggers["imagegen-render"], triggers["imagegen-render-next"]
    assert nxt["metadata"]["namespace"] == current["metadata"]["namespace"]
    assert nxt["metadata"]["labels"] == current["metadata"]["labels"]
    # Same broker, subscriber (with its OIDC audience) and delivery as imagegen-render; only
    # the model differs.
    expected = copy.deepcopy(current["spec"])
    expected["filter"]["attributes"]["imagegenmodel"] = NEW_MODEL
    assert nxt["spec"] == expected
    assert current["spec"]["filter"]["attributes"]["imagegenmodel"] != NEW_MODEL


def test_the_next_trigger_is_not_applied_by_default(render: Render) -> None:
    assert "imagegen-render-next" not in _triggers(render("prod"))
    assert (KNATIVE / "overlays" / "prod" / NEXT_FILE).is_file()


def test_the_runbook_names_no_labels_the_manifests_lack() -> None:
    assert "imagegen.dev/..." not in RUNBOOK.read_text()


@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_every_rendered_trigger_passes_the_webhooks_validation(render: Render, target: str) -> None:
    triggers = _triggers(render(target))
    assert triggers
    for name, trigger in triggers.items():
        assert trigger_spec_errors(trigger) == [], name


def test_a_patch_listed_as_a_resource_is_refused(render: Render) -> None:
    """What the runbook once said to apply: render-trigger.yaml (a patch: name and filter)
    copied as a resource."""
    import yaml

    patch = yaml.safe_load((KNATIVE / "overlays" / "prod" / "render-trigger.yaml").read_text())
    patch["metadata"]["name"] = "imagegen-render-next"
    assert trigger_spec_errors(patch) == [
        "spec.broker: missing field(s)",
        "spec.subscriber.ref, spec.subscriber.uri: expected at least one, got none",
    ]


def _spec_errors(**spec: Any) -> list[str]:
    """trigger_spec_errors of a Trigger in namespace ``ns`` with ``spec``."""
    return trigger_spec_errors({"metadata": {"namespace": "ns"}, "spec": spec})


_REF = {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "s"}
_GOOD = {"broker": "b", "subscriber": {"ref": _REF}}


def test_trigger_validation_rules() -> None:
    def errors(**spec: Any) -> list[str]:
        return _spec_errors(broker="b", **spec)

    ref = _REF
    assert errors(subscriber={"ref": ref}) == []
    assert errors(subscriber={"uri": "http://example.com/x"}) == []
    assert errors(subscriber={"uri": "/relative"}) == [
        "spec.subscriber.uri: invalid value: Relative URI is not allowed when Ref and "
        "[apiVersion, kind, name] is absent"
    ]
    assert errors(subscriber={"ref": ref, "uri": "http://x/"}) == [
        "spec.subscriber[apiVersion, kind, name], spec.subscriber.ref, spec.subscriber.uri: "
        "Absolute URI is not allowed when Ref or [apiVersion, kind, name] is present"
    ]
    assert errors(subscriber={"ref": {"kind": "Service"}}) == [
        "spec.subscriber.ref.name: missing field(s)",
        "spec.subscriber.ref.apiVersion: missing field(s)",
    ]
    assert errors(subscriber={"ref": {**ref, "namespace": "other"}}) == [
        "spec.subscriber.ref.namespace: mismatched namespaces"
    ]
    assert destination_errors({}) == ["ref, uri: expected at least one, got none"]


def test_trigger_filter_holds_only_attributes() -> None:
    """ValidateAttributeFilters: ``spec.filter`` has ``attributes`` and nothing else to check;
    the dialects live in ``spec.filters``."""
    assert _spec_errors(**_GOOD, filter={"attributes": {"Type": "x", "source": "y"}}) == [
        'spec.filter.attributes[Type]: invalid key name "Type"'
    ]
    assert _spec_errors(**_GOOD, filter={"attributes": {"type": "x", "imagegenmodel": "m"}}) == []
    # Not fields of TriggerFilter: the API server prunes them, the webhook never sees them.
    assert _spec_errors(**_GOOD, filter={"all": [{"exact": {"a": "1", "b": "2"}}]}) == []


def test_trigger_broker_and_broker_ref_are_one_of() -> None:
    broker_ref = {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": "b"}
    subscriber = _GOOD["subscriber"]
    assert _spec_errors(brokerRef=broker_ref, subscriber=subscriber) == []
    assert _spec_errors(broker="b", brokerRef=broker_ref, subscriber=subscriber) == [
        "spec.broker, spec.brokerRef: expected exactly one, got both"
    ]
    assert _spec_errors(subscriber=subscriber) == ["spec.broker: missing field(s)"]
    # cross-namespace-event-links is off by default: no namespace, and the error's path is
    # spec.namespace, as upstream builds it.
    assert _spec_errors(brokerRef={**broker_ref, "namespace": "other"}, subscriber=subscriber) == [
        "spec.namespace: must not set the field(s)"
    ]


def test_trigger_filters_dialects() -> None:
    """ValidateSubscriptionAPIFiltersList: one dialect per filter, lowercase attribute names,
    nested filters the same; several keys in one ``exact`` are fine."""
    assert _spec_errors(**_GOOD, filters=[{"exact": {"type": "a", "source": "b"}}]) == []
    assert _spec_errors(**_GOOD, filters=[{"all": [{"exact": {"a": "1"}}, {"not": {}}]}]) == []
    assert _spec_errors(**_GOOD, filters=[{"exact": {"Type": "a"}}]) == [
        'spec.filters[0].exact[Type]: invalid key name "Type"'
    ]
    assert _spec_errors(**_GOOD, filters=[{"exact": {"type": "a"}, "prefix": {"x": "b"}}]) == [
        "multiple dialects found, filters can have only one dialect set"
    ]
    assert _spec_errors(**_GOOD, filters=[{"not": {"suffix": {"type": "a"}}, "any": [{}]}]) == [
        "multiple dialects found, filters can have only one dialect set"
    ]
    nested = [{"all": [{"exact": {"a": "1"}}, {"not": {"suffix": {"X": "y"}}}]}]
    assert _spec_errors(**_GOOD, filters=nested) == [
        'spec.filters[0].all[1].not.suffix[X]: invalid key name "X"'
    ]
    # Upstream re-indexes the errors already collected at each step of the list, so an
    # error in the first of two filters is reported at [1][0].
    two = [{"prefix": {"Bad": "x"}}, {"exact": {"ok": "y"}}]
    assert _spec_errors(**_GOOD, filters=two) == [
        'spec.filters[1][0].prefix[Bad]: invalid key name "Bad"'
    ]


def test_trigger_filters_cesql_is_not_guessed() -> None:
    with pytest.raises(NotImplementedError, match="CloudEvents SQL"):
        _spec_errors(**_GOOD, filters=[{"cesql": "type = 'a'"}])


# deploy.md section 4: the model volume's Job runs, and completes, before render starts.


def _commands(text: str) -> list[list[str]]:
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("kubectl "):
                try:
                    commands.append(shlex.split(line))
                except ValueError:  # a command whose quotes span lines: not one checked here
                    continue
    return commands


def _requirements(selector: str) -> dict[str, Any]:
    """A kubectl -l selector of the forms the docs use, as a LabelSelector."""
    match = re.fullmatch(r"([\w./-]+)\s+in\s+\(([^)]*)\)", selector)
    if match:
        values = [v.strip() for v in match[2].split(",")]
        return {"matchExpressions": [{"key": match[1], "operator": "In", "values": values}]}
    key, value = selector.split("=", 1)
    return {"matchLabels": {key: value}}


def _selected(docs: list[dict[str, Any]], selector: str) -> set[tuple[str, str]]:
    wanted = _requirements(selector)
    return {
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if label_selector_matches(wanted, d["metadata"].get("labels") or {})
    }


def test_the_first_prod_apply_runs_the_pull_job_before_the_rest(render: Render) -> None:
    text = DEPLOY.read_text()
    section = text.split("## 4. Production", 1)[1].split("\n## 5.", 1)[0]
    commands = _commands(section.split("Then, first", 1)[1])
    overlay = ["kubectl", "apply", "-k", "knative/overlays/prod"]
    [first] = [i for i, c in enumerate(commands) if c[:4] == overlay and "-l" in c]
    [wait] = [i for i, c in enumerate(commands) if c[:2] == ["kubectl", "-n"] and "wait" in c]
    [whole] = [i for i, c in enumerate(commands) if c == overlay]
    assert first < wait < whole
    docs = render("prod")
    [job] = [d for d in docs if d["kind"] == "Job"]
    name = job["metadata"]["name"]
    namespace = job["metadata"]["namespace"]
    # The wait names the Job and its namespace, and waits for its completion.
    assert commands[wait][2] == namespace
    assert f"job/{name}" in commands[wait]
    assert "--for=condition=Complete" in commands[wait]
    # The first apply selects the Job and what its pod needs, and nothing that serves.
    selector = commands[first][commands[first].index("-l") + 1]
    # Equality requirements only: what `kubectl apply --help` says -l supports (=, ==, !=).
    assert all(re.fullmatch(r"[\w./-]+(=|==|!=)[\w.-]*", r) for r in selector.split(",")), selector
    selected = _selected(docs, selector)
    pod = job["spec"]["template"]["spec"]
    needed = {("Job", name)}
    needed |= {
        ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    needed |= {
        ("ConfigMap", s["configMapRef"]["name"])
        for s in pod["containers"][0]["envFrom"]
        if "configMapRef" in s and not s["configMapRef"].get("optional")
    }
    assert selected == needed
    # The runbook's first deploy applies the same selector.
    runbook = _commands(RUNBOOK.read_text())
    assert any(c[:4] == overlay and selector in c for c in runbook)
