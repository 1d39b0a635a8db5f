"""The laptop's history: ``generate`` records, ``status``/``history`` read, ``replay`` redoes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from imagegen.auth.api_keys import hash_api_key
from imagegen.cli import main
from tests.fakes.oidc_issuer import Issuer
from tests.functions.conftest import auth_env
from tests.ledger.chain import T0, binary, chain
from tests.test_cli import SMALL

# In this process: the tiny model and torch load once for all of these (the subprocess runs of
# the command line itself are tests/test_cli.py's).


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    def run_(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run_


@pytest.fixture
def as_json(run: Any) -> Any:
    def as_json_(*args: str) -> Any:
        code, out, err = run(*args, "--json")
        assert code == 0, err
        return json.loads(out)

    return as_json_


@pytest.mark.slow
def test_generate_records_and_replay_reproduces_the_same_png(tmp_path: Path, as_json: Any) -> None:
    made = as_json("generate", "a lighthouse at dusk", *SMALL, "--steps", "2")
    original = made["image"]
    gid = original["generation_id"]

    found = as_json("status", gid)
    assert found["status"] == "persisted"
    assert [e["type"].rsplit(".", 1)[-1] for e in found["timeline"]] == [
        "requested",
        "enhanced",
        "rendered",
        "persisted",
        "derived",  # the derivatives, made before the command returns
    ]
    assert found["sha256"] == original["sha256"]

    again = as_json("replay", gid)
    assert again["generation_id"] != gid
    assert again["sha256"] == original["sha256"]
    png = (tmp_path / "output" / again["key"]).read_bytes()
    assert hashlib.sha256(png).hexdigest() == original["sha256"]
    replayed = as_json("status", again["generation_id"])
    assert replayed["replay_of"] == gid

    # From the request: enhanced again (plugins, template), rendered, linked to the original.
    anew = as_json("replay", gid, "--from", "requested")
    status = as_json("status", anew["generation_id"])
    assert status["replay_of"] == gid and status["status"] == "persisted"
    assert status["original_prompt"] == "a lighthouse at dusk"
    # The seed enhance drew for the original (none was asked for) is the replay's: the
    # plugins choose as they did, and the template prompt is the same.
    assert status["seed"] == found["seed"] and status["prompt"] == found["prompt"]

    listed = as_json("history", "--since", "1h")
    assert [g["generation_id"] for g in listed] == [
        anew["generation_id"],
        again["generation_id"],
        gid,
    ]


def test_the_ledger_dates_a_generation_as_its_record_does(tmp_path: Path, as_json: Any) -> None:
    """The request was recorded without its time, so the ledger dated it when it wrote it:
    later than the job's time, which dates the storage keys (near midnight UTC, another day),
    and than the record's ``request.requested_at``."""
    made = as_json("generate", "a kite over the dunes", *SMALL, "--steps", "1")
    image = made["image"]
    record = json.loads((tmp_path / "output" / image["keys"]["metadata"]).read_text())
    requested_at = datetime.fromisoformat(record["request"]["requested_at"])
    found = as_json("status", image["generation_id"])
    assert datetime.fromisoformat(found["requested_at"]) == requested_at
    assert image["key"].startswith(requested_at.astimezone(UTC).strftime("%Y/%m/%d/"))


def _failed_at_enhance(gid: str, model: str) -> None:
    """A generation whose request enhance refused, as a cluster's ledger records it (the
    command line refuses such a request before it records anything): its request, and the
    failure enhance answered it with, in the laptop's ledger."""
    from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED, source_for
    from imagegen.ledger import LedgerEvent, open_ledger

    message = f"invalid GenerationRequest: model ({model!r} is not served here)"
    failed = {
        "generation_id": gid,
        "stage": "enhance",
        "error": {"code": "invalid_request", "message": message, "retryable": False},
        "failed_at": T0.isoformat(),
    }
    request = {"generation_id": gid, "prompt": "x", "model": model}
    ledger = open_ledger(None)
    try:
        for source, type_, data in (
            ("/platform/caller", GENERATION_REQUESTED, request),
            (source_for("enhance"), GENERATION_FAILED, failed),
        ):
            event = LedgerEvent(
                source=source, id=type_, type=type_, subject=gid, time=T0, data=data
            )
            ledger.ingest(event)
    finally:
        ledger.close()


