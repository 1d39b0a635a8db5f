"""What Knative Eventing's webhook refuses in a Trigger's spec, rule by rule.

A reading of knative/eventing ``pkg/apis/eventing/v1/trigger_validation.go`` (v1.22 line):
``TriggerSpec.Validate`` (``broker`` or ``brokerRef``, exactly one; ``brokerRef.namespace``
refused while the ``cross-namespace-event-links`` feature is off, its default),
``ValidateAttributeFilters`` / ``ValidateAttributesNames`` for ``spec.filter`` (which holds only
``attributes``), and ``ValidateSubscriptionAPIFiltersList`` / ``ValidateSubscriptionAPIFilter`` /
``ValidateOneOf`` for ``spec.filters`` (the SubscriptionsAPI dialects ``exact``, ``prefix``,
``suffix``, ``all``, ``any``, ``not``, ``cesql``: one dialect per filter, attribute names
lowercase alphanumeric, nested filters checked the same way). A ``cesql`` expression is checked
upstream by the CloudEvents SQL parser (``ValidateCESQLExpression``), which is not modelled:
:func:`trigger_spec_errors` raises :class:`NotImplementedError` for one rather than guess.
Then knative.dev/pkg ``apis/duck/v1/destination.go`` (``Destination.Validate``,
``ValidateDestination``, without ``CACerts``) and ``apis/duck/v1/knative_reference.go``
(``KReference.Validate``, with the experimental ``group`` not allowed, as the Trigger webhook
runs it). ``spec.delivery`` (``DeliverySpec.Validate``) and the Trigger's annotations are not
modelled here: the schema and the delivery tests check those.

Each error is one ``apis.FieldError`` leaf, written ``paths: message`` (its paths joined by
``", "`` as ``FieldError.Error`` does, and just ``message`` for an error with no path), in the
order the webhook collects them, without ``Details``. Paths are built as
knative.dev/pkg ``apis/field_error.go`` builds them (``ViaField``, ``ViaIndex``, ``ViaKey``,
``flatten``), quirks included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["destination_errors", "trigger_spec_errors"]

# trigger_validation.go validAttributeName: lowercase alphanumeric, starting with a letter.
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9]*$")


@dataclass(frozen=True)
class _FieldError:
    """One leaf of an ``apis.FieldError``: its message and its paths."""

    message: str
    paths: tuple[str, ...]

    def __str__(self) -> str:
        return f"{', '.join(self.paths)}: {self.message}" if self.paths else self.message


def _flatten(path: Sequence[str]) -> str:
    """field_error.go ``flatten``: dotted parts, ``[…]`` glued to the part before, "" dropped."""
    parts: list[str] = []
    for part in path:
        for p in part.split("."):
            if p == "":
                continue
            if parts and p.startswith("[") and p.endswith("]"):
                parts[-1] += p
            else:
                parts.append(p)
    return ".".join(parts)


def _via(errors: Iterable[_FieldError], *prefix: str) -> list[_FieldError]:
    """``FieldError.ViaField`` (and ``ViaIndex``/``ViaKey``, which pass ``[i]``/``[key]``):
    an error with no path keeps none."""
    return [_FieldError(e.message, tuple(_flatten([*prefix, p]) for p in e.paths)) for e in errors]


def _go_quote(text: str) -> str:
    """Go's ``%q`` for the printable names an attribute key holds."""
    return json.dumps(text, ensure_ascii=False)


def trigger_spec_errors(trigger: Mapping[str, Any]) -> list[str]:
    """TriggerSpec.Validate, via ``spec``: every error, as ``paths: message``.

    Raises:
        NotImplementedError: a ``spec.filters`` entry holds a ``cesql`` expression.
    """
    spec = trigger.get("spec") or {}
    namespace = (trigger.get("metadata") or {}).get("namespace", "")
    return [str(e) for e in _via(_spec_errors(spec, namespace), "spec")]


def _spec_errors(spec: Mapping[str, Any], namespace: str) -> list[_FieldError]:
    errors: list[_FieldError] = []
    broker_ref = spec.get("brokerRef")
    # if ts.BrokerRef == nil && ts.Broker == "" { ErrMissingField("broker") }
    # else if ts.BrokerRef != nil && ts.Broker != "" { ErrMultipleOneOf("broker", "brokerRef") }
    if broker_ref is None and not spec.get("broker"):
        errors.append(_FieldError("missing field(s)", ("broker",)))
    elif broker_ref is not None and spec.get("broker"):
        errors.append(_FieldError("expected exactly one, got both", ("broker", "brokerRef")))
    # With CrossNamespaceEventLinks disabled: ErrDisallowedFields("namespace"), not put under
    # "brokerRef" upstream, so its path is spec.namespace.
    if broker_ref is not None and broker_ref.get("namespace"):
        errors.append(_FieldError("must not set the field(s)", ("namespace",)))
    # ValidateAttributeFilters(ts.Filter).ViaField("filter")
    filter_spec = spec.get("filter")
    if filter_spec is not None:
        attributes = _attribute_name_errors(filter_spec.get("attributes"))
        errors += _via(_via(attributes, "attributes"), "filter")
    # ValidateSubscriptionAPIFiltersList(ctx, ts.Filters).ViaField("filters")
    errors += _via(_filters_list_errors(spec.get("filters")), "filters")
    # ts.Subscriber is a duckv1.Destination value, never nil: Validate always runs
    # ValidateDestination, so a missing subscriber is "expected at least one, got none".
    errors += _via(_destination_errors(spec.get("subscriber") or {}, namespace), "subscriber")
    return errors


