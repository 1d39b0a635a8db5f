"""What Knative Eventing's webhook refuses in a Trigger's spec, rule by rule.

A reading of knative/eventing ``pkg/apis/eventing/v1/trigger_validation.go``
(``TriggerSpec.Validate``, ``validateFilterSpec``) and of knative.dev/pkg
``apis/duck/v1/destination.go`` (``Destination.Validate``, ``ValidateDestination``) and
``apis/duck/v1/knative_reference.go`` (``KReference.Validate``, with the experimental
``group`` not allowed, as the Trigger webhook runs it). ``spec.delivery``
(``DeliverySpec.Validate``) is not modelled here: its fields are checked by the schema and the
delivery tests. Each message names the field as the webhook's ``apis.FieldError`` would.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["destination_errors", "trigger_spec_errors"]

# trigger_validation.go validAttributeName: lowercase alphanumeric, starting with a letter.
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9]*$")


def trigger_spec_errors(trigger: Mapping[str, Any]) -> list[str]:
    """TriggerSpec.Validate, under ``spec``: every error, as ``field: message``."""
    spec = trigger.get("spec") or {}
    namespace = (trigger.get("metadata") or {}).get("namespace", "")
    errors: list[str] = []
    # if ts.Broker == "" { apis.ErrMissingField("broker") }
    if not spec.get("broker"):
        errors.append("spec.broker: missing field(s)")
    # validateFilterSpec(ts.Filter, []string{"filter"})
    errors += [f"spec.{e}" for e in _filter_errors(spec.get("filter"), ["filter"])]
    # ts.Subscriber is a duckv1.Destination value, never nil: Validate always runs
    # ValidateDestination, so a missing subscriber is "expected at least one, got none".
    errors += [
        f"spec.subscriber{e}" for e in destination_errors(spec.get("subscriber") or {}, namespace)
    ]
    return errors


def _filter_errors(filter_spec: Mapping[str, Any] | None, path: list[str]) -> list[str]:
    """validateFilterSpec."""
    if filter_spec is None:
        return []
    errors: list[str] = []
    where = ".".join(path)
    for attribute in filter_spec.get("attributes") or {}:
        if not _ATTRIBUTE_NAME.match(attribute):
            errors.append(f"{where}.attributes: Invalid attribute name: {attribute!r}")
    for dialect, label in (("exact", "Exact"), ("prefix", "Prefix"), ("suffix", "Suffix")):
        values = filter_spec.get(dialect)
        if values is None:
            continue
        if len(values) != 1:
            errors.append(f"{where}.{dialect}: {label} can have only one key-value")
        for attribute in values:
            if not _ATTRIBUTE_NAME.match(attribute):
                errors.append(f"{where}.{dialect}: Invalid attribute name: {attribute!r}")
    for dialect, label in (("all", "All"), ("any", "Any")):
        nested = filter_spec.get(dialect)
        if nested is None:
            continue
        if len(nested) < 1:
            errors.append(f"{where}.{dialect}: {label} must contain at least one nested filter")
        for index, child in enumerate(nested):
            errors += _filter_errors(child, [*path, dialect, f"[{index}]"])
    if filter_spec.get("not") is not None:
        errors += _filter_errors(filter_spec["not"], [*path, "not"])
    return errors


def destination_errors(destination: Mapping[str, Any], parent_namespace: str = "") -> list[str]:
    """ValidateDestination: the first rule that applies, as the Go function returns."""
    ref, uri = destination.get("ref"), destination.get("uri")
    if ref is None and uri is None:
        return ["[ref, uri]: expected at least one, got none"]
    absolute = uri is not None and bool(urlsplit(uri).scheme)
    if ref is not None and uri is not None and absolute:
        return [
            "[[apiVersion, kind, name], ref, uri]: Absolute URI is not allowed when Ref or "
            "[apiVersion, kind, name] is present"
        ]
    if ref is None and uri is not None and (not absolute or not urlsplit(uri).hostname):
        return [
            "uri: invalid value: Relative URI is not allowed when Ref and "
            "[apiVersion, kind, name] is absent"
        ]
    if ref is not None and uri is None:
        return [f".ref{e}" for e in _reference_errors(ref, parent_namespace)]
    return []


def _reference_errors(ref: Mapping[str, Any], parent_namespace: str) -> list[str]:
    """KReference.Validate, without KReferenceGroupAllowed."""
    errors: list[str] = []
    if not ref.get("name"):
        errors.append(".name: missing field(s)")
    if ref.get("group"):
        errors.append(".group: must not set the field(s)")
    if not ref.get("apiVersion"):
        errors.append(".apiVersion: missing field(s)")
    if not ref.get("kind"):
        errors.append(".kind: missing field(s)")
    namespace = ref.get("namespace", "")
    if namespace and parent_namespace and namespace != parent_namespace:
        errors.append(".namespace: mismatched namespaces")
    return errors
