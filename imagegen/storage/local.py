"""Objects as files under a local directory.

Layout, for the key ``2026/05/01/abc.png`` under the root ``./output``::

    output/2026/05/01/abc.png           the object itself
    output/2026/05/01/.abc.png.meta     its content type and user metadata (JSON)

The sidecar name starts with a dot, and no valid key segment does (see
:func:`~imagegen.storage.base.validate_key`), so a sidecar can never be mistaken for an object,
nor collide with the ``.json`` metadata record the persist stage writes as an object of its own.
Extended attributes would avoid the sidecar but are not portable (tmpfs, macOS, volume mounts).

Writes go to a hidden temporary file in the same directory, are flushed to disk, then renamed
over the target with :func:`os.replace`, so readers see the old object or the new one, never a
partial one. The directory is flushed after the rename, and each directory a write makes after
it is made: a rename lives in its directory's entries, so without that a write answered as done
could vanish with a power cut, and a generation's image be rendered again. A writer killed
mid-way can leave a hidden ``.<name>.<random>.tmp`` file behind; it is never visible as an
object, and the first write of a process into a directory removes those of them there older than
:data:`STALE_TEMPORARY` (a write takes seconds at most: one that old has no writer left).

:meth:`LocalStorage.create` (first writer wins) writes and flushes both files under hidden
temporary names first, then holds an exclusive :func:`fcntl.flock` on the directory's hidden
``.create.lock`` while it checks and renames, so processes sharing the directory create each
object once, and no writer waits behind another's flush to disk. The lock is waited for
:data:`LOCK_WAIT` seconds at most: held longer, by a writer stuck inside it (a stalled disk under
its renames, a process stopped in a debugger), the create fails with a retryable
:class:`~imagegen.errors.DependencyUnavailable` naming the directory, rather than hold a thread
until the request's own timeout and beyond. A lock rather than an
``O_EXCL`` claim file: the object and its sidecar must appear together, and the kernel releases
a lock when its holder dies, where a claim file left by a killed writer would block the key
forever. The sidecar is renamed into place before its object, so an object that is there is a
finished write, and a create never writes over it, with a sidecar or without, as S3 answers a
conditional upload over any object: exactly one writer is told it won. A writer killed between
the two renames leaves a sidecar without its object, which the next create writes over. A create
without metadata, whose content type is what the name says (the prompt memo, the metadata
record, the derivatives), writes the object alone, one file and one flush (and removes a sidecar
such a killed writer left), and :meth:`~LocalStorage.head` reads the same content type from the
name. What a name says of the names imagegen writes (``.png``, ``.json``, ``.webp``,
``.avif``) is fixed here, the same on every host; of any other, the host's MIME types say it.

Only a missing sidecar means an object has no metadata. One that is there but cannot be read
(EIO, EMFILE, ESTALE, EACCES) fails the read as any read error does, retryably, and one that
does not parse is corrupt (a 503 too, as :func:`imagegen.persist.corrupt_record`): taken for
"no metadata", a passing fault would make a finished image look unfinished, so that persist
failed its generation for good and render stored a second image under the first one's reply.

A symbolic link under the root is followed while it leads to another place under the root, and
refused when it leads outside it (a folder of the root linked onto another disk, say): a
:class:`~imagegen.errors.ConfigurationError` (503, retried) naming ``storage_url``. Keys are
validated (no ``..``, no absolute path), so no event can make such a link: it is the
deployment's doing, as a misconfigured bucket is for S3, and failing the event for good would
dead-letter a valid generation and orphan its image. :meth:`LocalStorage.check` looks for such
links among the root's own entries, so that ``imagegen doctor`` and a function's start-up say
so before an event meets one.

The blocking calls run on threads of local storage's own (:func:`_threads`), not on the event
loop's default executor: that one is the whole process's (a few threads: ``min(32, CPUs + 4)``),
and a thread cannot be stopped, so calls stuck on one folder would hold every thread of it,
and every other folder's writes, and whatever else of the process uses it, would wait behind
them until the request timed out. There are :data:`MAX_THREADS` of them at most: calls past
that (a burst: a sink's 100 concurrent deliveries, derive's look-ups of every derivative at
once) wait for a thread in turn, and each is run; only once no thread has taken a call for
:data:`THREAD_WAIT` seconds (every one held by a call that does not return) does a waiting call
fail, retryably, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mimetypes
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from imagegen._paths import NoHome, expanded
from imagegen._threads import DaemonPool, PoolExhausted
from imagegen.errors import ConfigurationError, DependencyUnavailable, NotFound
from imagegen.storage.base import ObjectStore, StoredObject, validate_key

__all__ = ["LOCK_WAIT", "LocalStorage"]

T = TypeVar("T")

_DEFAULT_CONTENT_TYPE = "application/octet-stream"
# The content types of the names imagegen writes, fixed here rather than taken from the host's
# MIME database: Python 3.11's own table has no .webp, so without /etc/mime.types one name
# would have two content types, and whether its object gets a sidecar would depend on the host.
_CONTENT_TYPES = {
    ".png": "image/png",
    ".json": "application/json",
    ".webp": "image/webp",
    ".avif": "image/avif",
}
_CREATE_LOCK = ".create.lock"
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")
"""The names :func:`_staged` gives its temporary files."""

STALE_TEMPORARY = 3600.0
"""Seconds after its last change a temporary file of ours is taken for one a killed writer left
(and removed): far beyond any write, so never a writer's at work."""
_swept: set[Path] = set()
_swept_lock = threading.Lock()

