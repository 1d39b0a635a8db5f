"""The Typer application every command registers on, and what the commands share.

Everything here is cheap to import: ``imagegen --help`` imports this, typer and the command
modules, and nothing a command needs only when it runs (the library, asyncio, torch).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Annotated, Any

import typer

from imagegen.cli import _no_color

try:  # recent typer releases carry their own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

if TYPE_CHECKING:
    from rich.console import Console

    from imagegen._threads import DaemonPool
    from imagegen.ledger import Ledger
    from imagegen.ledger.recorder import Recorder
    from imagegen.models import PersistedImage
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

__all__ = [
    "STOPPED",
    "AsJson",
    "CannotWrite",
    "Verbose",
    "app",
    "cancel_on_termination",
    "click_exceptions",
    "display_location",
    "dotenv_warnings",
    "err",
    "exit_at_once",
    "failed_write",
    "image_where",
    "make_service",
    "markup",
    "newer_schema_said",
    "out",
    "output_after",
    "printable",
    "refuse_empty",
    "run_async",
    "run_blocking",
    "say_stopped",
    "set_verbosity",
    "settings_from",
    "warn_newer_schema",
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

            # NO_COLOR drops every style, bold too, as it does in the libraries' output
            # (werkzeug's: imagegen.cli._server): rich's own reading of it drops the colours
            # alone. No colour system is how rich writes to a pipe: the text, no escapes.
            self._console = Console(
                stderr=self._stderr, color_system=None if _no_color() else "auto"
            )
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
_LIBRARY_LOGGERS = ("transformers", "diffusers", "huggingface_hub")
"""Their loggers: what they log as errors (a file they looked for and did not find), the
command says in its own one line, if it fails at all."""
_handler: _StderrHandler | None = None


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
    _handler.libraries = verbose
    logging.getLogger("imagegen").setLevel(logging.INFO if verbose else logging.NOTSET)
    return verbose


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a test may swap it); the model
    libraries' records only where ``libraries`` is set (``-v``)."""

    libraries = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.libraries and record.name.partition(".")[0] in _LIBRARY_LOGGERS:
            return False
        return super().filter(record)

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


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help=_VERBOSE_HELP, callback=set_verbosity)
    ] = False,
) -> None:
    """Text to image: enhance → render → persist → derive, in-process or as Knative functions."""
    if ctx.invoked_subcommand is None:
        # ``imagegen -v``: the help, as ``imagegen`` alone shows it (click shows it only where
        # no argument at all is given), never a bare "Missing command.".
        raise click_exceptions.NoArgsIsHelpError(ctx)
    _unparsed.clear()  # a command's own warnings (one process may run several: tests)


_FLAGS = {"storage_url": "--output", "ledger_url": "--ledger"}
"""The options that give a setting, by the setting: an error names what the user typed."""


def settings_from(**overrides: Any) -> Settings:
    """The settings from the environment, with the options the user gave (None: not given).

    Raises:
        ConfigurationError: A setting is invalid, named as the user gave it: its
            ``IMAGEGEN_*`` variable, or the option (never its value); or ``OTEL_PROPAGATORS``
            names a propagator not installed.
        InvalidRequest: ``--output`` names no storage.
    """
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from imagegen.errors import ConfigurationError
    from imagegen.observability import check_propagators
    from imagegen.settings import Settings

    # Before anything imports OpenTelemetry's propagators, which would fail as a bare
    # ValueError: refused as any setting that cannot work is.
    check_propagators()

    given = {k: v for k, v in overrides.items() if v is not None}
    for field, value in given.items():
        if field in _FLAGS:
            refuse_empty(_FLAGS[field], value)
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
    except (UnicodeDecodeError, OSError) as exc:
        if isinstance(exc, UnicodeDecodeError) or _from_dotenv(exc):  # read by python-dotenv
            raise ConfigurationError(
                f"invalid settings: .env cannot be read ({type(exc).__name__})",
                errors=[{"field": ".env", "message": "not a readable UTF-8 file"}],
            ) from None
        # A setting read as a path by its validation (IMAGEGEN_MODEL, a pipeline directory)
        # that the file system refuses to look up: a name too long (ENAMETOOLONG), say.
        variable = _naming(str(exc.filename or ""))
        why = exc.strerror or type(exc).__name__
        raise ConfigurationError(
            f"invalid settings: {variable or 'a path'} cannot be read as a path ({why})",
            errors=[{"field": variable or "", "message": f"cannot be read as a path ({why})"}],
        ) from None
    for unknown in Settings.unknown_variables():
        err.print(f"imagegen: warning: {unknown}", markup=False, soft_wrap=True)
    if "storage_url" in overrides:  # a command that stores images: --output, or the setting
        _check_output(settings, option="storage_url" in given)
    return settings


