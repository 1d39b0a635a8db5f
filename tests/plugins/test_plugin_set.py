"""The plugin runner: order, options, determinism, isolation, discovery, independent sets."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imagegen.errors import ConfigurationError, InvalidRequest
from imagegen.models import Contribution
from imagegen.plugins import PluginContext, PluginSet, PromptPlugin
from imagegen.settings import Settings
from tests.plugins import sample_plugins
from tests.plugins.conftest import NOW
from tests.plugins.sample_plugins import (
    AsyncEchoPlugin,
    BlockingPlugin,
    EchoPlugin,
    FailingPlugin,
    HangingPlugin,
    OpaqueDataPlugin,
    StrictPlugin,
    WrongTypePlugin,
    declare_echo_twice,
    install_distribution,
)

BUILTINS = ["time_of_day", "holiday", "art_style", "lora", "remote_context"]


async def _run(plugins: PluginSet, seed: int = 7, **kwargs: object) -> list[Contribution]:
    return await plugins.run(generation_id="gen-1", seed=seed, now=NOW, **kwargs)  # type: ignore[arg-type]


# 1. Order, context and options


async def test_runs_in_order_and_later_plugins_see_earlier_ones(settings: Settings) -> None:
    plugins = PluginSet(
        [EchoPlugin(name="a"), AsyncEchoPlugin(), EchoPlugin(name="b")], settings=settings
    )
    result = await _run(plugins)
    assert [c.plugin for c in result] == ["a", "async_echo", "b"]
    assert result[2].data["before"] == ["a", "async_echo"]


async def test_sync_plugins_run_off_the_event_loop(settings: Settings) -> None:
    [result] = await _run(PluginSet([EchoPlugin()], settings=settings))
    assert result.data["thread"] == "plugin-echo"


async def test_now_is_in_the_request_zone(settings: Settings) -> None:
    plugins = PluginSet([EchoPlugin()], settings=settings)
    [result] = await _run(plugins, timezone="Asia/Tokyo")
    assert result.data["now"] == "2026-11-24T18:30:00+09:00"
    assert result.data["timezone"] == "Asia/Tokyo"
    [default] = await _run(plugins)
    assert default.data["timezone"] == "UTC"


async def test_naive_time_is_utc(settings: Settings) -> None:
    [result] = await PluginSet([EchoPlugin()], settings=settings).run(
        generation_id="g", seed=1, now=datetime(2026, 1, 1, 12), timezone="Europe/Berlin"
    )
    assert result.data["now"] == "2026-01-01T13:00:00+01:00"


async def test_option_precedence_request_over_settings_key_by_key() -> None:
    settings = Settings(plugin_options={"echo": {"a": "settings", "b": "settings"}})
    plugins = PluginSet([EchoPlugin()], settings=settings)
    [result] = await _run(plugins, options={"echo": {"b": "request", "c": "request"}})
    assert result.data["options"] == {"a": "settings", "b": "request", "c": "request"}
    [alone] = await _run(plugins)
    assert alone.data["options"] == {"a": "settings", "b": "settings"}


# 2. Determinism


def test_rng_depends_on_seed_and_plugin(settings: Settings) -> None:
    def context(seed: int, plugin: str) -> PluginContext:
        return PluginContext("g", None, NOW, "UTC", seed, settings, plugin=plugin)

    assert context(1, "a").rng().random() == context(1, "a").rng().random()
    assert context(1, "a").rng().random() != context(2, "a").rng().random()
    assert context(1, "a").rng().random() != context(1, "b").rng().random()


async def test_same_seed_and_time_same_contributions(settings: Settings) -> None:
    def fresh() -> PluginSet:
        return PluginSet.from_settings(
            settings, names=["time_of_day", "holiday", "art_style"], extra=[EchoPlugin()]
        )

    first = await _run(fresh(), seed=11)
    again = await _run(fresh(), seed=11)
    assert first == again
    others = [await _run(fresh(), seed=seed) for seed in range(12, 20)]
    assert any(o != first for o in others)


# 3. Isolation


async def test_a_failing_plugin_is_logged_and_skipped(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = PluginSet(
        [EchoPlugin(name="a"), FailingPlugin(), EchoPlugin(name="b")], settings=settings
    )
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        result = await _run(plugins)
    assert [c.plugin for c in result] == ["a", "b"]
    assert any("failing" in r.getMessage() and r.name == "imagegen.plugins" for r in caplog.records)


async def test_a_hanging_async_plugin_times_out(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = PluginSet([HangingPlugin(), EchoPlugin()], settings=settings, timeout=0.2)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        result = await _run(plugins)
    assert time.monotonic() - started < 1.5
    assert [c.plugin for c in result] == ["echo"]
    assert any(
        "hanging" in r.getMessage() and "timed out" in r.getMessage() for r in caplog.records
    )


@pytest.fixture
def release_blocked() -> Iterator[None]:
    sample_plugins.RELEASE.clear()
    yield
    sample_plugins.RELEASE.set()


@pytest.mark.usefixtures("release_blocked")
async def test_a_blocking_sync_plugin_times_out(settings: Settings) -> None:
    plugins = PluginSet([BlockingPlugin(), EchoPlugin()], settings=settings, timeout=0.2)
    started = time.monotonic()
    result = await _run(plugins)
    assert time.monotonic() - started < 1.5
    assert [c.plugin for c in result] == ["echo"]


async def test_a_wrong_return_type_is_skipped(settings: Settings) -> None:
    plugins = PluginSet([WrongTypePlugin(), EchoPlugin()], settings=settings)  # type: ignore[list-item]
    assert [c.plugin for c in await _run(plugins)] == ["echo"]


@pytest.mark.parametrize("kind", ["object", "bytes", "nan", "deep", "surrogate", "surrogate_key"])
async def test_data_no_event_can_carry_is_skipped(settings: Settings, kind: str) -> None:
    """It failed the generation with a 500 later, where the prompt is kept as JSON (the
    memo, the event): a misbehaving plugin is skipped, as one that raises is."""
    plugins = PluginSet([OpaqueDataPlugin(kind), EchoPlugin()], settings=settings)  # type: ignore[list-item]
    assert [c.plugin for c in await _run(plugins)] == ["echo"]


async def test_invalid_options_fail_the_request(settings: Settings) -> None:
    plugins = PluginSet([StrictPlugin()], settings=settings)
    with pytest.raises(InvalidRequest) as caught:
        await _run(plugins, options={"strict": {"bad": True}})
    assert caught.value.fields == ["plugin_options.strict.bad"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"art_style": {"styel": "Ukiyo-e"}}, "plugin_options.art_style.styel"),  # misspelt
        ({"art_styel": {"style": "Ukiyo-e"}}, "plugin_options.art_styel"),  # no such plugin
        ({"lora": {"probability": 1.0}}, "plugin_options.lora"),  # installed, not enabled
        ({"time_of_day": {"hour": 5}}, "plugin_options.time_of_day.hour"),  # takes none
    ],
)
async def test_an_option_no_enabled_plugin_declares_is_refused_by_name(
    settings: Settings, options: dict[str, dict[str, object]], field: str
) -> None:
    plugins = PluginSet.from_settings(settings, names=["time_of_day", "art_style"])
    with pytest.raises(InvalidRequest) as caught:
        await _run(plugins, options=options)
    assert caught.value.fields == [field]
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"art_style": {"stlye": "ukiyo-e"}}, "plugin_options.art_style.stlye: unknown option"),
        ({"weather": {"a": 1}}, "plugin_options.weather: no enabled plugin 'weather'"),
        ({"lora": {"probability": 1.0}}, "plugin_options.lora: no enabled plugin 'lora'"),
    ],
)
def test_the_settings_options_are_checked_as_a_requests_are(
    options: dict[str, dict[str, object]], said: str
) -> None:
    """Not ignored: a misspelt key drew a random style for every generation, while the same
    key in a request is a 400. The deployment's fault, naming the variable."""
    settings = Settings(plugins=["time_of_day", "art_style"], plugin_options=options)
    with pytest.raises(ConfigurationError) as caught:
        PluginSet.from_settings(settings)
    assert caught.value.fields == ["IMAGEGEN_PLUGIN_OPTIONS"]
    assert caught.value.message.startswith(f"invalid settings: IMAGEGEN_PLUGIN_OPTIONS ({said}")
    # A set of other plugins than the settings enable (the listing's) is not checked.
    assert PluginSet.from_settings(settings, names=[]).names == ()