def _attribute_name_errors(attributes: Mapping[str, Any] | None) -> list[_FieldError]:
    """ValidateAttributesNames: ErrInvalidKeyName(attr, CurrentField, …).ViaKey(attr)."""
    return [
        e
        for name in attributes or {}
        if not _ATTRIBUTE_NAME.match(name)
        for e in _via([_FieldError(f"invalid key name {_go_quote(name)}", ("",))], f"[{name}]")
    ]


def _filters_list_errors(filters: Sequence[Mapping[str, Any]] | None) -> list[_FieldError]:
    """ValidateSubscriptionAPIFiltersList."""
    errors: list[_FieldError] = []
    for index, one in enumerate(filters or []):
        # errs = errs.Also(ValidateSubscriptionAPIFilter(ctx, &f)).ViaIndex(i): the index goes
        # on every error collected so far, so an error in filters[0] of two reads [1][0].
        errors = _via([*errors, *_filter_errors(one)], f"[{index}]")
    return errors


def _filter_errors(one: Mapping[str, Any]) -> list[_FieldError]:
    """ValidateSubscriptionAPIFilter, in its order."""
    errors: list[_FieldError] = []
    if _has_multiple_dialects(one):  # ValidateOneOf: ErrGeneric, with no path
        errors.append(
            _FieldError("multiple dialects found, filters can have only one dialect set", ())
        )
    for dialect in ("exact", "prefix", "suffix"):
        errors += _via(_attribute_name_errors(one.get(dialect)), dialect)
    for dialect in ("all", "any"):
        errors += _via(_filters_list_errors(one.get(dialect)), dialect)
    if one.get("not") is not None:
        errors += _via(_filter_errors(one["not"]), "not")
    if one.get("cesql"):
        raise NotImplementedError(
            f"cesql {one['cesql']!r}: CloudEvents SQL expressions are not modelled"
        )
    return errors


def _has_multiple_dialects(one: Mapping[str, Any]) -> bool:
    """hasMultipleDialects: maps and lists count when not empty, ``not`` when present."""
    found = [
        *(bool(one.get(d)) for d in ("exact", "prefix", "suffix", "all", "any")),
        one.get("not") is not None,
        bool(one.get("cesql")),
    ]
    return sum(found) > 1


def destination_errors(destination: Mapping[str, Any], parent_namespace: str = "") -> list[str]:
    """ValidateDestination: the first rule that applies, as ``paths: message``."""
    return [str(e) for e in _destination_errors(destination, parent_namespace)]


def _destination_errors(destination: Mapping[str, Any], parent_namespace: str) -> list[_FieldError]:
    ref, uri = destination.get("ref"), destination.get("uri")
    if ref is None and uri is None:
        return [_FieldError("expected at least one, got none", ("ref", "uri"))]
    absolute = uri is not None and bool(urlsplit(uri).scheme)
    if ref is not None and uri is not None and absolute:
        return [
            _FieldError(
                "Absolute URI is not allowed when Ref or [apiVersion, kind, name] is present",
                ("[apiVersion, kind, name]", "ref", "uri"),
            )
        ]
    if ref is None and uri is not None and (not absolute or not urlsplit(uri).hostname):
        return [
            _FieldError(
                "invalid value: Relative URI is not allowed when Ref and "
                "[apiVersion, kind, name] is absent",
                ("uri",),
            )
        ]
    if ref is not None and uri is None:
        return _via(_reference_errors(ref, parent_namespace), "ref")
    return []


def _reference_errors(ref: Mapping[str, Any], parent_namespace: str) -> list[_FieldError]:
    """KReference.Validate, without KReferenceGroupAllowed."""
    errors: list[_FieldError] = []
    if not ref.get("name"):
        errors.append(_FieldError("missing field(s)", ("name",)))
    if ref.get("group"):
        errors.append(_FieldError("must not set the field(s)", ("group",)))
    if not ref.get("apiVersion"):
        errors.append(_FieldError("missing field(s)", ("apiVersion",)))
    if not ref.get("kind"):
        errors.append(_FieldError("missing field(s)", ("kind",)))
    namespace = ref.get("namespace", "")
    if namespace and parent_namespace and namespace != parent_namespace:
        errors.append(_FieldError("mismatched namespaces", ("namespace",)))
    return errors