def refuse_empty(option: str, value: str | None) -> None:
    """Refuse ``option`` given empty (or blank): never read as its default, nor an empty path
    as the current folder.

    Raises:
        InvalidRequest: ``<option>: empty``, naming the option.
    """
    from imagegen.errors import InvalidRequest

    if value is not None and not value.strip():
        raise InvalidRequest(
            f"{option}: empty", errors=[{"field": option.lstrip("-"), "message": "empty"}]
        )


def _from_dotenv(exc: OSError) -> bool:
    """Whether ``exc`` came of reading the ``.env`` file the settings name (python-dotenv
    opens it by that name, which the error carries)."""
    from pathlib import Path

    from imagegen.settings import Settings

    files = Settings.model_config.get("env_file")
    named = [files] if isinstance(files, str | Path) else list(files or ())
    return exc.filename is not None and any(
        Path(str(exc.filename)).expanduser() == Path(f).expanduser() for f in named
    )


def _naming(path: str) -> str | None:
    """The ``IMAGEGEN_*`` variable whose value ``path`` is, or lies under; None if none."""
    if not path:
        return None
    for name, value in os.environ.items():
        under = value.rstrip("/") + "/"
        if name.startswith("IMAGEGEN_") and value and (path == value or path.startswith(under)):
            return name
    return None


