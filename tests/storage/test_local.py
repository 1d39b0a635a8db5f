"""LocalStorage: layout, atomic writes, keys that must not leave the root, folders that stall."""

from __future__ import annotations

import asyncio
import errno
import json
import mimetypes
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from imagegen._threads import DaemonPool
from imagegen.errors import ConfigurationError, DependencyUnavailable
from imagegen.storage import GenerationKeys, LocalStorage
from imagegen.storage import local as local_module
from imagegen.storage.base import prompt_memo_key

KEYS = GenerationKeys("gen-0003", datetime(2026, 5, 1, 23, 59, tzinfo=UTC))
MEMO = prompt_memo_key("gen-0003")
OLD = b"old" * 100_000
NEW = b"new" * 100_000


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# 1. Layout


async def test_layout_on_disk(local: LocalStorage) -> None:
    stored = await local.put(KEYS.image, b"png", content_type="image/png", metadata={"sha256": "x"})
    await local.put(KEYS.metadata, b"{}", content_type="application/json")

    path = local.root / "2026" / "05" / "01" / "gen-0003.png"
    assert path.read_bytes() == b"png"
    assert stored.location == path.as_uri() == local.location(KEYS.image)
    assert stored.location.startswith("file:///")
    assert files_under(local.root) == [
        "2026/05/01/.gen-0003.json.meta",
        "2026/05/01/.gen-0003.png.meta",
        "2026/05/01/gen-0003.json",
        "2026/05/01/gen-0003.png",
    ]
    sidecar = json.loads((path.parent / ".gen-0003.png.meta").read_text())
    assert sidecar == {"content_type": "image/png", "metadata": {"sha256": "x"}}


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = LocalStorage("output")
    assert storage.root == tmp_path.resolve() / "output"
    assert storage.location("a.png") == (tmp_path.resolve() / "output" / "a.png").as_uri()


async def test_object_without_sidecar_still_served(local: LocalStorage) -> None:
    path = local.root / "copied.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"png")

    head = await local.head("copied.png")

    assert head is not None
    assert (head.size, head.content_type, head.metadata) == (3, "image/png", {})


async def test_directory_is_not_an_object(local: LocalStorage) -> None:
    await local.put(KEYS.image, b"png", content_type="image/png")
    assert await local.head("2026/05") is None


# 2. Atomic writes


async def test_no_temporary_files_left(local: LocalStorage) -> None:
    for content in (OLD, NEW, NEW):
        await local.put(KEYS.image, content, content_type="image/png")

    assert files_under(local.root) == ["2026/05/01/.gen-0003.png.meta", "2026/05/01/gen-0003.png"]