def test_a_failed_generation_is_in_the_history_with_its_stage(run: Any, as_json: Any) -> None:
    _failed_at_enhance("gen-refused", "not-allowed")
    listed = as_json("history", "--status", "failed")
    assert len(listed) == 1
    (row,) = listed
    assert row["failed_stage"] == "enhance" and row["error"]["code"] == "invalid_request"
    assert "model" in row["error"]["message"]
    code, out, _ = run("status", row["generation_id"])
    assert code == 0 and "not-allowed" in out
    assert "seed" not in out, "no seed was drawn: none is shown"
    # Nothing enhanced to replay: the error says what can be.
    code, _, err = run("replay", row["generation_id"])
    assert code == 1 and err.count("\n") == 1
    assert err.endswith(
        "no recorded prompt.enhanced or image.rendered event to replay;"
        " from=requested replays its request\n"
    )
    # Its request, replayed, would only fail again: refused, and no new generation recorded.
    code, _, err = run("replay", row["generation_id"], "--from", "requested")
    assert code == 2 and err.count("\n") == 1 and "model" in err, err
    assert len(as_json("history")) == 1


@pytest.fixture
def in_los_angeles(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process in America/Los_Angeles (``TZ``), as a laptop there is."""
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("in_los_angeles")
def test_times_without_an_offset_are_the_machines_local_times() -> None:
    from imagegen.cli.history import parse_when

    # 17:30 in Los Angeles is 00:30 UTC the next day: "today" is still the local 1 June.
    now = datetime(2026, 6, 2, 0, 30, tzinfo=UTC)
    today = parse_when("today", field="since", now=now)
    assert today == datetime(2026, 6, 1, 7, 0, tzinfo=UTC)
    assert parse_when("2026-06-01", field="since") == datetime(2026, 6, 1, 7, 0, tzinfo=UTC)
    assert parse_when("2026-06-01T12:00", field="since") == datetime(2026, 6, 1, 19, 0, tzinfo=UTC)
    # An offset given is kept. A DST change's day starts at midnight's offset (-07:00 on
    # 1 November, which is -08:00 from 02:00 on), not at the offset of the moment asked.
    assert parse_when("2026-06-01T12:00Z", field="since") == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    winter = parse_when("today", field="since", now=datetime(2026, 11, 1, 20, 0, tzinfo=UTC))
    assert winter == datetime(2026, 11, 1, 7, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("zone", "now", "first"),
    [
        # Clocks go from 00:00 to 01:00 there that day: the day starts at 01:00 -03:00.
        ("America/Santiago", datetime(2026, 9, 6, 12, tzinfo=UTC), datetime(2026, 9, 6, 4)),
        ("America/Havana", datetime(2026, 3, 8, 12, tzinfo=UTC), datetime(2026, 3, 8, 5)),
        # 00:00 twice (01:00 back to 00:00): the first.
        ("America/Havana", datetime(2026, 11, 1, 12, tzinfo=UTC), datetime(2026, 11, 1, 4)),
        ("Asia/Tokyo", datetime(2026, 12, 31, 23, 30, tzinfo=UTC), datetime(2026, 12, 31, 15)),
    ],
)
def test_today_is_the_first_instant_of_the_local_day(
    monkeypatch: pytest.MonkeyPatch, zone: str, now: datetime, first: datetime
) -> None:
    """A midnight the clock skips is no instant of that day: not 23:00 the day before."""
    from imagegen.cli.history import parse_when

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        today = parse_when("today", field="since", now=now)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert today == first.replace(tzinfo=UTC)


@pytest.mark.usefixtures("in_los_angeles")
def test_history_shows_the_local_times_its_options_read(tmp_path: Path, run: Any) -> None:
    """Listed at the local time that --since reads: 12:00 UTC is 05:00 in Los Angeles."""
    path = tmp_path / "l.db"
    _ledger_of_three(path)  # requested at T0, 12:00 UTC
    code, out, err = run("history", "--ledger", str(path), "--since", "2026-06-01T05:00")
    assert code == 0 and "gen-1" in out, err
    assert "06-01 05:00" in out and "12:00" not in out, out
    code, out, _ = run("history", "--ledger", str(path), "--since", "2026-06-01T05:01")
    assert code == 0 and "gen-1" not in out


def test_a_ledger_a_newer_imagegen_migrated_is_read_with_a_warning(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read all the same (as a replica of the release before does), but said on the terminal,
    not only in a log line seen with -v: what this release writes there may fail."""
    import sqlite3
    from contextlib import closing

    from imagegen.ledger._migrate import migrations

    path = tmp_path / "l.db"
    _ledger_of_three(path)
    newest = max(m.version for m in migrations("sqlite"))
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO ledger_migrations (version, name, applied_at) VALUES (?, 'next', ?)",
            (newest + 1, "2027-01-01T00:00:00+00:00"),
        )
    warning = (
        f"ledger {path} was migrated by a newer imagegen (schema {newest + 1:04d}; this one "
        f"knows up to {newest:04d}): upgrade imagegen"
    )
    code, out, err = run("history", "--ledger", str(path))
    assert code == 0 and "gen-1" in out, err
    assert warning in " ".join(err.split()), err
    monkeypatch.setenv("IMAGEGEN_LEDGER_URL", str(path))
    code, out, _ = run("doctor", "--json")
    [row] = [c for c in json.loads(out)["checks"] if c["check"] == "ledger"]
    assert row["status"] == "warning" and warning in row["summary"], row