def _check_output(settings: Settings, *, option: bool) -> None:
    """Refuse a storage URL that names no storage before anything is done, named as the user
    gave it: ``--output`` (bad input), else the setting's variable (never the URL: it may
    hold a key)."""
    from imagegen.errors import ConfigurationError, InvalidRequest
    from imagegen.storage import open_storage

    try:
        open_storage(settings)  # nothing is written or reached
    except ConfigurationError as exc:
        if "storage_url" not in exc.fields or not option:
            raise  # the storage names the setting by its variable
        why = exc.errors[exc.fields.index("storage_url")]["message"]
        raise InvalidRequest(
            f"--output: {why}", errors=[{"field": "output", "message": why}]
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
    """A stored object's location as a person reads it: a local file's path, else as it is.

    The path is the file's own: bytes that are no UTF-8 come back as Python keeps them in a
    file name (surrogateescape), and are written to a terminal or a pipe as they were.
    """
    if location.startswith("file://"):
        from urllib.parse import unquote_to_bytes, urlparse

        return os.fsdecode(unquote_to_bytes(urlparse(location).path))
    return location


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\udc80-\udc9f]")
_CONTROL_IN_A_CELL = re.compile(r"[\x00-\x1f\x7f-\x9f\udc80-\udc9f]")


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` (a prompt, a model's name, a path, an error: anything stored or received) as
    a terminal may show it: each control character U+FFFD, a newline and a tab kept unless
    ``one_line`` (a table's cell).

    Control characters are C0, DEL and C1, and the bytes 0x80-0x9f of a file name that is no
    UTF-8 (which a terminal in 8-bit mode reads as C1): an ``ESC [`` from a prompt an LLM
    wrote must not move the cursor, retitle the window or hide what follows. ``--json``
    output needs none of this: JSON escapes them all.
    """
    return (_CONTROL_IN_A_CELL if one_line else _CONTROL).sub("\ufffd", text)


def markup(text: str, *, one_line: bool = False) -> str:
    """:func:`printable` ``text``, its ``[`` escaped for rich markup (a path may hold one)."""
    from rich.markup import escape

    return escape(printable(text, one_line=one_line))


def image_where(persisted: PersistedImage) -> str:
    """The image as a person opens it: its public URL, else a local path, else its location."""
    return persisted.url or display_location(persisted.location)


_WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "EBADF")
    if hasattr(errno, name)
)


def failed_write(exc: BaseException) -> bool:
    """Whether ``exc`` is a write to stdout or stderr that failed (a full disk, a closed
    descriptor). A closed pipe (EPIPE: ``| head``) is not one: click ends the command then,
    quietly, with exit 1. What imagegen writes to files and storage raises its own errors."""
    return isinstance(exc, OSError) and exc.filename is None and exc.errno in _WRITE_ERRNOS


class CannotWrite(Exception):
    """The output could not be written once the command's work was done: said with where
    that work is (``done``)."""

    def __init__(self, error: OSError, *, done: str) -> None:
        super().__init__(error.strerror or str(error))
        self.error, self.done = error, done


@contextmanager
def output_after(done: str) -> Iterator[None]:
    """Writing the output of work already done (an image stored): a failed write in the
    block is :class:`CannotWrite`, saying ``done``."""
    try:
        yield
    except OSError as exc:
        if not failed_write(exc):
            raise
        raise CannotWrite(exc, done=done) from None


def cancel_on_termination(stopped_by: list[int]) -> None:
    """SIGTERM and SIGHUP (``timeout``, systemd, a closed terminal) cancel the running task, as
    Ctrl-C does, so the ledger records where the generation stopped rather than showing it at
    its last stage for ever; the first one's number goes into ``stopped_by``."""
    import asyncio
    import signal

    running, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None, "called from a task"

    def stop(signum: int) -> None:
        if not stopped_by:
            stopped_by.append(signum)
            exit_at_once(128 + signum)  # another signal while it stops: at once
            task.cancel()

    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)  # Windows has no SIGHUP
        # A signal the process was started ignoring (nohup, a supervisor) stays ignored.
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            with suppress(NotImplementedError):  # nor signal handlers on its loops
                running.add_signal_handler(signum, stop, signum)


def run_async(coro_factory: Callable[[], Any]) -> Any:
    """Run the coroutine ``coro_factory()`` makes to completion; return its result.

    Ctrl-C (SIGINT) cancels it, as :func:`asyncio.run` does, and is raised as
    ``KeyboardInterrupt`` once it has ended; another signal meanwhile (the render stopping,
    its failure recorded, the clients closing) ends the process at once, in the same one line
    (:func:`exit_at_once`). asyncio's own runner raises the second Ctrl-C as
    ``KeyboardInterrupt`` wherever Python is running then (asyncio/runners.py,
    ``Runner._on_sigint``): in a client's close, a finalizer, a log handler, each left half
    done and reported as the process ends.
    """
    import asyncio
    import signal
    import threading

    main: list[asyncio.Task[Any]] = []
    interrupted: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        if not main or main[0].done():  # not begun, or over: Python's own way
            raise KeyboardInterrupt
        interrupted.append(signum)
        exit_at_once(130)
        main[0].get_loop().call_soon_threadsafe(main[0].cancel)

    async def run() -> Any:
        task = asyncio.current_task()
        assert task is not None, "run as a task"
        main.append(task)
        return await coro_factory()

    # Signal handlers are the main thread's alone (a test may run a command on another).
    handles = threading.current_thread() is threading.main_thread()
    # What SIGINT, SIGTERM and SIGHUP do before, put back as it ends: the handlers set while
    # it stops (exit_at_once's) are for this run alone, not for what its caller does next.
    before = {signum: signal.getsignal(signum) for signum in _stop_signals()} if handles else {}
    if handles and before.get(signal.SIGINT) is signal.default_int_handler:
        # Set before the runner starts, which then leaves SIGINT alone (it installs its own
        # only over Python's default handler). Only over that one: a process started with
        # SIGINT ignored (a background job of a script, a supervisor) goes on ignoring it.
        signal.signal(signal.SIGINT, interrupt)
    try:
        return asyncio.run(run())
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        for signum, handler in before.items():
            if handler is not None:  # None: set outside Python, left as it is
                with suppress(Exception):
                    signal.signal(signum, handler)


def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Return ``fn(*args)``, run on a daemon thread while this one waits: a start-up call
    that blocks for seconds (importing torch and diffusers, asking for the device), run as
    render runs it for ``generate`` (``imagegen.render.stage``).

    A Ctrl-C meanwhile stops the command as :func:`run_async` stops any (one line, exit 130)
    at once; the thread, which cannot be stopped, is left to the process's exit. Run on the
    main thread, the interrupt lands wherever the import is, in torch's C start-up too, which
    swallows it or leaves a module half imported (numpy's): the command went on as though
    never interrupted, failed on a later import, or said torch was not installed.
    """
    pool = _start_up()
    return run_async(lambda: pool.run(fn, *args))


@functools.cache
def _start_up() -> DaemonPool:
    """The daemon threads :func:`run_blocking` runs on, made on first use."""
    from imagegen._threads import DaemonPool

    return DaemonPool("imagegen-start-up")


STOPPED = {130: "interrupted", 143: "terminated", 129: "hung up"}
"""The exit status of a command a signal stopped (128 + its number: SIGINT, SIGTERM, SIGHUP)
and what is said of it."""

_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # Windows has no SIGHUP


class _Said:
    """Whether the line that says a command was stopped is written (``said``), being written
    (``saying``), and whether a signal came while it was (``exit_after``)."""

    saying = False
    said = False
    exit_after: int | None = None

    @classmethod
    def reset(cls) -> None:
        """Nothing said yet: a command begins (another may have run in this process)."""
        cls.saying, cls.said, cls.exit_after = False, False, None


def _stop_signals() -> list[int]:
    """The numbers of SIGINT, SIGTERM and SIGHUP, those this platform has."""
    import signal

    return [getattr(signal, name) for name in _STOP_SIGNALS if hasattr(signal, name)]


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_at_once(code: int) -> None:
    """From now on SIGINT, SIGTERM and SIGHUP end the process at once, with exit ``code``
    and, where it is not said yet, its one line (:func:`say_stopped`): the command is already
    stopping, and another signal asks for no more than that. Its output is flushed; nothing
    else runs (no cleanup, no finalizer to report what it leaves half done)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def now(signum: int, frame: object) -> None:
        if _Said.saying:  # interrupting the line itself: the process ends once it is written
            _Said.exit_after = code
            return
        if not _Said.said:
            # Saying it, until it is said: a signal meanwhile (this handler again, between
            # any two of its steps) waits for the line rather than ending the process first.
            _Said.saying = True
            try:
                with suppress(Exception):
                    sys.stderr.write(f"imagegen: error: {STOPPED[code]}\n")
            finally:
                _Said.said, _Said.saying = True, False
        _flush_and_exit(code)

    running = _running_loop()
    for name in _STOP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue  # the process was started ignoring it: it still does
        if running is not None:
            # The loop's own handler (cancel_on_termination's) would otherwise be put back to
            # the default as the loop closes, under this one.
            with suppress(Exception):
                running.remove_signal_handler(signum)
        signal.signal(signum, now)


def say_stopped(code: int, write: Callable[[str], None]) -> None:
    """Say the one line that says a signal stopped the command (``write`` writes it), unless
    :func:`exit_at_once`'s handler has; a signal that comes while it is written ends the
    process once it is."""
    if _Said.said:
        return
    _Said.saying = True
    try:
        write(STOPPED[code])
    finally:
        _Said.said, _Said.saying = True, False
    if _Said.exit_after is not None:
        _flush_and_exit(_Said.exit_after)


def _running_loop() -> Any:
    """The event loop running in this thread, or None (asyncio not even imported)."""
    asyncio = sys.modules.get("asyncio")
    return asyncio.events._get_running_loop() if asyncio is not None else None


def make_service(settings: Settings, *, record: bool = True) -> ImageGenService:
    """An in-process service, with traces and metrics set up for the CLI; ``record``: into
    the local history (the ledger is opened, and created, now)."""
    from imagegen.observability import setup_observability
    from imagegen.service import ImageGenService

    # Traces and metrics go to a collector when OTEL_EXPORTER_OTLP_ENDPOINT says so; the
    # console stays the CLI's own.
    setup_observability("imagegen-cli", settings, logs=False)
    return ImageGenService(settings, recorder=_recorder(settings) if record else None)


LEDGER_BUSY_TIMEOUT = 2.0
"""Seconds the history's write waits for a lock another process holds on a SQLite ledger:
then that generation's later events are kept, and written once it ends, waiting the ledger's
usual 30 s (:class:`~imagegen.ledger.recorder.Recorder`)."""


def _recorder(settings: Settings) -> Recorder | None:
    """What records the local history; None (and a warning) when the ledger cannot open."""
    from imagegen.errors import ImageGenError
    from imagegen.ledger import open_ledger
    from imagegen.ledger.recorder import HistoryCutShort, Recorder

    url = settings.ledger_url.get_secret_value() if settings.ledger_url else None
    if url and url.startswith(("http://", "https://")):
        # A ledger function records the events its cluster's broker delivers; nothing this
        # process makes reaches it, and there is no local ledger to record into instead.
        variable = settings.variable("ledger_url")
        err.print(
            f"[yellow]warning:[/] history is not recorded: {variable} is a ledger function's"
            " URL, which records a cluster's generations, not this machine's",
            soft_wrap=True,
        )
        return None
    try:
        # A short wait for another process's write lock (a long `imagegen ledger prune`): the
        # image is not held up for the ledger's usual 30 s on each of its events.
        ledger = open_ledger(url, busy_timeout=LEDGER_BUSY_TIMEOUT)
    except (ImageGenError, OSError) as exc:
        _not_recorded(exc)
        return None
    warn_newer_schema(ledger)
    said: list[Exception] = []

    def failed(exc: Exception) -> None:
        # A ledger that opens and then cannot be written (damaged pages, a full disk): said
        # once, as one that cannot open is; the log line is seen only with -v. One busy past
        # the wait: what of the generation is recorded, and what not.
        # The last try at what a busy ledger kept is said too: the line before promised it.
        if not said or (isinstance(exc, HistoryCutShort) and exc.final):
            said.append(exc)
            if isinstance(exc, HistoryCutShort):
                err.print(f"[yellow]warning:[/] {markup(str(exc))}", soft_wrap=True)
            else:
                _not_recorded(exc)

    # What the short wait leaves out of a generation is written at its end, with the ledger's
    # usual wait: the image is made by then, and its history is then whole.
    return Recorder(ledger, on_failure=failed, patient=lambda: open_ledger(url))


def newer_schema_said(ledger: Ledger) -> str | None:
    """What to tell a person of a ledger a newer imagegen migrated (opened all the same, as a
    replica of the release before is: docs/ledger.md), or None; a log line says it only
    with ``-v``."""
    if ledger.newer_schema is None:
        return None
    theirs, ours = ledger.newer_schema
    return (
        f"ledger {ledger.where} was migrated by a newer imagegen (schema {theirs:04d}; this one "
        f"knows up to {ours:04d}): upgrade imagegen, or what it writes there may fail"
    )


def warn_newer_schema(ledger: Ledger) -> None:
    """Say :func:`newer_schema_said` as a warning line, if there is something to say."""
    if (said := newer_schema_said(ledger)) is not None:
        err.print(f"[yellow]warning:[/] {markup(said)}", soft_wrap=True)


def _not_recorded(exc: BaseException) -> None:
    err.print(f"[yellow]warning:[/] history is not recorded: {markup(str(exc))}", soft_wrap=True)
