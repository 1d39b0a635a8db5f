"""The plugins' contributions past what a job holds (its count, its bytes together), or that
are no valid contribution read from their JSON, are left out as skipped, in plugin order, and
the job is built with the rest.

They failed the request instead: the job refused them, and enhance answered 500, to be
retried and dead-lettered with the same plugins adding the same again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from imagegen.enhance import EnhanceStage
from imagegen.errors import InvalidRequest
from imagegen.models import (
    MAX_CONTRIBUTION_DATA_BYTES,
    MAX_CONTRIBUTIONS,
    MAX_CONTRIBUTIONS_BYTES,
    MAX_PLUGIN_NAME_CHARS,
    Contribution,
    EnhancedPrompt,
)
from imagegen.plugins import PluginContext, PluginSet, PromptPlugin, noting_skips
from imagegen.settings import Settings
from imagegen.telemetry import tracer
from imagegen.validation import parse_model
from tests.enhance.conftest import NOW, MakeStage, run
from tests.fakes.ollama_server import FakeOllama
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import free_port
from tests.observability.conftest import InMemoryTelemetry, otel  # noqa: F401 - a fixture
from tests.plugins.sample_plugins import (
    BulkyPlugin,
    EchoPlugin,
    FailingPlugin,
    install_distribution,
)

# Each bulky plugin adds 30 KiB: six fit in a job's 192 KiB together, a seventh does not.
BULKY = [f"bulky_{i}" for i in range(1, 9)]
KEPT = BULKY[:6]


def _utf8_json(value: Any) -> int:
    """Bytes as a job's contributions are bounded: compact JSON in UTF-8."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _skipped(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """The plugins the log says were skipped, each with the line saying it."""
    said = [r.getMessage() for r in caplog.records if r.name == "imagegen.plugins"]
    return {
        line.split()[1]: line for line in said if line.startswith("plugin ") and "skipped" in line
    }


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    fake = FakeOllama()
    fake.port = free_port()
    with fake:
        yield fake


def test_six_bulky_contributions_fit_and_a_seventh_does_not() -> None:
    """The sizes the tests below rely on, measured apart from the code under test."""
    one = {"plugin": "bulky_1", "text": "from bulky_1", "data": {"blob": "x" * 30 * 1024}}
    assert _utf8_json([one] * 6) <= MAX_CONTRIBUTIONS_BYTES < _utf8_json([one] * 7)


