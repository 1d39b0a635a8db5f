"""The Typer application every command registers on, and what the commands share.

Everything here is cheap to import: ``imagegen --help`` imports this, typer and the command
modules, and nothing a command needs only when it runs (the library, asyncio, torch).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from imagegen.ledger.recorder import Recorder
    from imagegen.models import PersistedImage
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

__all__ = [
    "AsJson",
    "Verbose",
    "app",
    "display_location",
    "dotenv_warnings",
    "err",
    "image_where",
    "make_service",
    "out",
    "run_async",
    "set_verbosity",
    "settings_from",
]

app = typer.Typer(
    name="imagegen",
    help="Text to image: enhance → render → persist → derive, in-process or as Knative functions.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help: typer's rich help imports a Markdown parser and costs more time than
    # everything else ``imagegen --help`` does.
    rich_markup_mode=None,
)


class _LazyConsole:
    """A rich ``Console`` made on first use: ``--help`` never needs one."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @property
    def real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    # ``with console:`` (rich's Live and Progress hold the console so), which looks the
    # methods up on the class, never through __getattr__.
    def __enter__(self) -> Console:
        return self.real.__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        self.real.__exit__(*exc_info)


# Typed as Console: every use goes through __getattr__ to the real one.
out: Console = _LazyConsole(stderr=False)  # type: ignore[assignment]
err: Console = _LazyConsole(stderr=True)  # type: ignore[assignment]

AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

# The libraries' notices go to the terminal only when asked for: without it, a newcomer reads
# the result and at most one line about what to do next.
_LIBRARY_VERBOSITY = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY")
_handler: logging.Handler | None = None


def set_verbosity(verbose: bool) -> bool:
    """Show log lines and library warnings (``verbose``) or only errors, on stderr.

    Set before a command imports the model libraries, which read their verbosity from the
    environment when first imported. Returns ``verbose`` (usable as a Typer callback).
    """
    global _handler
    for name in _LIBRARY_VERBOSITY:
        if verbose:
            os.environ[name] = "warning"
        else:
            os.environ.setdefault(name, "error")
    if not sys.warnoptions:  # an explicit -W or PYTHONWARNINGS wins
        warnings.simplefilter("default" if verbose else "ignore")
    if _handler is None:
        _handler = _StderrHandler()
        _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if _handler not in root.handlers:
        # A handler on the root logger: with none, Python prints every WARNING record. Added
        # again if whatever set up logging since (an embedding program) took it away.
        root.addHandler(_handler)
    _handler.setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("imagegen").setLevel(logging.INFO if verbose else logging.NOTSET)
    return verbose


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a test may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never raise
            self.handleError(record)


def _verbose_after_command(verbose: bool) -> bool:
    # ``imagegen -v generate`` has already turned it on; a command's own default must not undo it.
    return set_verbosity(True) if verbose else verbose


_VERBOSE_HELP = "Show log lines and the libraries' warnings."
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help=_VERBOSE_HELP, callback=_verbose_after_command)
]


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help=_VERBOSE_HELP, callback=set_verbosity)
    ] = False,
) -> None:
    """Text to image: enhance → render → persist → derive, in-process or as Knative functions."""
    _unparsed.clear()  # a command's own warnings (one process may run several: tests)


_FLAGS = {"storage_url": "--output", "ledger_url": "--ledger"}
"""The options that give a setting, by the setting: an error names what the user typed."""


def settings_from(**overrides: Any) -> Settings:
    """The settings from the environment, with the options the user gave (None: not given).

    Raises:
        ConfigurationError: A setting is invalid, named as the user gave it: its
            ``IMAGEGEN_*`` variable, or the option (never its value).
        InvalidRequest: ``--output`` names no storage.
    """
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from imagegen.errors import ConfigurationError
    from imagegen.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        with dotenv_warnings():
            settings = Settings(**given)
    except (ValidationError, SettingsError) as exc:
        raise ConfigurationError.of(
            "",
            exc,
            name=lambda field: (
                _FLAGS.get(field, field) if field in given else Settings.variable(field)
            ),
        ) from None
    except (UnicodeDecodeError, OSError) as exc:  # the .env file, read by python-dotenv
        raise ConfigurationError(
            f"invalid settings: .env cannot be read ({type(exc).__name__})",
            errors=[{"field": ".env", "message": "not a readable UTF-8 file"}],
        ) from None
    for unknown in Settings.unknown_variables():
        err.print(f"imagegen: warning: {unknown}", markup=False, soft_wrap=True)
    if "storage_url" in given:
        _check_output(settings)
    return settings