LOCK_WAIT = 5.0
"""Seconds a create waits for its directory's lock before it fails, retryably. The lock is
held only for a check and two renames (well under a millisecond on a healthy disk). The bound
is well under every stage's request timeout (the dead-letter sink's 60 s is the shortest that
writes), and within the 10 s the sink's budget leaves after its last try begins
(:data:`~imagegen.stages.deadletter.BUDGET` less
:data:`~imagegen.stages.deadletter.RETRY_FOR`), so a held lock is answered with storage's own
error, naming the directory, not with the stage's timeout. A call that does not return at all
(a disk that hangs, as an S3 store that accepts and never answers) is answered at that timeout
instead: at the sink, a 503 at 60 s, ``deadletter took longer than 60s``."""
_LOCK_POLL = (0.001, 0.05)
"""The first and the longest pause between tries of the lock (doubled each try): ``flock``
has no timed wait, on Linux or macOS, and a signal-timed one works on the main thread only."""
MAX_THREADS = 64
"""Threads local storage's calls may hold at once, across every :class:`LocalStorage` of the
process. Started only as needed; enough for one folder's stuck calls (each gives up after
:data:`LOCK_WAIT` when its lock is the cause) to leave the others theirs. A call past the limit
waits for a thread, in turn (a burst of calls on a disk that answers: each is run), for
:data:`THREAD_WAIT` at most."""
THREAD_WAIT = 8.0
"""Seconds a call past :data:`MAX_THREADS` waits for a thread while no thread takes any call:
then it fails, retryably, naming the wait (every thread has been held all that time by a call
that does not return: a disk that stalls). While threads take calls, however slowly, it waits
its turn, as long as its caller waits. Longer than :data:`LOCK_WAIT`, with room to spare:
calls waiting only for a held lock give up within that, and free their threads, so they alone
never make a call fail here. Within the 10 s the dead-letter sink's budget leaves after its last
try begins, as :data:`LOCK_WAIT` is, so the sink answers this error, not its timeout."""