async def test_contributions_past_the_byte_budget_are_skipped_in_plugin_order(
    make_stage: MakeStage, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = [BulkyPlugin(name=name) for name in BULKY[:7]]
    plugins += [EchoPlugin(name="echo"), BulkyPlugin(name=BULKY[7])]
    stage = make_stage(PluginSet(plugins, settings=settings))

    with caplog.at_level(logging.WARNING), noting_skips() as noted:
        job = await run(stage, enhance=False)

    # A later one that still fits is kept: each is left out as a plugin that fails is.
    assert [c.plugin for c in job.contributions] == [*KEPT, "echo"]
    assert job.contributions[-1].data["before"] == KEPT, "later plugins see only the kept"
    assert _utf8_json([c.model_dump(mode="json") for c in job.contributions]) <= (
        MAX_CONTRIBUTIONS_BYTES
    )
    assert [name for name, _ in noted] == [BULKY[6], BULKY[7]]
    for _, why in noted:
        assert f"at most {MAX_CONTRIBUTIONS_BYTES} bytes together" in why
    assert sorted(_skipped(caplog)) == [BULKY[6], BULKY[7]]


async def test_contributions_past_the_most_a_job_holds_are_skipped(
    make_stage: MakeStage, settings: Settings
) -> None:
    """More plugins than a job holds contributions, given in code: the first ones are kept."""
    names = [f"echo_{i}" for i in range(MAX_CONTRIBUTIONS + 2)]
    stage = make_stage(PluginSet([EchoPlugin(name=n) for n in names], settings=settings))

    with noting_skips() as noted:
        job = await run(stage, enhance=False)

    assert [c.plugin for c in job.contributions] == names[:MAX_CONTRIBUTIONS]
    assert noted == [
        (name, f"a job holds at most {MAX_CONTRIBUTIONS} contributions")
        for name in names[MAX_CONTRIBUTIONS:]
    ]


def test_the_served_function_answers_with_the_contributions_that_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install_distribution(
        tmp_path / "site",
        "bulky-plugins",
        {name: "tests.plugins.sample_plugins:BulkyPlugin" for name in BULKY},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fake = FakeOllama()
    fake.port = free_port()
    with fake:
        fake.reply_with({"prompt": "a calm lake at dawn, mist over the water"})
        env = {
            **base_env(tmp_path / "store"),
            "IMAGEGEN_OLLAMA_HOST": fake.url,
            "IMAGEGEN_PLUGINS": ",".join([*BULKY, "time_of_day"]),
        }
        # On the plugins' logger itself: start-up sets the root logger's handlers anew.
        plugins_log = logging.getLogger("imagegen.plugins")
        plugins_log.addHandler(caplog.handler)
        try:
            with InProcessFunction("enhance", env) as enhance:
                answer = enhance.post("/", json={"prompt": "a calm lake", "seed": 1})
        finally:
            plugins_log.removeHandler(caplog.handler)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [c["plugin"] for c in body["contributions"]] == [*KEPT, "time_of_day"]
    assert body["enhancer"].startswith("ollama:")
    skipped = _skipped(caplog)
    assert sorted(skipped) == BULKY[6:]
    assert f"at most {MAX_CONTRIBUTIONS_BYTES} bytes together" in skipped[BULKY[6]]


class _GrowingPlugin:
    """Adds to its contribution's data after building it: past what one holds."""

    name = "growing"
    description = "changes its contribution once it is built"
    blocking = False

    def contribute(self, context: PluginContext) -> Contribution:
        contribution = Contribution(plugin=self.name, text="grown", data={"notes": []})
        contribution.data["notes"] = ["x" * 1000] * 40  # 40 KB
        return contribution


class _UnvalidatedPlugin:
    """Builds its contribution with ``model_construct``: a text no contribution holds."""

    name = "unvalidated"
    description = "never validates its contribution"
    blocking = False

    def contribute(self, context: PluginContext) -> Contribution:
        return Contribution.model_construct(plugin=self.name, text="y" * 2000, data={}, loras=[])


@pytest.mark.parametrize(
    ("plugin", "why"),
    [
        (_GrowingPlugin(), f"data: at most {MAX_CONTRIBUTION_DATA_BYTES} bytes as UTF-8 JSON"),
        (_UnvalidatedPlugin(), "text: String should have at most 1000 characters"),
    ],
    ids=["changed-after-built", "model-construct"],
)
async def test_an_invalid_contribution_is_skipped_and_the_job_stays_valid_for_render(
    make_stage: MakeStage, settings: Settings, plugin: PromptPlugin, why: str
) -> None:
    stage = make_stage(PluginSet([plugin, EchoPlugin(name="echo")], settings=settings))

    with noting_skips() as noted:
        job = await run(stage, enhance=False)

    assert [c.plugin for c in job.contributions] == ["echo"]
    assert [name for name, _ in noted] == [plugin.name]
    assert why in noted[0][1]
    # As render reads the job: from its JSON, every contribution validated anew.
    assert parse_model(EnhancedPrompt, job.model_dump(mode="json")) == job
    assert parse_model(EnhancedPrompt, job.model_dump_json()) == job


async def test_a_kept_contribution_is_a_copy_the_plugin_can_no_longer_change(
    make_stage: MakeStage, settings: Settings
) -> None:
    kept: list[Contribution] = []

    class Keeping(EchoPlugin):
        def contribute(self, context: PluginContext) -> Contribution:
            contribution = super().contribute(context)
            kept.append(contribution)
            return contribution

    stage = make_stage(PluginSet([Keeping(name="keeping")], settings=settings))
    job = await run(stage, enhance=False)
    kept[0].data["pad"] = "x" * MAX_CONTRIBUTION_DATA_BYTES

    assert "pad" not in job.contributions[0].data
    parse_model(EnhancedPrompt, job.model_dump_json())


def test_a_plugin_name_longer_than_a_contribution_holds_is_refused_where_the_set_is_built(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_name = "n" * (MAX_PLUGIN_NAME_CHARS + 1)

    with pytest.raises(ValueError, match=f"of 129 characters, at most {MAX_PLUGIN_NAME_CHARS}"):
        PluginSet([EchoPlugin(name=long_name)], settings=settings)
    PluginSet([EchoPlugin(name="n" * MAX_PLUGIN_NAME_CHARS)], settings=settings)

    # Declared by an installed package: refused as a plugin that cannot be loaded.
    install_distribution(
        tmp_path / "site", "long-names", {long_name: "tests.plugins.sample_plugins:EchoPlugin"}
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(InvalidRequest) as refused:
        PluginSet.from_settings(settings, names=[long_name])
    [error] = refused.value.errors
    assert error["field"] == "plugins"
    # The message is cut short after the name it repeats, but says why.
    assert "cannot be loaded (ValueError: a plugin name of 129 char" in error["message"]


def _plugin_spans(telemetry: InMemoryTelemetry, trace_id: int) -> dict[str, ReadableSpan]:
    """The ``imagegen.plugin`` spans of one trace, by plugin name."""
    return {
        str(span.attributes["imagegen.plugin.name"]): span
        for span in telemetry.finished_spans()
        if span.name == "imagegen.plugin"
        and span.context.trace_id == trace_id
        and span.attributes is not None
    }


def _assert_skipped(span: ReadableSpan, description: str | None = None) -> None:
    """``span`` says its plugin was skipped: not contributed, ``ERROR``, an ``exception`` event."""
    assert span.attributes is not None
    assert span.attributes["imagegen.plugin.contributed"] is False
    assert span.status.status_code is StatusCode.ERROR
    [event] = span.events
    assert event.name == "exception"
    if description is not None:
        assert span.status.description == description
        assert event.attributes is not None
        assert event.attributes["exception.message"] == description


async def test_a_plugin_left_out_says_so_on_its_span_as_one_that_raises(
    otel: InMemoryTelemetry,  # noqa: F811 - the fixture imported above
) -> None:
    """Its span was ended as contributed, before the job left it out: the ``imagegen.plugins``
    span's list and the plugin's own span disagreed."""
    settings = Settings(ollama_host="http://127.0.0.1:43001", plugins=[], timezone="UTC")
    plugins: list[PromptPlugin] = [BulkyPlugin(name=name) for name in BULKY[:7]]
    plugins += [_UnvalidatedPlugin(), FailingPlugin(), EchoPlugin(name="echo")]
    stage = EnhanceStage(settings, PluginSet(plugins, settings=settings), backoff=0.01)
    try:
        with tracer().start_as_current_span("test") as parent, noting_skips() as noted:
            job = await run(stage, enhance=False)
    finally:
        await stage.aclose()

    trace_id = parent.get_span_context().trace_id
    spans = _plugin_spans(otel, trace_id)
    [plugins_span] = [
        s
        for s in otel.finished_spans()
        if s.name == "imagegen.plugins" and s.context.trace_id == trace_id
    ]
    assert plugins_span.attributes is not None
    contributed = [c.plugin for c in job.contributions]
    assert contributed == [*KEPT, "echo"]
    assert list(plugins_span.attributes["imagegen.plugins.contributed"]) == contributed
    for name in contributed:
        assert spans[name].attributes is not None
        assert spans[name].attributes["imagegen.plugin.contributed"] is True
        assert spans[name].status.status_code is StatusCode.UNSET
        assert not spans[name].events
    _assert_skipped(spans[FailingPlugin.name])
    why = dict(noted)
    assert sorted(why) == sorted([BULKY[6], "unvalidated", FailingPlugin.name])
    _assert_skipped(spans[BULKY[6]], why[BULKY[6]])
    _assert_skipped(spans["unvalidated"], why["unvalidated"])
    assert "its contribution is invalid: text:" in why["unvalidated"]


async def test_a_plugin_past_the_most_a_job_holds_says_so_on_its_span(
    otel: InMemoryTelemetry,  # noqa: F811 - the fixture imported above
) -> None:
    settings = Settings(plugins=[], timezone="UTC")
    names = [f"echo_{i}" for i in range(MAX_CONTRIBUTIONS + 1)]
    plugins = PluginSet([EchoPlugin(name=n) for n in names], settings=settings)

    with tracer().start_as_current_span("test") as parent:
        kept = await plugins.run(generation_id="gen-1", seed=1, now=NOW)

    assert len(kept) == MAX_CONTRIBUTIONS
    spans = _plugin_spans(otel, parent.get_span_context().trace_id)
    assert spans[names[0]].status.status_code is StatusCode.UNSET
    _assert_skipped(spans[names[-1]], f"a job holds at most {MAX_CONTRIBUTIONS} contributions")