def test_unknown_ids_and_bad_options_are_one_line_errors(run: Any) -> None:
    code, _, err = run("status", "nope")
    assert (code, err) == (1, "imagegen: error: generation 'nope' is not in the ledger\n")
    code, _, err = run("history", "--since", "yesterday-ish")
    assert code == 2 and err.count("\n") == 1 and "--since" in err
    code, _, err = run("replay", "nope", "--from", "rendered")
    assert code == 2 and "enhanced" in err
    # A ledger that cannot answer is a failure (1), not the command's input (2).
    gid = "0123456789abcdef0123456789abcdef"
    code, _, err = run("status", gid, "--ledger", "http://127.0.0.1:9")
    assert code == 1 and err.count("\n") == 1 and "unreachable" in err
    # A password in the URL is not said.
    code, _, err = run("status", gid, "--ledger", "http://reader:s3cret@127.0.0.1:9")
    assert code == 1 and "unreachable" in err and "s3cret" not in err, err
    assert "http://***@127.0.0.1:9" in err


def test_status_and_history_read_a_served_ledger_over_http(
    ledger_url: str, start_server: Any, as_json: Any, run: Any, issuer: Issuer
) -> None:
    # The ledger function as in its container (gunicorn, a real port), requiring a token: the
    # broker's to record events, a key to read them.
    key = "cli-test-key-0123456789abcdef"
    server = start_server(
        "ledger",
        {"IMAGEGEN_LEDGER_URL": ledger_url, **auth_env(issuer.url, hash_api_key(key))},
    )
    bearer = {"Authorization": f"Bearer {issuer.sign({}, audience='imagegen-ledger')}"}
    for n, gid in enumerate(("gen-1", "gen-2")):
        events = chain(gid, start=T0 + timedelta(minutes=n))
        for name in ("requested", "enhanced", "rendered", "persisted"):
            sent = binary(events[name])
            reply = server.post("/", headers={**sent["headers"], **bearer}, json=sent["json"])
            assert reply.status_code == 202, reply.text

    found = as_json("status", "gen-1", "--ledger", server.url, "--token", key)
    assert found["status"] == "persisted" and found["durations"]["total"] == 6.0
    listed = as_json("history", "--ledger", server.url, "--token", key, "--since", "2026-06-01")
    assert [g["generation_id"] for g in listed] == ["gen-2", "gen-1"]
    code, out, _ = run("history", "--ledger", server.url, "--token", key)
    assert code == 0 and "gen-2" in out and "persisted" in out

    code, _, err = run("status", "nope", "--ledger", server.url, "--token", key)
    assert code == 1 and err.count("\n") == 1 and "nope" in err
    code, _, err = run("status", "gen-1", "--ledger", server.url)  # no key
    assert code != 0 and err.count("\n") == 1 and "401" in err