def test_the_settings_options_of_enabled_plugins_pass(settings: Settings) -> None:
    options = {"art_style": {"style": "ukiyo-e"}, "extra_echo": {"any": 1}}
    configured = settings.model_copy(update={"plugin_options": options})
    plugins = PluginSet.from_settings(configured, extra=[EchoPlugin(name="extra_echo")])
    assert "art_style" in plugins.names and "extra_echo" in plugins.names


async def test_a_plugin_that_declares_no_option_names_takes_any_option(
    settings: Settings,
) -> None:
    plugins = PluginSet([EchoPlugin()], settings=settings)
    [result] = await _run(plugins, options={"echo": {"whatever": 1}})
    assert result.data["options"] == {"whatever": 1}


def test_the_built_ins_declare_the_options_they_read(settings: Settings) -> None:
    plugins = PluginSet.from_settings(settings, names=BUILTINS)
    declared = {name: plugins.get(name).option_names for name in BUILTINS}  # type: ignore[attr-defined]
    assert declared == {
        "time_of_day": (),
        "holiday": ("countries", "horizon_days", "language"),
        "art_style": ("style",),
        "lora": ("probability",),
        "remote_context": ("url",),
    }


# 4. Selection per request


async def test_selection_picks_a_subset_in_its_order(settings: Settings) -> None:
    plugins = PluginSet(
        [EchoPlugin(name="a"), EchoPlugin(name="b"), EchoPlugin(name="c")], settings=settings
    )
    assert [c.plugin for c in await _run(plugins, selection=["c", "a"])] == ["c", "a"]
    assert await _run(plugins, selection=[]) == []


