"""Plugins defined outside imagegen, as a third-party package would ship them."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from imagegen.errors import InvalidRequest
from imagegen.models import Contribution
from imagegen.plugins import PluginContext
from imagegen.settings import Settings

# Set by tests to let a blocked plugin thread finish.
RELEASE = threading.Event()


class EchoPlugin:
    """Echoes what it saw: options, the earlier plugins, a draw from its rng."""

    name = "echo"
    description = "Echoes its context."

    def __init__(self, settings: Settings | None = None, *, name: str = "echo") -> None:
        self.settings = settings
        self.name = name

    def contribute(self, context: PluginContext) -> Contribution:
        return Contribution(
            plugin=self.name,
            text=f"echo {self.name}",
            data={
                "options": dict(context.options),
                "before": [c.plugin for c in context.contributions],
                "draw": context.rng().random(),
                "now": context.now.isoformat(),
                "timezone": context.timezone,
                "thread": threading.current_thread().name,
            },
        )


class AsyncEchoPlugin:
    name = "async_echo"
    description = "Echoes, asynchronously."

    async def contribute(self, context: PluginContext) -> Contribution:
        await asyncio.sleep(0)
        return Contribution(plugin=self.name, text="async echo", data={"seed": context.seed})


class FailingPlugin:
    name = "failing"
    description = "Always raises."

    def contribute(self, context: PluginContext) -> Contribution:
        raise RuntimeError("the failing plugin failed")


class HangingPlugin:
    name = "hanging"
    description = "Never answers (async)."

    async def contribute(self, context: PluginContext) -> Contribution:
        await asyncio.sleep(3600)
        raise AssertionError("not reached")


class BlockingPlugin:
    name = "blocking"
    description = "Blocks its thread until released (sync)."

    def contribute(self, context: PluginContext) -> Contribution:
        RELEASE.wait(10)
        return Contribution(plugin=self.name, text="too late")


class StrictPlugin:
    name = "strict"
    description = "Rejects the option 'bad'."

    def contribute(self, context: PluginContext) -> None:
        if "bad" in context.options:
            field = "plugin_options.strict.bad"
            raise InvalidRequest("bad option", errors=[{"field": field, "message": "no"}])


class WrongTypePlugin:
    name = "wrong_type"
    description = "Returns something that is no Contribution."

    def contribute(self, context: PluginContext) -> object:
        return {"text": "not a contribution"}


class OpaqueDataPlugin:
    """Returns a Contribution whose data no event can carry: ``kind`` says how."""

    description = "Contributes data that is not JSON."

    def __init__(self, kind: str) -> None:
        self.name = f"opaque_{kind}"
        self.kind = kind

    def contribute(self, context: PluginContext) -> Contribution:
        nested: dict[str, object] = {}
        deep = nested
        for _ in range(2000):
            deep["x"] = deep = {}
        data = {
            "object": {"o": object()},
            "bytes": {"b": b"\xff"},
            "nan": {"n": float("nan")},
            "deep": nested,
            # A remote reply's split emoji escape, read by ``json.loads``: no UTF-8 text.
            "surrogate": {"weather": "sunny \ud83d"},
            "surrogate_key": {"\udc00": 1},
        }[self.kind]
        return Contribution(plugin=self.name, text="opaque", data=data)


def needing_a_key(settings: Settings) -> EchoPlugin:
    """A plugin's factory that fails as one does without its configuration."""
    raise RuntimeError("WEATHER_API_KEY is not set")


class RaisingPlugin:
    """Raises what is no Exception, on the event loop (a coroutine) or on its thread."""

    description = "Raises SystemExit, KeyboardInterrupt or CancelledError."

    def __init__(self, name: str, error: type[BaseException], *, on_loop: bool = True) -> None:
        self.name = name
        self.error = error
        if on_loop:
            self.contribute = self._on_loop  # type: ignore[method-assign]

    def contribute(self, context: PluginContext) -> Contribution:
        raise self.error()

    async def _on_loop(self, context: PluginContext) -> Contribution:
        raise self.error()


def exiting(settings: Settings) -> RaisingPlugin:
    return RaisingPlugin("exiting", SystemExit)


def interrupting(settings: Settings) -> RaisingPlugin:
    return RaisingPlugin("interrupting", KeyboardInterrupt)


def cancelling(settings: Settings) -> RaisingPlugin:
    return RaisingPlugin("cancelling", asyncio.CancelledError)