class LocalStorage(ObjectStore):
    """A :class:`~imagegen.storage.base.Storage` on the local file system.

    Args:
        root: The directory holding every object; created on first write.
    """

    name = "local"

    def __init__(self, root: Path | str) -> None:
        from imagegen.settings import Settings

        try:
            given = expanded(root)
        except NoHome as exc:
            raise ConfigurationError(
                f"local storage: {exc} ({Settings.variable('storage_url')})",
                errors=[{"field": "storage_url", "message": str(exc)}],
            ) from None
        try:
            try:
                self.root = given.resolve(strict=True)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise
                # Not there yet (made as it is first written), or refused then, in words of
                # its own (a file where a folder should be, a folder this user cannot enter).
                self.root = given.resolve()
        except (RuntimeError, OSError) as exc:
            # A loop of links: Python 3.11 and 3.12 raise RuntimeError, later ones ELOOP.
            why = f"{str(given)!r} cannot be resolved ({exc})"
            raise ConfigurationError(
                f"local storage: {why} ({Settings.variable('storage_url')})",
                errors=[{"field": "storage_url", "message": why}],
            ) from None

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r})"

    async def _store(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> str:
        path = await self._blocking(self._write, key, data, content_type, metadata)
        return path.as_uri()

    async def _store_new(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> bool:
        """Write unless an object is there (the sidecar, if any, goes into place first)."""
        return await self._blocking(self._create, key, data, content_type, metadata)

    async def get(self, key: str) -> bytes:
        """Read the object at ``key``.

        Raises:
            NotFound: when there is no object at ``key``.
        """
        validate_key(key)
        try:
            return await self._blocking(lambda: self._path(key).read_bytes())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object at {key!r}") from None
        except OSError as exc:
            raise self._unavailable("cannot read from", exc) from exc

    async def head(self, key: str) -> StoredObject | None:
        """The object at ``key`` without its body, or None when absent."""
        validate_key(key)
        try:
            return await self._blocking(self._head, key)
        except OSError as exc:
            raise self._unavailable("cannot read from", exc) from exc

    def location(self, key: str) -> str:
        """The ``file://`` URI of the object at ``key``."""
        return self._path(key).as_uri()

    async def check(self) -> None:
        """Raise unless the root can be created and a byte written to it (a full disk cannot),
        and no link among its entries leads outside it.

        Raises:
            DependencyUnavailable: the root cannot be created or written to.
            ConfigurationError: naming ``storage_url``, for each link among the root's own
                entries that leads outside it (deeper links are met, and refused, by the keys
                under them: walking the whole tree here would cost a read of every folder).
        """
        try:
            await self._blocking(self._probe)
        except (FileExistsError, NotADirectoryError) as exc:
            # mkdir's "File exists" of the root, "Not a directory" of a folder above it.
            file = next(
                (p for p in (self.root, *self.root.parents) if p.exists()),
                None,
            )
            if file is None or file.is_dir():
                raise self._unavailable("cannot write to", exc) from exc
            raise DependencyUnavailable(
                f"local storage: cannot write to {str(self.root)!r}: {str(file)!r} is a file,"
                " not a directory"
            ) from exc
        except OSError as exc:
            raise self._unavailable("cannot write to", exc) from exc

    async def _blocking(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on one of local storage's threads.

        Raises:
            DependencyUnavailable: no thread took this call, or any other, within
                :data:`THREAD_WAIT` seconds: each is held by a call that has not returned.
        """
        try:
            return await _threads().run(fn, *args)
        except PoolExhausted as exc:
            raise DependencyUnavailable(
                f"local storage: cannot use {str(self.root)!r}: {exc} (calls that do not"
                " return: a disk that stalls)"
            ) from None

    # Blocking parts, run in a worker thread.

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        # validate_key rejects "..", but a symlink inside the root may still point outside it.
        # The root was resolved once, when this storage was made: only the key's own segments
        # are looked at, and a segment is resolved only when it is a link.
        link = _link_leading_out(self.root, key)
        if link is not None:
            raise self._links_leading_out([link])
        return path

    def _write(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> Path:
        path = self._path(key)
        try:
            # The object goes first, its metadata second: a writer killed in between leaves the
            # new object with stale metadata (e.g. an old sha256), which makes a retry write again,
            # never new metadata that would vouch for an old object.
            _atomic_write(path, data, make_parent=True)
            _atomic_write(_sidecar(path), _sidecar_record(content_type, metadata))
            _sync_directory(path.parent)
        except OSError as exc:
            raise self._unavailable("cannot write to", exc) from exc
        return path

    def _create(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> bool:
        path = self._path(key)
        # A sidecar would say only what the name says (no metadata, the usual content type):
        # none is written, and head() tells the same from the name.
        sidecar = bool(metadata) or content_type != _guessed_type(path)
        staged: list[Path] = []
        try:
            # Flushed before the lock: only the check and the renames are serialized.
            staged.append(_staged(path, data, make_parent=True))
            if sidecar:
                staged.append(_staged(_sidecar(path), _sidecar_record(content_type, metadata)))
            fd = os.open(path.parent / _CREATE_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            _discard(staged)
            raise self._unavailable("cannot write to", exc) from exc
        try:
            _lock(fd, path.parent)
            # The sidecar first, the object last: an object there is a finished create, whoever
            # made it, and is not written over. What a writer killed in between left is a
            # sidecar alone, replaced here, or removed where this create has none to write.
            created = not path.is_file()
            if created:
                # Each copy let go of once renamed, not before: one whose rename failed is
                # removed below with the rest.
                if sidecar:
                    os.replace(staged[-1], _sidecar(path))
                    staged.pop()
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_sidecar(path))
                os.replace(staged[-1], path)
                staged.pop()
        except OSError as exc:
            raise self._unavailable("cannot write to", exc) from exc
        finally:
            os.close(fd)  # releases the lock
            _discard(staged)  # what was not renamed: the loser's copies
        try:
            # Outside the lock: no writer waits behind the flush. The loser flushes too: the
            # winner's renames may not be on disk yet, and the loser answers from that object.
            _sync_directory(path.parent)
        except OSError as exc:
            raise self._unavailable("cannot write to", exc) from exc
        return created

    def _head(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            found = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(found.st_mode):
            return None
        size = found.st_size
        content_type, metadata = _read_sidecar(path)
        return StoredObject(
            key=key,
            location=path.as_uri(),
            size=size,
            content_type=content_type,
            metadata=metadata,
        )

    def _probe(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # A byte written, not an empty file: a full disk still makes an empty file (an inode,
        # no block), and refuses only bytes (ENOSPC). Synced, as the images are: a file system
        # that allocates blocks late (NFS, a quota enforced at write-back) refuses only then.
        with tempfile.TemporaryFile(dir=self.root, prefix=".check.", buffering=0) as probe:
            probe.write(b"\0")
            os.fsync(probe.fileno())
        with os.scandir(self.root) as entries:
            links = [Path(e.path) for e in entries if e.is_symlink()]
        leading_out = sorted(p for p in links if not _inside(p, self.root))
        if leading_out:
            raise self._links_leading_out(leading_out)

    def _links_leading_out(self, links: Sequence[Path]) -> ConfigurationError:
        """The error for links under the root that lead outside it.

        The deployment's doing, not the event's (keys cannot leave the root): retried, as
        :class:`~imagegen.storage.s3.S3Storage` answers a misconfigured bucket, rather than a
        400 that would fail a valid generation for good. Each link is named, as every local
        storage error names paths, only under the root: where it leads is the operator's to
        read (``ls -l``), not a caller's.
        """
        from imagegen.settings import Settings

        names = ", ".join(repr(str(link)) for link in links)
        said = "is a symbolic link that leads" if len(links) == 1 else "are links that lead"
        where = ", ".join(repr(str(link.relative_to(self.root))) for link in links)
        return ConfigurationError(
            f"local storage: {names} {said} outside the storage root: mount the other disk at"
            f" the root ({Settings.variable('storage_url')}) itself, or under it, not through a"
            " link (docs/storage.md)",
            errors=[{"field": "storage_url", "message": f"a link leads outside the root: {where}"}],
        )

    def _unavailable(self, what: str, exc: OSError) -> DependencyUnavailable:
        reason = exc.strerror or type(exc).__name__
        # The path that failed under the root, not the root (a file may stand where a key's
        # directory goes): a read names its file, a write the directory it could not add to.
        where = self.root
        if exc.filename is not None:
            failed = Path(os.fsdecode(exc.filename))
            failed = failed if what == "cannot read from" else failed.parent
            where = failed if failed.is_relative_to(self.root) else self.root
        return DependencyUnavailable(f"local storage: {what} {str(where)!r}: {reason}")


_POOL = DaemonPool("imagegen-local-storage", max_threads=MAX_THREADS, queue_for=THREAD_WAIT)


def _threads() -> DaemonPool:
    """The threads local storage's blocking calls run on, :data:`MAX_THREADS` at most, calls
    past them waiting their turn (:data:`THREAD_WAIT`). Each starts when a call first needs it,
    and they are daemon threads (:mod:`imagegen._threads`): nothing shuts them down, and a call
    stuck on a disk holds up no exit."""
    return _POOL


def _new_sweep_lock_after_fork() -> None:
    # Held by another of the parent's threads as it forked, it would never be let go here.
    global _swept_lock
    _swept_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_sweep_lock_after_fork)


def _lock(fd: int, directory: Path) -> None:
    """Take the exclusive ``flock`` on ``fd``, waiting :data:`LOCK_WAIT` seconds at most.

    Tried without blocking and again after a short pause, since ``flock`` has no timed wait: a
    blocking one would hold this thread for as long as the holder holds the lock.

    Raises:
        DependencyUnavailable: naming ``directory``, when the lock was not granted in time.
    """
    deadline = time.monotonic() + LOCK_WAIT
    pause, longest = _LOCK_POLL
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: held through another open file description
            pass
        else:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise DependencyUnavailable(
                f"local storage: cannot write to {str(directory)!r}: its lock ({_CREATE_LOCK})"
                f" was not granted within {LOCK_WAIT:g}s (another writer holds it)"
            )
        time.sleep(min(pause, left))
        pause = min(pause * 2, longest)


def _link_leading_out(root: Path, key: str) -> Path | None:
    """The first segment of ``key`` under ``root`` that is a symbolic link leading outside
    ``root``, or None (a missing segment is no link)."""
    current = str(root)
    for segment in key.split("/"):
        current = f"{current}/{segment}"
        try:
            linked = stat.S_ISLNK(os.lstat(current).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return None  # nothing exists below a missing segment
        if linked and not _inside(Path(current), root):
            return Path(current)
    return None


def _inside(link: Path, root: Path) -> bool:
    """Whether ``link`` resolves to a place under ``root``; a loop of links does not (Python
    3.11's ``resolve`` raises RuntimeError for one, later ones OSError): no key can lead there."""
    try:
        return link.resolve().is_relative_to(root)
    except (RuntimeError, OSError):
        return False


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.meta")


def _sidecar_record(content_type: str, metadata: dict[str, str]) -> bytes:
    return json.dumps({"content_type": content_type, "metadata": metadata}, sort_keys=True).encode()


def _staged(path: Path, data: bytes, *, make_parent: bool = False) -> Path:
    """``data`` in a new hidden file beside ``path``, flushed to disk; its path.

    With ``make_parent``, a missing directory is made first (looked for only when the file
    cannot be created: each call here is a system call, made while other threads wait).
    """
    _sweep_once(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write through a file or link someone else put there; 0o666 lets the umask
    # decide the permissions, as for any newly created file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileNotFoundError:
        if not make_parent:
            raise
        _make_directories(path.parent)
        fd = os.open(tmp, flags, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _discard([tmp])
        raise
    os.close(fd)
    return tmp


def _sweep_once(directory: Path) -> None:
    """Remove the temporary files of ours in ``directory`` older than :data:`STALE_TEMPORARY`
    (writers killed mid-way: a signal, a power cut), the first time this process writes there:
    one read of the directory per directory and process, not one per write."""
    with _swept_lock:
        if directory in _swept:
            return
        _swept.add(directory)
    stale = time.time() - STALE_TEMPORARY
    # Not made yet (the write makes it), or unreadable: nothing to remove.
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            # A folder may hold many objects (prompts/: one a generation): names first.
            name = entry.name
            if not (name.endswith(".tmp") and name.startswith(".") and _TEMPORARY.fullmatch(name)):
                continue
            with contextlib.suppress(OSError):  # gone meanwhile: another sweep
                if entry.is_file(follow_symlinks=False) and (
                    entry.stat(follow_symlinks=False).st_mtime < stale
                ):
                    os.unlink(entry.path)


def _make_directories(directory: Path) -> None:
    """``directory`` and any missing parent, each made durable in its parent's entries."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
            each.mkdir()
        _sync_directory(each.parent)


def _sync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries to disk: the names renamed or made in it (POSIX fsync)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _atomic_write(path: Path, data: bytes, *, make_parent: bool = False) -> None:
    tmp = _staged(path, data, make_parent=make_parent)
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard([tmp])
        raise


def _guessed_type(path: Path) -> str:
    """The content type an object's name says, which an object without a sidecar has."""
    known = _CONTENT_TYPES.get(path.suffix)
    return known or mimetypes.guess_type(path.name)[0] or _DEFAULT_CONTENT_TYPE


def _read_sidecar(path: Path) -> tuple[str, dict[str, str]]:
    """The content type and user metadata of the object at ``path``, from its sidecar.

    Raises:
        OSError: the sidecar is there but cannot be read (EIO, EMFILE, ESTALE, EACCES...):
            :meth:`LocalStorage.head` answers it retryable, as an S3 read error is. Taken for
            "no metadata" it would make persist fail the generation for good (an event compared
            with empty metadata) and render, on a redelivery, store a second image.
        DependencyUnavailable: the sidecar does not parse (:func:`_corrupt_sidecar`).
    """
    guessed = _guessed_type(path)
    sidecar = _sidecar(path)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        # No sidecar: a file copied in by hand, a put killed before it, or an object whose name
        # says all (no metadata).
        return guessed, {}
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8
        raise _corrupt_sidecar(sidecar, f"not JSON: {type(exc).__name__}") from None
    content_type = record.get("content_type") if isinstance(record, dict) else None
    metadata = record.get("metadata") if isinstance(record, dict) else None
    if not isinstance(content_type, str) or not isinstance(metadata, dict):
        # The one shape _sidecar_record writes, both fields always.
        raise _corrupt_sidecar(sidecar, "not a content type and a metadata object")
    return content_type, {str(k): str(v) for k, v in metadata.items()}


def _corrupt_sidecar(sidecar: Path, why: str) -> DependencyUnavailable:
    """The error for a sidecar that cannot be read, as for a corrupt stored record.

    Sidecars are renamed into place whole and flushed first (:func:`_staged`), so one that does
    not parse was damaged afterwards. Answered as :func:`imagegen.persist.corrupt_record`
    answers a corrupt record, and for its reasons: a 503, retried, until an operator repairs or
    removes it (with its object: a create then writes both again); not "no metadata", which
    would fail the generation for good (persist) or store a second image (render), nor a 400
    or a 500.
    """
    return DependencyUnavailable(
        f"local storage: the sidecar {str(sidecar)!r} is corrupt ({why}): repair it, or"
        " remove it with its object",
        retry_after=60,
    )