async def test_unknown_or_disabled_selection_is_invalid(settings: Settings) -> None:
    plugins = PluginSet([EchoPlugin(name="a"), EchoPlugin(name="b")], settings=settings)
    plugins.disable("b")
    with pytest.raises(InvalidRequest) as caught:
        await _run(plugins, selection=["a", "nope", "b"])
    assert caught.value.fields == ["plugins", "plugins"]
    assert "nope" in caught.value.errors[0]["message"]
    # There, but disabled: said so, with what enables it, not "unknown".
    assert caught.value.errors[1]["message"] == (
        "plugin 'b' is installed but not enabled (IMAGEGEN_PLUGINS)"
    )


# 5. Configuration per set


async def test_two_sets_in_one_process_differ(settings: Settings) -> None:
    first = PluginSet.from_settings(settings, names=["time_of_day"])
    second = PluginSet.from_settings(
        settings, names=["art_style", "time_of_day"], extra=[EchoPlugin()]
    )
    second.disable("time_of_day")
    assert first.names == ("time_of_day",)
    assert second.names == ("art_style", "echo")
    assert [c.plugin for c in await _run(first)] == ["time_of_day"]
    assert [c.plugin for c in await _run(second)] == ["art_style", "echo"]
    assert first.get("time_of_day") is not second.get("time_of_day")


def test_enable_disable_and_reorder(settings: Settings) -> None:
    plugins = PluginSet.from_settings(settings, names=["holiday"])
    plugins.enable("time_of_day")
    assert plugins.names == ("holiday", "time_of_day")
    plugins.set_order(["time_of_day", "holiday"])
    assert list(plugins) == [plugins.get("time_of_day"), plugins.get("holiday")]
    plugins.disable("holiday")
    assert "holiday" not in plugins and len(plugins) == 1
    with pytest.raises(InvalidRequest):
        plugins.set_order(["nope"])