def test_history_sends_a_served_ledger_times_its_api_takes(
    ledger_url: str, start_server: Any, as_json: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In UTC: a local offset with seconds (Monrovia's -00:44:30 until 1972) is no RFC 3339."""
    server = start_server("ledger", {"IMAGEGEN_LEDGER_URL": ledger_url})
    for name in ("requested", "enhanced"):
        assert server.post("/", **binary(chain("gen-1")[name])).status_code == 202
    monkeypatch.setenv("TZ", "Africa/Monrovia")
    time.tzset()
    try:
        for since in ("1971-06-01", "1971-06-01T00:00", "today", "2h"):
            args = ("history", "--ledger", server.url, "--since", since, "--until", "2999-01-01")
            listed = as_json(*args)
            assert [g["generation_id"] for g in listed] == (["gen-1"] if "1971" in since else [])
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_ledger_a_dotenv_names_is_the_one_every_command_reads(
    tmp_path: Path, run: Any, as_json: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``.env`` is read for every setting (generate records there): status, history and
    ledger export read the same ledger, not the default one beside it."""
    from imagegen.ledger import open_ledger

    monkeypatch.delenv("IMAGEGEN_LEDGER_URL", raising=False)
    path = tmp_path / "from-dotenv.db"
    (tmp_path / ".env").write_text(f"IMAGEGEN_LEDGER_URL={path}\n")
    ledger = open_ledger(str(path))
    try:
        ledger.ingest(chain("gen-dotenv")["requested"])
    finally:
        ledger.close()
    assert as_json("status", "gen-dotenv")["status"] == "requested"
    assert [g["generation_id"] for g in as_json("history")] == ["gen-dotenv"]
    code, out, err = run("ledger", "export")
    assert code == 0 and "gen-dotenv" in out, err
    code, _, err = run("ledger", "export", "--ledger", "http://127.0.0.1:9")
    assert code == 2 and err.count("\n") == 1 and "database" in err


def test_a_dotenv_that_is_not_utf8_is_one_line(tmp_path: Path, run: Any) -> None:
    (tmp_path / ".env").write_bytes(b"IMAGEGEN_MODEL=tiny\n\xff\xfe x\n")
    for args in (("history",), ("doctor",)):
        code, _, err = run(*args)
        assert code == 2 and err.count("\n") == 1 and ".env" in err, (args, err)


@pytest.mark.parametrize(("status", "code"), [(200, 1), (404, 2), (502, 1)])
def test_a_server_that_is_no_ledger_is_one_line(run: Any, status: int, code: int) -> None:
    """An HTML page where the ledger's JSON should be (a proxy, the wrong port): one line
    that names the ledger and the status with its reason, never a traceback or the page."""
    from http.server import BaseHTTPRequestHandler

    from tests.fakes.loopback import LoopbackServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>\n<body>Bad Gateway</body>\n</html>\n"
            self.send_response(status)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with LoopbackServer(Page) as page:
        for args in (("status", "0123456789abcdef0123456789abcdef"), ("history",)):
            got, out, err = run(*args, "--ledger", page.url)
            assert got == code and err.count("\n") == 1, (args, err)
            said = f"ledger {page.url} answered {status} {HTTPStatus(status).phrase}"
            assert said in err and "<html>" not in err and "Traceback" not in out + err


def _ledger_of_three(path: Path) -> None:
    from imagegen.ledger import open_ledger

    ledger = open_ledger(str(path))
    try:
        for gid in ("gen-1", "gen-2", "gen-3"):
            for name in ("requested", "enhanced"):
                ledger.ingest(chain(gid)[name])
    finally:
        ledger.close()


def test_a_libpq_key_value_string_is_refused_not_read_as_a_file(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was taken for a SQLite file's name: ``history`` listed an empty history and exited
    0, as if the database had none."""
    secret = "TopSecretPW1"
    monkeypatch.setenv("IMAGEGEN_LEDGER_URL", f"host=127.0.0.1 port=5432 password={secret}")
    for args in (("history",), ("status", "gen-1"), ("ledger", "export")):
        code, out, err = run(*args)
        assert code == 2 and out == "", (args, out, err)
        assert err.startswith(
            "imagegen: error: invalid settings: IMAGEGEN_LEDGER_URL (a libpq key=value"
            " connection string, beginning host=,"
        ), err
        assert err.count("\n") == 1 and secret not in err
    assert list(tmp_path.iterdir()) == []  # no file of that name made


@pytest.mark.parametrize("path", ["./a=b.db", "a=b.db", "./host=x.db"])
def test_a_sqlite_ledger_whose_name_has_an_equals_sign_is_read(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    _ledger_of_three(tmp_path / path)
    monkeypatch.setenv("IMAGEGEN_LEDGER_URL", path)
    code, out, err = run("history", "--json")
    assert code == 0, err
    assert sorted(g["generation_id"] for g in json.loads(out)) == ["gen-1", "gen-2", "gen-3"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (
            "postgresql://bob:TopSecretPW1@127.0.0.1:9/db?foo=bar",
            "unknown connection parameter 'foo'",
        ),
        (
            "postgresql://bob:TopSecretPW1@127.0.0.1:9/db?sslmod=require",
            "unknown connection parameter 'sslmod'",
        ),
        (
            "postgresql://bob:TopSecretPW1@127.0.0.1:9/db?TopSecretPW1",
            "a query parameter without '=' (?name=value)",
        ),
        # Only a URL whose "%" libpq refuses is told how one is written.
        (
            "postgresql://bob:Top%SecretPW1@127.0.0.1:9/db",
            "a '%' not followed by two hex digits; a '%' in it is written %25",
        ),
        (
            "postgresql://bob:Top%25SecretPW1@127.0.0.1:9/db?sslmod=require",
            "unknown connection parameter 'sslmod'",
        ),
    ],
)
def test_a_postgresql_url_libpq_cannot_read_says_what_libpq_objects_to(
    run: Any, monkeypatch: pytest.MonkeyPatch, url: str, why: str
) -> None:
    """Every such URL was said to have a '%' to write as %25, one with none in it too, and one
    whose '%' is written well."""
    pytest.importorskip("psycopg")
    monkeypatch.setenv("IMAGEGEN_LEDGER_URL", url)
    code, out, err = run("history")
    assert (code, out) == (2, "")
    assert err == f"imagegen: error: the ledger URL is no PostgreSQL connection URL ({why})\n"
    assert "SecretPW1" not in err


@pytest.mark.parametrize(
    ("damage", "column"),
    [
        ("UPDATE generations SET created_at = 'not a time'", "created_at"),
        ("UPDATE generations SET keys = '{not json'", "keys"),
        ("UPDATE generations SET status = 'archived'", "status"),  # a newer version's status
    ],
)
def test_an_unreadable_generation_is_named_and_the_others_listed(
    tmp_path: Path, run: Any, damage: str, column: str
) -> None:
    """A row another program (or a newer version) wrote: ``history`` lists the others and
    names it once; ``status`` of it says what cannot be read. Never a traceback."""
    import sqlite3

    path = tmp_path / "l.db"
    _ledger_of_three(path)
    with sqlite3.connect(path) as db:
        db.execute(f"{damage} WHERE generation_id = 'gen-2'")
    db.close()

    code, out, err = run("history", "--ledger", str(path))
    assert code == 0 and "gen-1" in out and "gen-3" in out and "gen-2" not in out
    assert err == (
        f"imagegen: warning: ledger {path} has unreadable records, not listed: gen-2"
        " (`imagegen status ID` says why)\n"
    )
    code, out, err = run("status", "gen-2", "--ledger", str(path))
    assert (code, out) == (1, "")
    assert err == (
        f"imagegen: error: ledger {path} has an unreadable record (generation gen-2: {column})\n"
    )
    code, _, _ = run("status", "gen-1", "--ledger", str(path))
    assert code == 0


def test_unreadable_events_are_named_and_the_others_exported(tmp_path: Path, run: Any) -> None:
    import sqlite3

    path = tmp_path / "l.db"
    _ledger_of_three(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE ledger_events SET data = '{not json' WHERE generation_id = 'gen-2'")
    db.close()

    code, out, err = run("ledger", "export", "--ledger", str(path))
    assert code == 1 and len(out.splitlines()) == 4 and "gen-2" not in out
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"imagegen: error: ledger {path} has an unreadable record (event ")
    assert err.endswith(": data) and 1 more, not exported (4 events were)\n")


def test_a_damaged_ledger_file_is_one_line(tmp_path: Path, run: Any) -> None:
    """Pages damaged after the header (a disk error, a copy cut short): SQLite opens the file
    and finds the damage only when a statement reads them."""
    import sqlite3

    from imagegen.ledger import open_ledger

    path = tmp_path / "l.db"
    ledger = open_ledger(str(path))
    try:
        for n in range(200):
            for name in ("requested", "enhanced"):
                ledger.ingest(chain(f"gen-{n}")[name])
    finally:
        ledger.close()
    with sqlite3.connect(path) as db:
        size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with path.open("r+b") as file:
        for page in range(10, 60):
            file.seek(page * size)
            file.write(b"\xa5" * size)

    for args in (("history",), ("status", "gen-2"), ("ledger", "export")):
        code, _, err = run(*args, "--ledger", str(path))
        assert code == 1, (args, err)
        assert (
            err
            == f"imagegen: error: ledger {path} is unreadable: database disk image is malformed\n"
        )


@pytest.mark.parametrize(
    ("body", "wrong"),
    [
        ({"status": "ok"}, "generation_id: Field required"),  # a health check's answer
        ([], "Input should be a valid dictionary"),
        ({"items": [{"generation_id": "gen-1", "status": "persisted"}]}, "created_at"),
    ],
)
def test_json_that_is_not_the_ledger_api_is_one_line(run: Any, body: Any, wrong: str) -> None:
    """A 200 with JSON of another shape (another service on that port, another version)."""
    from http.server import BaseHTTPRequestHandler

    from tests.fakes.loopback import LoopbackServer

    class Json(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    with LoopbackServer(Json) as server:
        for args in (("status", "gen-1"), ("history",), ("replay", "gen-1")):
            code, out, err = run(*args, "--ledger", server.url)
            assert (code, out) == (1, ""), (args, err)
            assert err.startswith(
                f"imagegen: error: {server.url} answered 200, but not as the ledger API ("
            )
            assert err.count("\n") == 1, (args, err)
        said = (
            run("history", "--ledger", server.url)[2]
            + run("status", "gen-1", "--ledger", server.url)[2]
        )
        assert wrong in said


def test_the_reading_commands_write_nothing_to_the_ledger(tmp_path: Path, run: Any) -> None:
    """history, status and export only read: an empty file stays empty (it was made a
    database), a ledger's bytes stay as they were; prune, which deletes, opens it to write."""
    empty = tmp_path / "empty.db"
    empty.touch()
    for args in (["history"], ["status", "gen-1"], ["ledger", "export"]):
        code, _, err = run(*args, "--ledger", str(empty))
        assert code in (0, 1) and "Traceback" not in err, err
        assert empty.stat().st_size == 0, args
    code, out, err = run("history", "--ledger", str(empty), "--json")
    assert (code, json.loads(out)) == (0, []), err

    from imagegen.ledger import open_ledger

    path = tmp_path / "ledger.db"
    ledger = open_ledger(str(path))
    try:
        for event in chain("gen-1").values():
            ledger.ingest(event)
    finally:
        ledger.close()
    before = path.read_bytes(), path.stat().st_mtime_ns
    for args in (["history"], ["status", "gen-1"], ["ledger", "export"]):
        code, _, err = run(*args, "--ledger", str(path))
        assert code == 0, err
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before, args
    # Opened to write: read-only, its delete would fail (exit 1).
    code, out, err = run("ledger", "prune", "--days", "1", "--ledger", str(path))
    assert code == 0 and "deleted" in out, err


@pytest.mark.parametrize(
    ("settings", "loras", "field"),
    [
        # A job of a model this machine does not serve.
        ({"IMAGEGEN_SERVED_MODELS": "tiny-klein", "IMAGEGEN_MODEL": "tiny-klein"}, [], "model"),
        # A job with a LoRA not configured here.
        ({}, [{"name": "style", "path": "/elsewhere/style.safetensors"}], "loras"),
    ],
)
def test_a_recorded_job_these_settings_refuse_is_refused_before_it_is_recorded(
    run: Any,
    as_json: Any,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, str],
    loras: list[dict[str, str]],
    field: str,
) -> None:
    """Replayed from ``enhanced``, a job that render refuses here would only fail again, as
    a new failed generation: refused as input (exit 2, one line), nothing recorded."""
    from imagegen.ledger import open_ledger

    events = chain("gen-elsewhere")
    enhanced = events["enhanced"]
    events["enhanced"] = enhanced.model_copy(update={"data": {**enhanced.data, "loras": loras}})
    ledger = open_ledger(None)
    try:
        for name in ("requested", "enhanced"):  # the job replayed: the latest written
            ledger.ingest(events[name])
    finally:
        ledger.close()
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    code, out, err = run("replay", "gen-elsewhere")
    assert (code, out) == (2, ""), err
    assert [g["generation_id"] for g in as_json("history")] == ["gen-elsewhere"]
    assert err.count("\n") == 1 and field in err and "gen-elsewhere" in err, err
    assert not (Path("output").exists() and any(Path("output").rglob("*.png")))


def test_replay_through_the_ledger_function_refuses_an_output(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger function's replay renders on its cluster, into the cluster's storage:
    ``--output`` would be ignored, so it is refused before anything is sent (the port answers
    nothing: a request sent would be exit 1, unreachable)."""
    gid = "0123456789abcdef0123456789abcdef"
    output = tmp_path / "elsewhere"
    for flag in ("--output", "-o"):
        code, out, err = run("replay", gid, "--ledger", "http://127.0.0.1:9", flag, str(output))
        assert (code, out) == (2, ""), err
        assert err.count("\n") == 1 and "--output" in err and "unreachable" not in err, err
    monkeypatch.setenv("IMAGEGEN_LEDGER_URL", "https://127.0.0.1:9")
    code, _, err = run("replay", gid, "-o", str(output))
    assert code == 2 and err.count("\n") == 1 and "--output" in err, err
    assert not output.exists()


def test_a_replay_whose_answer_is_lost_names_the_key_that_retries_it_once(
    ledger_url: str, start_server: Any, run: Any
) -> None:
    """``replay`` through the ledger function sends an Idempotency-Key. An answer that says
    the replay may have been taken (the ledger's 503 once the broker failed to answer: here
    the broker's own 503) names the key in its one line; the command run again with it sends
    the same event (its id and generation, which the stages take once), not a second replay."""
    import re

    from tests.fakes.loopback import broker_ingress

    with broker_ingress(503) as (down, lost), broker_ingress() as (up, taken):
        first = start_server("ledger", {"IMAGEGEN_LEDGER_URL": ledger_url, "K_SINK": down})
        events = chain("gen-k")
        for name in ("requested", "enhanced", "rendered", "persisted"):
            sent = binary(events[name])
            reply = first.post("/", headers=sent["headers"], json=sent["json"])
            assert reply.status_code == 202, reply.text
        code, out, err = run("replay", "gen-k", "--ledger", first.url)
        assert (code, out) == (1, "") and err.count("\n") == 1, err
        assert "503" in err and "may have been accepted" in err, err
        said = re.search(r"`imagegen replay gen-k --idempotency-key (\S+)`", err)
        assert said is not None, err
        first.stop()

        again = start_server("ledger", {"IMAGEGEN_LEDGER_URL": ledger_url, "K_SINK": up})
        code, out, err = run("replay", "gen-k", "--ledger", again.url, "--idempotency-key", said[1])
        assert code == 0, err
        [(lost_headers, lost_data)], [(headers, data)] = lost, taken
        assert headers["ce-id"] == lost_headers["ce-id"] and data == lost_data
        assert out == f"{data['generation_id']}\n"
        code, out, err = run("replay", "gen-k", "--ledger", again.url)  # a new key: a new replay
        assert code == 0 and out != f"{data['generation_id']}\n", err
        assert len({h["ce-id"] for h, _ in taken}) == 2

        code, out, err = run("replay", "gen-k", "--ledger", again.url, "--idempotency-key", "a\tb")
        assert (code, out) == (2, "") and err.count("\n") == 1 and "--idempotency-key" in err
        assert len(taken) == 2  # refused before anything is sent
    code, out, err = run("replay", "gen-k", "--ledger", ledger_url, "--idempotency-key", "k")
    assert (code, out) == (2, "") and "--idempotency-key" in err and "local" in err, err


@contextmanager
def _held_broker() -> Iterator[tuple[str, list[tuple[dict[str, str], Any]], threading.Event]]:
    """A broker ingress on loopback that takes each event (its headers, lower-case, and its
    JSON body kept) and holds its 202 until the event it yields is set: a broker slow to
    answer."""
    from http.server import BaseHTTPRequestHandler

    from tests.fakes.loopback import LoopbackServer

    received: list[tuple[dict[str, str], Any]] = []
    answer = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
            answer.wait(60)
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with LoopbackServer(Handler, name="held-broker") as server:
        try:
            yield server.url, received, answer
        finally:
            answer.set()


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "terminated"),
        (signal.SIGHUP, 129, "hung up"),
    ],
)
def test_a_replay_stopped_while_the_ledger_answers_names_the_key_that_retries_it_once(
    ledger_url: str, start_server: Any, run: Any, tmp_path: Path, signum: int, code: int, said: str
) -> None:
    """Ctrl-C, SIGTERM or SIGHUP while ``replay`` waits for the ledger function's answer (its
    broker slow to take the event): the replay may have been sent, so the one line that says
    the command was stopped names the key that retries it, and the exit status is 128 + the
    signal. Run again with that key, it sends the same event, not a second replay."""
    import re

    from tests.conftest import isolated_environ

    with _held_broker() as (broker, received, answer):
        server = start_server("ledger", {"IMAGEGEN_LEDGER_URL": ledger_url, "K_SINK": broker})
        events = chain("gen-s")
        for name in ("requested", "enhanced", "rendered", "persisted"):
            sent = binary(events[name])
            reply = server.post("/", headers=sent["headers"], json=sent["json"])
            assert reply.status_code == 202, reply.text
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagegen.cli", "replay", "gen-s", "--ledger", server.url],
            cwd=tmp_path,
            env=isolated_environ(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not received:  # the ledger has sent the replay: its answer is awaited
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the replay never reached the broker"
                time.sleep(0.05)
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert (proc.returncode, out) == (code, ""), err
        assert err.count("\n") == 1 and err.startswith(f"imagegen: error: {said}; "), err
        assert "may have been accepted" in err, err
        key = re.search(r"`imagegen replay gen-s --idempotency-key (\S+)`", err)
        assert key is not None, err

        answer.set()
        again = run("replay", "gen-s", "--ledger", server.url, "--idempotency-key", key[1])
        assert again[0] == 0, again[2]
        (first, data), (retried, retried_data) = received
        assert retried["ce-id"] == first["ce-id"]  # the same replay, sent again, not a second
        assert retried_data == data
        assert again[1] == f"{data['generation_id']}\n"


def test_history_names_the_cursor_of_the_next_page_and_lists_it(
    ledger_url: str, start_server: Any, run: Any
) -> None:
    """A page with more after it says so on stderr, one line naming ``--cursor``; the JSON on
    stdout stays the list of the page. Given that cursor, the next page; the last says nothing
    more. Alike from the database and from the ledger function."""
    import re

    server = start_server("ledger", {"IMAGEGEN_LEDGER_URL": ledger_url})
    for n, gid in enumerate(("gen-1", "gen-2", "gen-3")):
        events = chain(gid, start=T0 + timedelta(minutes=n))
        for name in ("requested", "enhanced"):
            sent = binary(events[name])
            reply = server.post("/", headers=sent["headers"], json=sent["json"])
            assert reply.status_code == 202, reply.text

    for where in (ledger_url, server.url):
        for mode in ((), ("--json",)):
            code, out, err = run("history", "--ledger", where, "--limit", "2", *mode)
            assert code == 0 and err.count("\n") == 1, err
            said = re.fullmatch(r"imagegen: more: --cursor (\S+)\n", err)
            assert said is not None, err
            if mode:
                assert [g["generation_id"] for g in json.loads(out)] == ["gen-3", "gen-2"]
            else:
                assert "gen-2" in out and "gen-1" not in out and "--cursor" not in out
            page = ("history", "--ledger", where, "--limit", "2", "--cursor", said[1], *mode)
            code, out, err = run(*page)
            assert (code, err) == (0, ""), err
            if mode:
                assert [g["generation_id"] for g in json.loads(out)] == ["gen-1"]
            else:
                assert "gen-1" in out and "gen-2" not in out
        code, out, err = run("history", "--ledger", where, "--cursor", "not-a-cursor")
        assert code == 2 and out == "" and err.count("\n") == 1 and "cursor" in err, err


def test_export_keeps_the_model_attribute_render_triggers_route_on(
    tmp_path: Path, run: Any
) -> None:
    """An exported ``prompt.enhanced`` names its model in ``imagegenmodel``, as enhance sent it:
    the prod render Trigger filters on it, and the line sent again would reach no render
    without it. The other events carry no such attribute, as none was sent with them."""
    from imagegen.events import MODEL_ATTRIBUTE, PROMPT_ENHANCED

    path = tmp_path / "l.db"
    _ledger_of_three(path)
    code, out, err = run("ledger", "export", "--ledger", str(path))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    enhanced = [line for line in lines if line["type"] == PROMPT_ENHANCED]
    assert len(enhanced) == 3 and len(lines) == 6
    for line in enhanced:
        assert line[MODEL_ATTRIBUTE] == line["data"]["model"] == "tiny"
    assert not any(MODEL_ATTRIBUTE in line for line in lines if line["type"] != PROMPT_ENHANCED)


@contextmanager
def _write_lock_held(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``path``'s write lock (``BEGIN IMMEDIATE``, as a long
    ``imagegen ledger prune`` does) until its stdin is closed, or the block ends."""
    from imagegen.ledger import open_ledger

    open_ledger(str(path)).close()  # made and migrated: opening it again takes no lock
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    try:
        yield holder
    finally:
        if holder.stdin:
            holder.stdin.close()
        holder.wait(timeout=30)


@pytest.fixture
def locked_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A ledger file another process holds the write lock of until the test ends; the CLI's
    ledger."""
    path = tmp_path / "l.db"
    with _write_lock_held(path):
        monkeypatch.setenv("IMAGEGEN_LEDGER_URL", str(path))
        yield path


@pytest.mark.slow
def test_a_generations_history_a_busy_ledger_held_up_is_written_at_its_end(
    tmp_path: Path, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the ledger's write lock past the short wait, then lets it go:
    the events the image did not wait for are written once it is made, and its history is
    whole, not stopped where the lock was met."""
    import logging

    from imagegen.events import GENERATION_REQUESTED, IMAGE_DERIVED
    from imagegen.ledger import open_ledger

    path = tmp_path / "l.db"
    monkeypatch.setenv("IMAGEGEN_LEDGER_URL", str(path))

    with _write_lock_held(path) as holder:

        class Release(logging.Handler):
            """Lets the lock go once the short wait for it has run out (a ~2.5 s hold)."""

            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("could not record") and holder.stdin:
                    holder.stdin.close()
                    holder.stdin = None
                    holder.wait(timeout=30)

        logger = logging.getLogger("imagegen.ledger")
        release = Release()
        logger.addHandler(release)
        try:
            code, out, err = run("generate", "a kite", *SMALL, "--steps", "2", "--json")
        finally:
            logger.removeHandler(release)

    assert code == 0, err
    gid = json.loads(out)["image"]["generation_id"]
    assert f"the history of generation {gid} is not recorded" in err
    assert "the rest is written once the image is made" in err
    ledger = open_ledger(str(path))
    try:
        found = ledger.get(gid)
    finally:
        ledger.close()
    assert found is not None and found.status == "persisted", found
    types = [entry.type for entry in found.timeline]
    assert types[0] == GENERATION_REQUESTED and types[-1] == IMAGE_DERIVED, types


@pytest.mark.slow
def test_a_ledger_locked_by_another_process_holds_the_image_up_once(
    locked_ledger: Path, run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Its first write waits a short while (not the ledger function's 30 s), and the rest of
    that generation's history is not waited for while the image is made: it is tried once
    more at the end, with the ledger's usual wait; the lock still held then, the warnings say
    none of it is recorded, as none is."""
    from imagegen.ledger import open_ledger

    started = time.monotonic()
    code, out, err = run("generate", "a kite", *SMALL, "--steps", "2", "--json")
    took = time.monotonic() - started

    assert code == 0, err
    gid = json.loads(out)["image"]["generation_id"]
    tried = [r for r in caplog.records if r.getMessage().startswith("could not record")]
    # Its request, then what was kept, at the end; nothing tried between.
    assert len(tried) == 2, [r.getMessage() for r in tried]
    assert took < 60, took  # two writes that waited the ledger function's 30 s: more
    said = [line for line in err.splitlines() if line.startswith("warning:")]
    assert said == [
        f"warning: the history of generation {gid} is not recorded: ledger {locked_ledger} is"
        " locked by another process; the rest is written once the image is made",
        f"warning: the history of generation {gid} is not recorded: ledger {locked_ledger} is"
        " locked by another process",
    ]
    ledger = open_ledger(str(locked_ledger))
    try:
        assert ledger.get(gid) is None
    finally:
        ledger.close()