async def test_readers_see_old_or_new_never_partial(local: LocalStorage) -> None:
    await local.put(KEYS.image, OLD, content_type="image/png")
    path = local.root / KEYS.image
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(path.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            await local.put(KEYS.image, NEW if i % 2 == 0 else OLD, content_type="image/png")
    finally:
        done.set()
        reader.join()

    assert seen <= {OLD, NEW}


async def test_failed_write_keeps_old_object(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    await local.put(KEYS.image, OLD, content_type="image/png")

    def no_space(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(DependencyUnavailable) as error:
        await local.put(KEYS.image, NEW, content_type="image/png")
    monkeypatch.undo()

    assert "No space left on device" in error.value.message
    assert await local.get(KEYS.image) == OLD
    assert files_under(local.root) == ["2026/05/01/.gen-0003.png.meta", "2026/05/01/gen-0003.png"]


@pytest.mark.parametrize("write", ["put", "create"])
async def test_a_write_is_durable_in_its_directories_before_it_is_done(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    """Renamed and made names are flushed in their directories' entries (fsync of each
    directory after the rename or mkdir): a file flushed alone can vanish with a power cut."""
    (local.root / "2026").mkdir(parents=True)  # the day's month and day are made by the write
    steps: list[tuple[str, str]] = []
    real_fsync, real_replace, real_mkdir = os.fsync, os.replace, Path.mkdir

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if target.is_dir():
            steps.append(("fsync", str(target.relative_to(local.root.parent))))
        real_fsync(fd)

    def replace(source: str | Path, target: str | Path) -> None:
        real_replace(source, target)
        steps.append(("rename", Path(target).name))

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]
        steps.append(("mkdir", str(self.relative_to(local.root.parent))))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    await getattr(local, write)(KEYS.image, NEW, content_type="image/png", metadata={"v": "1"})
    monkeypatch.undo()

    root = local.root.name
    # A put's object goes first (stale metadata never vouches for a new object), a create's
    # last (an object there is a finished create).
    renames = [("rename", "gen-0003.png"), ("rename", ".gen-0003.png.meta")]
    assert steps == [
        ("mkdir", f"{root}/2026/05"),
        ("fsync", f"{root}/2026"),
        ("mkdir", f"{root}/2026/05/01"),
        ("fsync", f"{root}/2026/05"),
        *(renames if write == "put" else renames[::-1]),
        ("fsync", f"{root}/2026/05/01"),
    ]
    assert await local.get(KEYS.image) == NEW


async def test_a_create_that_finds_the_object_flushes_its_directory_before_it_answers(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loser of a race answers from the winner's object: the winner's renames may not be
    on disk yet (its flush comes after its lock), so the loser flushes the directory too."""
    assert await local.create(KEYS.image, NEW, content_type="image/png")
    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if target.is_dir():
            flushed.append(str(target.relative_to(local.root)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert not await local.create(KEYS.image, OLD, content_type="image/png")
    monkeypatch.undo()

    assert flushed == ["2026/05/01"]
    assert await local.get(KEYS.image) == NEW


async def test_killed_writer_leaves_old_object(local: LocalStorage) -> None:
    await local.put(KEYS.image, OLD, content_type="image/png", metadata={"v": "old"})
    # A real SIGKILL, after the new bytes are written to disk but before the rename.
    script = f"""
import asyncio, os, signal
from imagegen.storage import LocalStorage
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(LocalStorage({str(local.root)!r}).put({KEYS.image!r}, b"new" * 100_000,
    content_type="image/png", metadata={{"v": "new"}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, timeout=30)

    assert result.returncode == -9
    assert await local.get(KEYS.image) == OLD
    head = await local.head(KEYS.image)
    assert head is not None and head.metadata == {"v": "old"}
    # The hidden temporary file stays behind, invisible as an object.
    leftovers = [name for name in files_under(local.root) if name.endswith(".tmp")]
    assert len(leftovers) == 1 and "/.gen-0003.png." in leftovers[0]


@pytest.mark.parametrize("write", ["put", "create"])
async def test_a_first_write_into_a_folder_removes_stale_temporary_files(
    local: LocalStorage, write: str
) -> None:
    """Those a killed writer left an hour ago and more go; a writer's at work now (fresh) stays,
    and so does every other file, hidden or not."""
    folder = local.root / "2026" / "05" / "01"
    folder.mkdir(parents=True)
    names = {
        "stale": ".gen-0001.png.0123456789abcdef.tmp",
        "fresh": ".gen-0002.png.fedcba9876543210.tmp",
        "other": ".notes.tmp",
        "object": "gen-0001.json",
    }
    hour_and_more = time.time() - local_module.STALE_TEMPORARY - 60
    for kind, name in names.items():
        (folder / name).write_bytes(b"x")
        if kind != "fresh":
            os.utime(folder / name, (hour_and_more, hour_and_more))

    if write == "put":
        await local.put(KEYS.image, b"png", content_type="image/png")
    else:
        assert await local.create(KEYS.image, b"png", content_type="image/png")

    left = set(os.listdir(folder))
    assert names["stale"] not in left
    assert {names["fresh"], names["other"], names["object"], "gen-0003.png"} <= left


@pytest.mark.parametrize("recorded", [True, False], ids=["with-sidecar", "object-alone"])
async def test_create_across_processes_has_one_winner(local: LocalStorage, recorded: bool) -> None:
    # Four processes wait at one barrier (a file each has to see), then create the same key:
    # with metadata (a sidecar to write too), and without (the object alone).
    metadata = '{"by": sys.argv[1]}' if recorded else "{}"
    script = f"""
import asyncio, os, sys, time
from pathlib import Path
from imagegen.storage import LocalStorage
go = Path({str(local.root)!r}) / "go"
while not go.exists():
    time.sleep(0.001)
won = asyncio.run(LocalStorage({str(local.root)!r}).create({KEYS.image!r},
    sys.argv[1].encode() * 100_000, content_type="image/png", metadata={metadata}))
print(won)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    local.root.mkdir(parents=True)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, name], env=env, stdout=subprocess.PIPE, text=True
        )
        for name in "abcd"
    ]
    (local.root / "go").touch()
    answers = [writer.communicate(timeout=60)[0].strip() for writer in writers]

    assert sorted(answers) == ["False", "False", "False", "True"]
    winner = "abcd"[answers.index("True")]
    assert await local.get(KEYS.image) == winner.encode() * 100_000
    head = await local.head(KEYS.image)
    assert head is not None and head.metadata == ({"by": winner} if recorded else {})
    # The losers' copies, written before the lock, are gone; a sidecar only where one was due.
    assert files_under(local.root) == sorted(
        ["go", "2026/05/01/.create.lock", "2026/05/01/gen-0003.png"]
        + (["2026/05/01/.gen-0003.png.meta"] if recorded else [])
    )


async def test_a_create_with_nothing_to_record_writes_the_object_alone(
    local: LocalStorage,
) -> None:
    # The prompt memo: no metadata, the content type its name says.
    assert await local.create(MEMO, b'{"a": 1}', content_type="application/json")
    assert files_under(local.root) == [
        "prompts/.create.lock",  # the folder's lock, no sidecar
        "prompts/gen-0003.json",
    ]
    head = await local.head(MEMO)
    assert head is not None
    assert (head.content_type, head.metadata, head.size) == ("application/json", {}, 8)
    # The first writer wins as with a sidecar: the object alone is a complete one.
    assert not await local.create(MEMO, b'{"b": 2}', content_type="application/json")
    assert await local.get(MEMO) == b'{"a": 1}'


async def test_a_content_type_the_name_does_not_say_is_kept_in_a_sidecar(
    local: LocalStorage,
) -> None:
    assert await local.create(KEYS.metadata, b"{}", content_type="application/x-ndjson")
    assert files_under(local.root) == [
        "2026/05/01/.create.lock",
        "2026/05/01/.gen-0003.json.meta",
        "2026/05/01/gen-0003.json",
    ]
    head = await local.head(KEYS.metadata)
    assert head is not None and head.content_type == "application/x-ndjson"


@pytest.fixture
def host_without_mime_types(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A host without /etc/mime.types (a slim container image): Python's own table alone."""
    monkeypatch.setattr(mimetypes, "knownfiles", [])
    mimetypes.init()
    yield
    monkeypatch.undo()
    mimetypes.init()


@pytest.mark.usefixtures("host_without_mime_types")
async def test_the_names_imagegen_writes_say_their_content_type_on_any_host(
    local: LocalStorage,
) -> None:
    """Python 3.11 knows no .webp of its own: the thumbnail and WebP derivatives would be
    written with a sidecar on one host and without on another."""
    written = {
        KEYS.thumbnail: "image/webp",
        "2026/05/01/gen-0003.w256.webp": "image/webp",
        "2026/05/01/gen-0003.w256.avif": "image/avif",
        KEYS.derivatives: "application/json",
        KEYS.image: "image/png",
    }
    for key, content_type in written.items():
        assert await local.create(key, b"x", content_type=content_type)
    assert not [name for name in files_under(local.root) if name.endswith(".meta")]
    for key, content_type in written.items():
        head = await local.head(key)
        assert head is not None and head.content_type == content_type, key


async def test_create_never_writes_over_an_object_found_without_a_sidecar(
    local: LocalStorage,
) -> None:
    """An object is renamed into place after its sidecar, so one that is there is a finished
    write, whoever made it: created without metadata, put, copied in by hand. The second
    writer loses, as an S3 conditional upload over any object does."""
    assert await local.create(KEYS.image, b"FIRST", content_type="image/png")
    assert not await local.create(
        KEYS.image, b"SECOND", content_type="image/png", metadata={"sha256": "x"}
    )
    assert await local.get(KEYS.image) == b"FIRST"
    head = await local.head(KEYS.image)
    assert head is not None and head.metadata == {}
    assert ".gen-0003.png.meta" not in os.listdir(local.root / "2026/05/01")


async def test_an_object_written_before_its_sidecar_is_read_and_kept(local: LocalStorage) -> None:
    """Stores whose creates renamed the object first, then its sidecar: read as ever, and a
    create leaves the object alone."""
    path = local.root / KEYS.image
    path.parent.mkdir(parents=True)
    path.write_bytes(OLD)
    (path.parent / ".gen-0003.png.meta").write_text(
        json.dumps({"content_type": "image/png", "metadata": {"v": "1"}})
    )

    assert not await local.create(KEYS.image, NEW, content_type="image/png", metadata={"v": "2"})
    head = await local.head(KEYS.image)
    assert head is not None and head.metadata == {"v": "1"}
    assert await local.get(KEYS.image) == OLD


async def test_a_create_interrupted_between_its_renames_is_written_again(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed after its sidecar went into place, before its object: no object, so the next
    delivery's create writes both, its own metadata over the sidecar left."""
    real_replace = os.replace

    def sidecar_only(source: str | Path, target: str | Path) -> None:
        if not Path(target).name.endswith(".meta"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", sidecar_only)
    with pytest.raises(DependencyUnavailable):
        await local.create(KEYS.image, OLD, content_type="image/png", metadata={"v": "1"})
    monkeypatch.undo()
    assert await local.head(KEYS.image) is None
    assert ".gen-0003.png.meta" in os.listdir(local.root / "2026/05/01")

    assert await local.create(KEYS.image, NEW, content_type="image/png", metadata={"v": "2"})
    head = await local.head(KEYS.image)
    assert head is not None and head.metadata == {"v": "2"}
    assert await local.get(KEYS.image) == NEW
    assert not await local.create(KEYS.image, OLD, content_type="image/png", metadata={"v": "3"})


async def test_a_sidecar_left_alone_is_removed_by_a_create_without_metadata(
    local: LocalStorage,
) -> None:
    """A killed writer's sidecar does not describe the object a later create writes alone."""
    folder = local.root / "2026/05/01"
    folder.mkdir(parents=True)
    (folder / ".gen-0003.png.meta").write_text(
        json.dumps({"content_type": "image/png", "metadata": {"sha256": "left"}})
    )

    assert await local.create(KEYS.image, NEW, content_type="image/png")
    head = await local.head(KEYS.image)
    assert head is not None and (head.content_type, head.metadata) == ("image/png", {})
    assert sorted(os.listdir(folder)) == [".create.lock", "gen-0003.png"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EMFILE, "Too many open files"),
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.ESTALE, "Stale file handle"),
        PermissionError(errno.EACCES, "Permission denied"),
    ],
    ids=["EMFILE", "EIO", "ESTALE", "EACCES"],
)
async def test_a_sidecar_that_cannot_be_read_is_an_error_to_retry_not_no_metadata(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    """Read as "no metadata", a passing fault would make a finished image look unfinished:
    persist would fail its generation for good, render store a second image."""
    await local.put(KEYS.image, b"png", content_type="image/png", metadata={"sha256": "x"})
    read_text = Path.read_text

    def failing(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name.endswith(".meta"):
            raise type(error)(error.errno, error.strerror, str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", failing)
    with pytest.raises(DependencyUnavailable) as raised:
        await local.head(KEYS.image)
    monkeypatch.undo()

    assert raised.value.retryable and raised.value.status == 503
    assert error.strerror in raised.value.message
    assert ".gen-0003.png.meta" in raised.value.message  # the file that failed
    head = await local.head(KEYS.image)  # the fault passed: the metadata is there
    assert head is not None and head.metadata == {"sha256": "x"}


@pytest.mark.parametrize("blocked", ["sidecar", "object"])
async def test_a_create_whose_rename_fails_leaves_no_copy_behind(
    local: LocalStorage, blocked: str
) -> None:
    """A rename refused (here: a folder where the file goes) fails the create retryably, and
    the copies it staged go with it: none is left for a later sweep."""
    folder = local.root / KEYS.image.rpartition("/")[0]
    name = KEYS.image.rpartition("/")[2]
    (folder / (f".{name}.meta" if blocked == "sidecar" else name)).mkdir(parents=True)

    with pytest.raises(DependencyUnavailable) as raised:
        await local.create(KEYS.image, b"png", content_type="image/png", metadata={"sha256": "x"})

    assert raised.value.retryable
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.parametrize(
    "sidecar",
    [
        b'{"content_type": "image/png", "metadata": {"sha2',  # cut short
        b"\xff\xfe not UTF-8",
        b"[]",
        b'{"content_type": "image/png"}',
        b'{"content_type": 1, "metadata": {}}',
    ],
    ids=["cut-short", "not-utf8", "not-an-object", "no-metadata", "content-type-not-text"],
)
async def test_a_sidecar_that_does_not_parse_is_corrupt_as_a_stored_record_is(
    local: LocalStorage, sidecar: bytes
) -> None:
    """Answered as imagegen.persist.corrupt_record answers a corrupt record: a 503 naming it,
    retried until an operator repairs it; create does not write over it either."""
    await local.put(KEYS.image, b"png", content_type="image/png", metadata={"sha256": "x"})
    (local.root / "2026/05/01/.gen-0003.png.meta").write_bytes(sidecar)

    with pytest.raises(DependencyUnavailable) as raised:
        await local.head(KEYS.image)

    assert raised.value.retryable and raised.value.retry_after == 60
    assert "2026/05/01/.gen-0003.png.meta" in raised.value.message
    assert "corrupt" in raised.value.message
    assert not await local.create(KEYS.image, NEW, content_type="image/png", metadata={"v": "1"})
    assert await local.get(KEYS.image) == b"png"


# 3. Keys and links that would leave the root


def assert_refused_link(error: ConfigurationError, link: Path, outside: Path) -> None:
    """The deployment's doing, not the key's: a 503 retried, naming the setting and the link,
    never where the link leads (outside the root, which no storage error names)."""
    assert (error.status, error.retryable, error.code) == (503, True, "not_configured")
    assert error.fields == ["storage_url"]
    assert f"local storage: {str(link)!r} is a symbolic link that leads outside" in error.message
    assert "IMAGEGEN_STORAGE_URL" in error.message
    assert str(outside) not in str(error.to_dict())


async def test_symlinked_directory_escape_is_refused_as_configuration(
    local: LocalStorage, tmp_path: Path
) -> None:
    """A folder of the root linked onto another disk: every key under it is refused, retryably,
    and nothing is written there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    local.root.mkdir(parents=True)
    (local.root / "2026").symlink_to(outside, target_is_directory=True)

    for attempt in (
        local.put(KEYS.image, b"png", content_type="image/png"),
        local.create(KEYS.metadata, b"{}", content_type="application/json"),
        local.head(KEYS.image),
        local.get(KEYS.image),
    ):
        with pytest.raises(ConfigurationError) as error:
            await attempt
        assert_refused_link(error.value, local.root / "2026", outside)
    assert list(outside.iterdir()) == []


async def test_symlinked_file_escape_is_refused_as_configuration(
    local: LocalStorage, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    local.root.mkdir(parents=True)
    (local.root / "link.png").symlink_to(secret)

    for attempt in (local.get("link.png"), local.head("link.png")):
        with pytest.raises(ConfigurationError) as error:
            await attempt
        assert_refused_link(error.value, local.root / "link.png", secret)
    with pytest.raises(ConfigurationError):
        local.location("link.png")


async def test_symlink_inside_root_is_followed(local: LocalStorage) -> None:
    await local.put("real.png", b"png", content_type="image/png")
    (local.root / "alias.png").symlink_to(local.root / "real.png")

    assert await local.get("alias.png") == b"png"


# 4. check()


async def test_check_creates_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a" / "b")
    await storage.check()
    assert storage.root.is_dir()
    assert list(storage.root.iterdir()) == []


async def test_check_names_the_root_entries_that_link_outside_it(tmp_path: Path) -> None:
    """Said before an event meets the link (doctor, a function's start-up); a link that stays
    under the root, or one below the root's own entries, is not looked for here."""
    outside = tmp_path / "other-disk"
    (outside / "2026").mkdir(parents=True)
    (outside / "2027").mkdir()
    storage = LocalStorage(tmp_path / "out")
    (storage.root / "renders").mkdir(parents=True)
    (storage.root / "alias").symlink_to(storage.root / "renders", target_is_directory=True)
    (storage.root / "renders" / "deep").symlink_to(outside, target_is_directory=True)
    await storage.check()

    (storage.root / "2026").symlink_to(outside / "2026", target_is_directory=True)
    with pytest.raises(ConfigurationError) as error:
        await storage.check()
    assert_refused_link(error.value, storage.root / "2026", outside)
    assert error.value.errors == [
        {"field": "storage_url", "message": "a link leads outside the root: '2026'"}
    ]

    (storage.root / "2027").symlink_to(outside / "2027", target_is_directory=True)
    with pytest.raises(ConfigurationError) as error:
        await storage.check()
    assert error.value.message.startswith(
        f"local storage: {str(storage.root / '2026')!r}, {str(storage.root / '2027')!r}"
        " are links that lead outside the storage root"
    )
    assert error.value.errors[0]["message"].endswith("'2026', '2027'")


async def test_a_loop_of_links_is_refused_as_configuration_not_a_500(tmp_path: Path) -> None:
    """``Path.resolve`` raises RuntimeError on a loop (Python 3.11): that was an internal error."""
    storage = LocalStorage(tmp_path / "out")
    storage.root.mkdir(parents=True)
    (storage.root / "2026").symlink_to(storage.root / "2027")
    (storage.root / "2027").symlink_to(storage.root / "2026")
    with pytest.raises(ConfigurationError):
        await storage.put("2026/a.png", b"png", content_type="image/png")
    with pytest.raises(ConfigurationError):
        await storage.check()


async def test_check_fails_when_root_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    storage = LocalStorage(tmp_path / "file" / "output")

    with pytest.raises(DependencyUnavailable) as error:
        await storage.check()

    assert str(storage.root) in error.value.message
    with pytest.raises(DependencyUnavailable):
        await storage.put("a.png", b"png", content_type="image/png")


@pytest.mark.parametrize("root", ["afile", "afile/sub/dir"])
async def test_a_root_that_is_a_file_or_under_one_is_said_to_be_a_file(
    tmp_path: Path, root: str
) -> None:
    """Not mkdir's "File exists" (or "Not a directory"): which path is a file."""
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(DependencyUnavailable) as error:
        await LocalStorage(tmp_path / root).check()
    assert error.value.message == (
        f"local storage: cannot write to {str(tmp_path / root)!r}:"
        f" {str(tmp_path / 'afile')!r} is a file, not a directory"
    )


# 5. A folder that stalls


@contextmanager
def lock_held(folder: Path, seconds: float = 120.0) -> Iterator[None]:
    """Another process holding ``folder``'s create lock, as a writer stuck inside it does (a
    stalled disk under its renames, a process stopped in a debugger), for ``seconds``."""
    script = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""
    folder.mkdir(parents=True, exist_ok=True)
    lock = str(folder / ".create.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", script, lock, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.kill()
        holder.communicate(timeout=30)


async def test_a_folder_whose_lock_is_held_fails_its_writes_retryably_and_delays_no_other(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers of a folder whose lock is never let go give up after the bound, retryably and
    naming the folder; meanwhile a write to another folder is done at once."""
    bound = 2.0
    monkeypatch.setattr(local_module, "LOCK_WAIT", bound)
    stuck_day, other_day = local.root / "2026/11/10", local.root / "2026/11/11"
    # More writers than the loop's default executor has threads (ThreadPoolExecutor's default:
    # min(32, CPUs + 4)), so no thread of it would be left for the other folder.
    stuck = min(32, (os.cpu_count() or 1) + 4) + 1
    with lock_held(stuck_day):
        started = time.monotonic()
        writers = [
            asyncio.ensure_future(
                local.create(f"2026/11/10/e{i}.json", b"{}", content_type="application/json")
            )
            for i in range(stuck)
        ]
        await asyncio.sleep(0.2)  # each is waiting for the lock by now
        other = local.create("2026/11/11/e.json", b"{}", content_type="application/json")
        assert await asyncio.wait_for(other, timeout=30)
        assert not any(writer.done() for writer in writers), "it waited for none of them"
        answers = await asyncio.wait_for(
            asyncio.gather(*writers, return_exceptions=True), timeout=30
        )
        waited = time.monotonic() - started

    assert bound <= waited < bound + 10
    for answer in answers:
        assert isinstance(answer, DependencyUnavailable), answer
        assert answer.retryable and answer.retry_after
        assert answer.message.startswith(
            f"local storage: cannot write to {str(stuck_day)!r}: its lock (.create.lock)"
            f" was not granted within {bound:g}s"
        )
    # Nothing of them is left (their staged copies are gone), and once the lock is let go the
    # folder takes writes again.
    assert files_under(stuck_day) == [".create.lock"]
    assert files_under(other_day) == [".create.lock", "e.json"]
    assert await local.create("2026/11/10/e0.json", b"{}", content_type="application/json")


async def test_a_write_waits_for_a_lock_let_go_within_the_bound(local: LocalStorage) -> None:
    """A lock held a moment (another writer's renames) is waited for, not refused at once."""
    with lock_held(local.root / "2026/05/01", seconds=0.5):
        assert await local.create(KEYS.image, NEW, content_type="image/png")
    assert await local.get(KEYS.image) == NEW


async def test_no_call_needs_a_thread_of_the_loops_default_executor(local: LocalStorage) -> None:
    """The default executor is the whole process's (DNS lookups, other blocking calls): with
    every thread of it held, local storage still answers."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(2))
    release = threading.Event()
    held = [loop.run_in_executor(None, release.wait, 60) for _ in range(2)]
    try:
        await asyncio.wait_for(local.check(), timeout=10)
        put = local.put(KEYS.image, OLD, content_type="image/png", metadata={"v": "1"})
        await asyncio.wait_for(put, timeout=10)
        create = local.create(KEYS.metadata, b"{}", content_type="application/json")
        assert await asyncio.wait_for(create, timeout=10)
        assert await asyncio.wait_for(local.get(KEYS.image), timeout=10) == OLD
        head = await asyncio.wait_for(local.head(KEYS.image), timeout=10)
        assert head is not None and head.metadata == {"v": "1"}
    finally:
        release.set()
        await asyncio.gather(*held)


async def test_with_every_thread_held_that_long_a_waiting_call_fails_retryably(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls that do not return (a hung disk) hold their threads for good: a call past the
    limit waits for one, and fails retryably, as storage unavailable, once every thread has
    been held for the whole wait, rather than wait as long as its caller does."""
    wait = 0.5
    monkeypatch.setattr(local_module, "_POOL", DaemonPool("one", max_threads=1, queue_for=wait))
    await local.put(KEYS.image, OLD, content_type="image/png")
    with lock_held(local.root / "2026/11/10"):
        stuck = asyncio.ensure_future(
            local.create("2026/11/10/e.json", b"{}", content_type="application/json")
        )
        await asyncio.sleep(0.2)  # on the one thread, waiting for the lock (5 s)
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as error:
            await asyncio.wait_for(local.get(KEYS.image), timeout=3)
        assert wait <= time.monotonic() - started < 3
        assert error.value.retryable
        assert error.value.message == (
            f"local storage: cannot use {str(local.root)!r}: no one thread was free for 0.5s:"
            " each of the 1 was busy with one call all that time (calls that do not return:"
            " a disk that stalls)"
        )
        stuck.cancel()


async def test_calls_that_only_wait_for_a_held_lock_make_no_waiting_call_fail(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers of a folder whose lock is held give up within :data:`LOCK_WAIT`, each freeing its
    thread: the calls waiting behind them, for longer than the pool's wait in all, take their
    turn and succeed; only the writers of the locked folder fail."""
    bound = 0.3
    wait = bound * local_module.THREAD_WAIT / local_module.LOCK_WAIT  # as in production
    monkeypatch.setattr(local_module, "LOCK_WAIT", bound)
    pool = DaemonPool("two", max_threads=2, queue_for=wait)
    monkeypatch.setattr(local_module, "_POOL", pool)
    await local.put(KEYS.image, OLD, content_type="image/png")
    with lock_held(local.root / "2026/11/10"):
        started = time.monotonic()
        writers = [
            asyncio.ensure_future(
                local.create(f"2026/11/10/e{i}.json", b"{}", content_type="application/json")
            )
            for i in range(6)
        ]
        read = asyncio.ensure_future(local.get(KEYS.image))
        assert await asyncio.wait_for(read, timeout=30) == OLD
        waited = time.monotonic() - started
        answers = await asyncio.gather(*writers, return_exceptions=True)
    assert waited >= 3 * bound > wait  # three turns of two lock waits each
    for answer in answers:
        assert isinstance(answer, DependencyUnavailable), answer
        assert "its lock (.create.lock) was not granted within 0.3s" in answer.message


async def test_a_burst_past_the_threads_on_a_healthy_disk_waits_its_turn_and_succeeds(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More calls at once than local storage has threads (a sink's 100 concurrent deliveries,
    derive's gather over keys): on a disk that answers, the calls past the limit wait for a
    thread, in turn, and every one succeeds; none is refused as though the disk stalled."""
    burst = local_module.MAX_THREADS * 4 + 44  # 300
    head = LocalStorage._head

    def slow_head(self: LocalStorage, key: str) -> object:
        # A disk that answers in 50 ms: every thread is busy while the rest of the burst is
        # handed over (a few milliseconds), however fast this machine is.
        time.sleep(0.05)
        return head(self, key)

    monkeypatch.setattr(LocalStorage, "_head", slow_head)
    heads = await asyncio.wait_for(
        asyncio.gather(*(local.head(f"burst/{i}.json") for i in range(burst))), timeout=60
    )
    assert heads == [None] * burst
    created = await asyncio.wait_for(
        asyncio.gather(
            *(
                local.create(f"burst/{i}.json", b"{}", content_type="application/json")
                for i in range(burst)
            ),
            return_exceptions=True,
        ),
        timeout=60,
    )
    assert [c for c in created if c is not True] == []
    assert len(files_under(local.root / "burst")) == burst + 1  # and the lock
    assert local_module._POOL.started <= local_module.MAX_THREADS