def test_builtins_are_found_and_unknown_names_rejected(settings: Settings) -> None:
    plugins = PluginSet.from_settings(settings)
    assert plugins.names == tuple(BUILTINS)
    assert all(isinstance(p, PromptPlugin) for p in plugins)
    with pytest.raises(InvalidRequest) as caught:
        PluginSet.from_settings(settings, names=["time_of_day", "weather"])
    assert caught.value.fields == ["plugins"]


def test_describe_lists_enabled_first(settings: Settings) -> None:
    infos = PluginSet.from_settings(settings, names=["art_style", "time_of_day"]).describe()
    assert [i.name for i in infos[:2]] == ["art_style", "time_of_day"]
    assert [i.enabled for i in infos] == [True, True, False, False, False]
    by_name = {i.name: i for i in infos}
    assert by_name["holiday"].module == "imagegen_plugins.holiday"
    assert by_name["holiday"].description  # read without instantiating it
    assert all(i.error is None for i in infos)


def test_objects_that_are_not_plugins_are_refused(settings: Settings) -> None:
    with pytest.raises(TypeError):
        PluginSet([object()], settings=settings)  # type: ignore[list-item]


# 6. Discovery through entry points


@pytest.fixture
def installed_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution 'sample-imagegen-plugins' declaring the entry point 'echo'."""
    site = tmp_path / "site"
    install_distribution(
        site, "sample-imagegen-plugins", {"echo": "tests.plugins.sample_plugins:EchoPlugin"}
    )
    monkeypatch.syspath_prepend(str(site))


@pytest.mark.usefixtures("installed_sample")
async def test_a_plugin_from_an_entry_point_runs(settings: Settings) -> None:
    plugins = PluginSet.from_settings(settings, names=["time_of_day", "echo"])
    assert isinstance(plugins.get("echo"), EchoPlugin)
    assert plugins.get("echo").settings is settings  # type: ignore[attr-defined]
    assert [c.plugin for c in await _run(plugins)] == ["time_of_day", "echo"]
    info = {i.name: i for i in plugins.describe()}["echo"]
    assert info.distribution == "sample-imagegen-plugins"
    assert info.module == "tests.plugins.sample_plugins"


@pytest.mark.usefixtures("installed_sample")
def test_discovered_but_not_enabled_is_listed(settings: Settings) -> None:
    infos = {i.name: i for i in PluginSet.from_settings(settings).describe()}
    assert infos["echo"].enabled is False
    assert infos["echo"].description == "Echoes its context."


@pytest.fixture
def installed_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution 'broken-plugin' whose entry point 'broken' names no module."""
    install_distribution(tmp_path, "broken-plugin", {"broken": "no_such_module_here:Plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.usefixtures("installed_broken")
def test_a_broken_entry_point_is_reported(settings: Settings) -> None:
    infos = {i.name: i for i in PluginSet.from_settings(settings).describe()}
    assert infos["broken"].error is not None and "ModuleNotFoundError" in infos["broken"].error
    # Enabled, it is a refusal naming the setting and what failed, never the import's traceback.
    with pytest.raises(InvalidRequest) as caught:
        PluginSet.from_settings(settings, names=["time_of_day", "broken"])
    assert caught.value.fields == ["plugins"]
    [error] = caught.value.errors
    assert "'broken' cannot be loaded (ModuleNotFoundError" in error["message"]


async def test_context_fields(settings: Settings) -> None:
    seen: list[PluginContext] = []

    class Recorder:
        name = "recorder"
        description = "Records its context."

        def contribute(self, context: PluginContext) -> None:
            seen.append(context)

    await PluginSet([Recorder()], settings=settings).run(
        generation_id="gen-9", seed=5, now=NOW, prompt="a cat", options={"recorder": {"k": 1}}
    )
    [context] = seen
    assert (context.generation_id, context.prompt, context.seed, context.plugin) == (
        "gen-9",
        "a cat",
        5,
        "recorder",
    )
    assert context.options == {"k": 1} and context.settings is settings
    assert context.now == NOW and context.now.tzinfo is not None
    assert context.now.utcoffset() == UTC.utcoffset(None)


class _Warming:
    """A plugin with a warm-up: plain or a coroutine, succeeding or failing."""

    description = "Records its warm-up."

    def __init__(self, name: str, *, coroutine: bool = False, fails: bool = False) -> None:
        self.name, self.fails, self.threads = name, fails, []
        if coroutine:
            self.warm_up = self._warm_async  # type: ignore[method-assign]

    def warm_up(self) -> None:
        self.threads.append(threading.current_thread())
        if self.fails:
            raise RuntimeError("no table today")

    async def _warm_async(self) -> None:
        self.threads.append(threading.current_thread())

    def contribute(self, context: PluginContext) -> Contribution:
        return Contribution(plugin=self.name, text=self.name)


async def test_warm_up_warms_the_enabled_plugins_that_can(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    plain, coroutine = _Warming("plain"), _Warming("coroutine", coroutine=True)
    failing, disabled = _Warming("failing", fails=True), _Warming("disabled")
    plugins = PluginSet([coroutine, EchoPlugin(), failing, plain, disabled], settings=settings)
    plugins.disable("disabled")

    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        warmed = await plugins.warm_up()

    assert warmed == ["coroutine", "plain"], "in order; the failed one and echo (none) left out"
    assert disabled.threads == [], "a disabled plugin is not warmed"
    assert coroutine.threads == [threading.current_thread()], "a coroutine runs on the loop"
    assert plain.threads and plain.threads[0] is not threading.current_thread(), "a plain one not"
    assert failing.threads, "the failing one ran"
    assert "plugin failing could not warm up: RuntimeError: no table today" in caplog.text
    # Warming changes no contribution.
    result = await plugins.run(generation_id="g", seed=1, now=NOW)
    assert [c.plugin for c in result] == ["coroutine", "echo", "failing", "plain"]


async def test_closing_the_set_closes_the_plugins_that_hold_something(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    closed: list[str] = []

    class Holding(EchoPlugin):
        async def aclose(self) -> None:
            closed.append(self.name)
            if self.name == "broken":
                raise OSError("socket already gone")

    plugins = PluginSet(
        [Holding(name="a"), EchoPlugin(name="b"), Holding(name="broken"), Holding(name="c")],
        settings=settings,
    )
    plugins.disable("c")  # loaded, so closed too
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        await plugins.aclose()
    assert closed == ["a", "broken", "c"]
    assert "plugin broken did not close: OSError: socket already gone" in caplog.text


@pytest.fixture
def installed_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two distributions, 'first-echo' and 'second-echo', each declaring its own 'echo'."""
    declare_echo_twice(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


_BOTH = (
    "declared by 2 installed packages: first-echo (tests.plugins.sample_plugins:EchoPlugin),"
    " second-echo (tests.plugins.sample_plugins:FailingPlugin); uninstall one"
)


@pytest.mark.usefixtures("installed_twice")
def test_a_name_two_packages_declare_is_listed_and_refused_naming_both(
    settings: Settings,
) -> None:
    """Which of the two ``importlib.metadata`` lists first hangs on ``sys.path``'s order, not on
    anything either package says: neither is chosen."""
    infos = {i.name: i for i in PluginSet.from_settings(settings).describe()}
    assert infos["echo"].error == _BOTH and not infos["echo"].enabled
    with pytest.raises(InvalidRequest) as caught:
        PluginSet.from_settings(settings, names=["time_of_day", "echo"])
    assert caught.value.errors == [{"field": "plugins", "message": f"plugin 'echo' is {_BOTH}"}]
    enabled = settings.model_copy(update={"plugins": ["echo"]})
    with pytest.raises(ConfigurationError) as refused:
        PluginSet.from_settings(enabled)
    assert refused.value.errors == [
        {"field": "IMAGEGEN_PLUGINS", "message": f"plugin 'echo' is {_BOTH}"}
    ]
    # An object given in code under the name is no ambiguity: it wins, as over any.
    given = PluginSet.from_settings(settings, names=[], extra=[EchoPlugin()])
    assert given.names == ("echo",) and given.describe()[0].error is None