def exiting_on_its_thread(settings: Settings) -> RaisingPlugin:
    return RaisingPlugin("exiting_on_its_thread", SystemExit, on_loop=False)


class RaisingInItsTask:
    """Raises what is no Exception in a task of its own that it awaits (``create_task``), as a
    coroutine plugin fanning out its work would."""

    description = "Raises SystemExit or KeyboardInterrupt in a task it creates."

    def __init__(self, name: str, error: type[BaseException]) -> None:
        self.name = name
        self.error = error

    async def contribute(self, context: PluginContext) -> Contribution:
        async def boom() -> Contribution:
            raise self.error(4)

        return await asyncio.create_task(boom())


def exiting_in_its_task(settings: Settings) -> RaisingInItsTask:
    return RaisingInItsTask("exiting_in_its_task", SystemExit)


def interrupting_in_its_task(settings: Settings) -> RaisingInItsTask:
    return RaisingInItsTask("interrupting_in_its_task", KeyboardInterrupt)


class LoopStopping:
    """Leaves a callback on the event loop that raises SystemExit there, outside any task:
    asyncio lets it end ``run_forever``, so no plugin runner can catch it."""

    name = "loop_stopping"
    description = "Ends the event loop."

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings

    async def contribute(self, context: PluginContext) -> None:
        def exit_() -> None:
            raise SystemExit("a plugin's callback exited")

        asyncio.get_running_loop().call_soon(exit_)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # the task left on the loop that ended, cancelled
            if marker := os.environ.get("CANCELLED_MARKER"):
                Path(marker).write_text("cancelled\n")
            raise


class ClosingPlugin:
    """Writes its name to the file ``CLOSED_MARKER`` names when it is closed (``aclose``), as a
    plugin releasing its connections would; ``hangs``: its close never ends."""

    description = "Says when it is closed."

    def __init__(self, name: str, *, hangs: bool = False) -> None:
        self.name = name
        self.hangs = hangs

    def contribute(self, context: PluginContext) -> None:
        return None

    async def aclose(self) -> None:
        import os
        from pathlib import Path

        if self.hangs:
            await asyncio.sleep(3600)
        await asyncio.sleep(0)  # on the loop, as a client's close is
        with Path(os.environ["CLOSED_MARKER"]).open("a") as marker:
            marker.write(f"{self.name}\n")


def closing(settings: Settings) -> ClosingPlugin:
    return ClosingPlugin("closing")


def never_closing(settings: Settings) -> ClosingPlugin:
    return ClosingPlugin("never_closing", hangs=True)


def failing(settings: Settings) -> FailingPlugin:
    return FailingPlugin()


def wrong_type(settings: Settings) -> WrongTypePlugin:
    return WrongTypePlugin()


class BulkyPlugin:
    """Adds 30 KiB of data, within a contribution's bound: a few such fill a job's."""

    name = "bulky"
    description = "Contributes 30 KiB of data."
    blocking = False

    def __init__(self, settings: Settings | None = None, *, name: str = "bulky") -> None:
        self.name = name

    def contribute(self, context: PluginContext) -> Contribution:
        return Contribution(
            plugin=self.name, text=f"from {context.plugin}", data={"blob": "x" * 30 * 1024}
        )


class KeyedPlugin(EchoPlugin):
    """Reads a variable of its own, as a plugin reads its API key: it says so."""

    environment_variables = ("IMAGEGEN_WEATHER_KEY",)


def install_distribution(site: Path, name: str, plugins: dict[str, str]) -> None:
    """Install in ``site`` (a folder of ``sys.path``) the distribution ``name`` declaring
    ``plugins``, each an entry point's name and object (``{"echo": "module:attribute"}``), as
    an installed third-party package declares them: its dist-info folder, no code."""
    dist_info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1\n")
    declared = "".join(f"{plugin} = {value}\n" for plugin, value in plugins.items())
    (dist_info / "entry_points.txt").write_text(f"[imagegen.plugins]\n{declared}")


def declare_echo_twice(site: Path) -> None:
    """Install in ``site`` two distributions, 'first-echo' and 'second-echo', each declaring a
    plugin named 'echo' (:class:`EchoPlugin` and :class:`FailingPlugin`)."""
    for name, factory in [("first-echo", "EchoPlugin"), ("second-echo", "FailingPlugin")]:
        install_distribution(site, name, {"echo": f"tests.plugins.sample_plugins:{factory}"})