def _check_output(settings: Settings) -> None:
    """Refuse an ``--output`` that names no storage as the option (the storage itself opens
    it later, and would name the setting)."""
    from imagegen._redact import redact_url
    from imagegen.errors import ConfigurationError, InvalidRequest
    from imagegen.storage import open_storage

    try:
        open_storage(settings)  # nothing is written or reached
    except ConfigurationError as exc:
        if "storage_url" not in exc.fields:
            raise
        why = exc.errors[exc.fields.index("storage_url")]["message"]
        raise InvalidRequest(
            f"--output {redact_url(settings.storage_url)!r}: {why}",
            errors=[{"field": "output", "message": why}],
        ) from None


_unparsed: set[int] = set()
"""Lines of ``.env`` said to be ignored already: each is said once a command, however often
the command reads the file."""


class _DotenvLines(logging.Handler):
    """Collects the lines python-dotenv reports it cannot parse (and then skips)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.args and isinstance(record.args, tuple) and isinstance(record.args[0], int):
            self.lines.append(record.args[0])


@contextmanager
def dotenv_warnings() -> Iterator[None]:
    """Say, as one warning line each, the ``.env`` lines read in the block that python-dotenv
    cannot parse: it skips them, and says so only as a log record (seen with ``-v``)."""
    source = logging.getLogger("dotenv.main")
    lines, level = _DotenvLines(), source.level
    source.addHandler(lines)
    # Its records are made whatever level logging was set up with (IMAGEGEN_LOG_LEVEL=ERROR,
    # a program embedding the CLI): this line is the command's own, not a log record.
    source.setLevel(logging.WARNING)
    try:
        yield
    finally:
        source.setLevel(level)
        source.removeHandler(lines)
        for line in dict.fromkeys(lines.lines):
            if line not in _unparsed:
                _unparsed.add(line)
                err.print(
                    f"imagegen: warning: .env line {line} cannot be parsed (ignored)", markup=False
                )


def display_location(location: str) -> str:
    """A stored object's location as a person reads it: a local file's path, else as it is."""
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(location).path)
    return location


def image_where(persisted: PersistedImage) -> str:
    """The image as a person opens it: its public URL, else a local path, else its location."""
    return persisted.url or display_location(persisted.location)


def run_async(coro_factory: Callable[[], Any]) -> Any:
    """Run the coroutine ``coro_factory()`` makes to completion; return its result."""
    import asyncio

    return asyncio.run(coro_factory())


def make_service(settings: Settings, *, record: bool = True) -> ImageGenService:
    """An in-process service, with traces and metrics set up for the CLI; ``record``: into
    the local history (the ledger is opened, and created, now)."""
    from imagegen.observability import setup_observability
    from imagegen.service import ImageGenService

    # Traces and metrics go to a collector when OTEL_EXPORTER_OTLP_ENDPOINT says so; the
    # console stays the CLI's own.
    setup_observability("imagegen-cli", settings, logs=False)
    return ImageGenService(settings, recorder=_recorder(settings) if record else None)


def _recorder(settings: Settings) -> Recorder | None:
    """What records the local history; None (and a warning) when the ledger cannot open."""
    from imagegen.errors import ImageGenError
    from imagegen.ledger import open_ledger
    from imagegen.ledger.recorder import Recorder

    url = settings.ledger_url.get_secret_value() if settings.ledger_url else None
    if url and url.startswith(("http://", "https://")):
        return None  # a cluster's ledger records the cluster's events
    try:
        return Recorder(open_ledger(url))
    except (ImageGenError, OSError) as exc:
        from rich.markup import escape  # a path may hold [brackets]

        err.print(
            f"[yellow]warning:[/] history is not recorded: {escape(str(exc))}", soft_wrap=True
        )
        return None
