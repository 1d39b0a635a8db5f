"""The ledger's rules, on both backends: once per event, status only forward, queries."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from imagegen.errors import InvalidRequest
from imagegen.events import IMAGE_DERIVED, reply_id, source_for
from imagegen.ledger import Ledger, LedgerEvent, open_ledger
from imagegen.ledger._migrate import CREATE_TABLE, migrations, statements
from imagegen.ledger._sql import AFTER, HISTORY_PAGE
from imagegen.ledger._statements import PRUNE, UPSERT_GENERATION, upsert_params
from imagegen.ledger.fold import Change
from imagegen.ledger.models import Status
from imagegen.models import derive_generation_id
from tests.ledger.chain import T0, chain


def test_a_generation_moves_through_its_stages_with_a_timeline(ledger: Ledger) -> None:
    events = chain("gen-1")
    for name in ("requested", "enhanced", "rendered", "persisted"):
        result = ledger.ingest(events[name])
        assert result.status == name and not result.duplicate

    found = ledger.get("gen-1")
    assert found is not None
    assert found.status == "persisted"
    assert found.prompt == "a red fox, oil painting"
    assert found.original_prompt == "a red fox"
    assert (found.seed, found.model, found.width) == (42, "tiny", 256)
    assert found.keys["thumbnail"].endswith(".thumb.png")
    assert found.url == "https://images.example/2026/06/01/gen-1.png"
    assert found.requested_at == T0
    assert found.persisted_at == T0 + timedelta(seconds=6)
    assert [e.type.rsplit(".", 1)[-1] for e in found.timeline] == [
        "requested",
        "enhanced",
        "rendered",
        "persisted",
    ]
    assert [e.seconds_since_previous for e in found.timeline] == [None, 1.0, 3.0, 2.0]
    assert found.durations == {"enhance": 1.0, "render": 3.0, "persist": 2.0, "total": 6.0}


def test_a_redelivered_event_is_recorded_once(ledger: Ledger) -> None:
    event = chain("gen-1")["requested"]
    assert not ledger.ingest(event).duplicate
    again = ledger.ingest(event)
    assert again.duplicate and again.generation_id == "gen-1"
    assert len(ledger.generation_events("gen-1")) == 1


def test_events_out_of_order_never_move_the_status_backwards(ledger: Ledger) -> None:
    events = chain("gen-1")
    for name in ("rendered", "requested", "persisted", "enhanced"):
        ledger.ingest(events[name])
    found = ledger.get("gen-1")
    assert found is not None
    assert found.status == "persisted"
    # The late request still says when the generation started; the first times are kept.
    assert found.requested_at == T0 and found.created_at == T0
    assert found.enhanced_at == T0 + timedelta(seconds=1)
    assert len(found.timeline) == 4


@pytest.mark.parametrize("name", ["enhanced", "rendered"])
def test_a_stages_event_alone_records_what_its_job_says(ledger: Ledger, name: str) -> None:
    """Delivered at least once and in any order: the request's event may come late or never
    (a dead letter), and the job each later stage carries says the request's prompt too."""
    ledger.ingest(chain("gen-1")[name])
    found = ledger.get("gen-1")
    assert found is not None and found.status == name
    assert (found.prompt, found.original_prompt) == ("a red fox, oil painting", "a red fox")
    assert (found.seed, found.model, found.width, found.height) == (42, "tiny", 256, 256)


def test_derivatives_prove_the_image_persisted_and_change_nothing_it_said(
    ledger: Ledger,
) -> None:
    events = chain("gen-1")
    persisted = events["persisted"]
    key = persisted.data["key"]
    derived = LedgerEvent(
        source=source_for("derive"),
        id=reply_id("gen-1", IMAGE_DERIVED),
        type=IMAGE_DERIVED,
        subject="gen-1",
        time=persisted.time,  # both carry the image's created_at
        data={
            "generation_id": "gen-1",
            "key": key,
            "sha256": persisted.data["sha256"],
            "keys": {"record": key.replace(".png", ".derivatives.json"), "avif:256": "x.avif"},
            "created_at": persisted.data["created_at"],
        },
    )
    for name in ("requested", "enhanced", "rendered"):
        ledger.ingest(events[name])
    # The broker delivers the two independently: the derivatives may be recorded first.
    assert ledger.ingest(derived).status == "persisted"
    ledger.ingest(persisted)
    found = ledger.get("gen-1")
    assert found is not None
    assert found.status == "persisted" and found.persisted_at == persisted.time
    assert found.url == "https://images.example/2026/06/01/gen-1.png"
    assert "avif:256" not in found.keys and found.keys["image"] == key
    assert [e.type.rsplit(".", 1)[-1] for e in found.timeline][-2:] == ["derived", "persisted"]
    assert ledger.ingest(derived).duplicate


def test_events_of_one_time_are_in_the_timeline_in_the_chains_order(ledger: Ledger) -> None:
    """image.derived carries its image's persisted_at, as image.persisted does: recorded first,
    it still follows the image.persisted it is made from, whichever the order recorded."""
    events = chain("gen-1")
    persisted = events["persisted"]
    derived = LedgerEvent(
        source=source_for("derive"),
        id=reply_id("gen-1", IMAGE_DERIVED),
        type=IMAGE_DERIVED,
        subject="gen-1",
        time=persisted.time,
        data={
            "generation_id": "gen-1",
            "key": persisted.data["key"],
            "sha256": persisted.data["sha256"],
            "keys": {"record": "gen-1.derivatives.json"},
            "created_at": persisted.data["created_at"],
            "persisted_at": persisted.data["persisted_at"],
        },
    )
    for event in (events["requested"], events["enhanced"], events["rendered"], derived):
        ledger.ingest(event)
    ledger.ingest(persisted)
    found = ledger.get("gen-1")
    assert found is not None
    kinds = [e.type.rsplit(".", 1)[-1] for e in found.timeline]
    assert kinds == ["requested", "enhanced", "rendered", "persisted", "derived"]
    assert found.timeline[-1].time == found.timeline[-2].time == found.persisted_at
    assert found.timeline[-1].seconds_since_previous == 0.0


def test_a_replay_is_known_from_its_persisted_event_and_later_events_keep_it(
    ledger: Ledger,
) -> None:
    events = chain("gen-2")
    persisted = events["persisted"]
    replayed = persisted.model_copy(update={"data": {**persisted.data, "replay_of": "gen-1"}})
    ledger.ingest(replayed)  # the first event the ledger hears of this generation
    found = ledger.get("gen-2")
    assert found is not None and found.replay_of == "gen-1"
    for name in ("requested", "enhanced", "rendered"):  # late, and saying no replay
        ledger.ingest(events[name])
    found = ledger.get("gen-2")
    assert found is not None and found.replay_of == "gen-1" and found.status == "persisted"
    ledger.ingest(chain("gen-3")["persisted"])
    plain = ledger.get("gen-3")
    assert plain is not None and plain.replay_of is None


def test_a_failure_keeps_its_stage_and_error_and_is_not_undone_by_late_progress(
    ledger: Ledger,
) -> None:
    events = chain("gen-1", start=datetime.now(UTC) - timedelta(seconds=5))
    ledger.ingest(events["requested"])
    assert ledger.ingest(events["failed"]).status == "failed"
    assert ledger.ingest(events["rendered"]).status == "failed"
    found = ledger.get("gen-1")
    assert found is not None
    assert found.failed_stage == "render"
    assert found.error is not None and found.error.message == "out of memory"
    # The failure's event carries its request's time; it failed when it was first recorded.
    assert 5.0 <= found.durations["total"] < 65.0
    # A stored image outranks a failure report: the generation did succeed.
    assert ledger.ingest(events["persisted"]).status == "persisted"


def test_a_request_without_an_id_gets_the_one_enhance_derives(ledger: Ledger) -> None:
    event = LedgerEvent(
        source="/cron/dream", id="ping-1", type=chain("x")["requested"].type, data={}
    )
    result = ledger.ingest(event)
    assert result.generation_id == derive_generation_id("/cron/dream", "ping-1")
    assert ledger.get(result.generation_id) is not None


def test_an_invalid_request_is_recorded_and_fails_with_enhances_failure(ledger: Ledger) -> None:
    # enhance answers it with generation.failed under the same id: one generation, both events.
    events = chain("gen-bad")
    request = events["requested"].model_copy(update={"data": {"width": 5}})
    assert ledger.ingest(request).generation_id == "gen-bad"  # named by the subject
    assert ledger.ingest(events["failed"]).status == "failed"
    found = ledger.get("gen-bad")
    assert found is not None and found.status == "failed" and found.original_prompt is None
    assert [e.type for e in found.timeline] == [request.type, events["failed"].type]


def test_a_failure_under_a_subject_no_generation_has_is_kept_under_none(ledger: Ledger) -> None:
    failed = chain("gen-x")["failed"]
    unnamed = failed.model_copy(
        update={"subject": "../x", "data": {**failed.data, "generation_id": None}}
    )
    result = ledger.ingest(unnamed)
    assert result.generation_id is None and not result.duplicate
    assert [e.generation_id for e in ledger.events()] == [None]
    assert ledger.history().items == []


def test_bad_events_are_refused_naming_the_field(ledger: Ledger) -> None:
    with pytest.raises(InvalidRequest) as caught:
        ledger.ingest(LedgerEvent(source="/x", id="1", type="com.example.other", data={}))
    assert caught.value.fields == ["type"]
    bad = chain("gen-1")["enhanced"].model_copy(update={"data": {"generation_id": "gen-1"}})
    with pytest.raises(InvalidRequest) as caught:
        ledger.ingest(bad)
    assert "prompt" in caught.value.fields
    assert ledger.get("gen-1") is None


def test_history_is_newest_first_with_filters_and_keyset_pages(ledger: Ledger) -> None:
    for n in range(7):
        events = chain(
            f"gen-{n}", start=T0 + timedelta(minutes=n), model="big" if n % 2 else "tiny"
        )
        ledger.ingest(events["requested"])
        if n % 3 == 0:
            ledger.ingest(events["persisted"])

    seen, cursor = [], None
    while True:
        page = ledger.history(limit=3, cursor=cursor)
        seen += [g.generation_id for g in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [f"gen-{n}" for n in range(6, -1, -1)]

    persisted = ledger.history(status="persisted")
    assert [g.generation_id for g in persisted.items] == ["gen-6", "gen-3", "gen-0"]
    assert [g.generation_id for g in ledger.history(model="big").items] == [
        "gen-5",
        "gen-3",
        "gen-1",
    ]
    window = ledger.history(since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=4))
    assert [g.generation_id for g in window.items] == ["gen-3", "gen-2"]


def _cursor(*position: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(position)).encode()).decode()


@pytest.mark.parametrize(
    ("limit", "cursor", "field"),
    [
        (0, None, "limit"),
        (10, "bogus!", "cursor"),
        (10, _cursor("2026-01-01T00:00:00", "\udfff"), "cursor"),  # SQLite cannot bind it
        (10, _cursor("2026-01-01T00:00:00", 7), "cursor"),
        (10, _cursor("2026-01-01T00:00:00", "../x"), "cursor"),
    ],
    ids=["limit", "not-base64", "lone-surrogate", "id-of-no-string", "no-generation-id"],
)
def test_bad_queries_name_the_field(ledger: Ledger, limit: int, cursor: str, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        ledger.history(limit=limit, cursor=cursor)
    assert caught.value.fields == [field]


def test_events_export_as_cloudevents_json_lines(ledger: Ledger) -> None:
    events = chain("gen-1")
    for name in ("requested", "enhanced"):
        ledger.ingest(events[name])
    out = io.StringIO()
    assert ledger.export_jsonl(out) == 2
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["source"], x["id"], x["type"]) for x in lines] == [
        (events[n].source, events[n].id, events[n].type) for n in ("requested", "enhanced")
    ]
    assert lines[1]["data"]["prompt"] == "a red fox, oil painting"
    assert lines[0]["specversion"] == "1.0" and lines[0]["recordedat"]


def test_retention_prunes_what_is_older_than_the_setting(ledger: Ledger) -> None:
    ledger.ingest(chain("gen-1")["requested"])
    assert ledger.prune(timedelta(days=1)) == {"events": 0, "generations": 0, "deliveries": 0}
    assert ledger.prune(timedelta(seconds=-1)) == {"events": 1, "generations": 1, "deliveries": 0}
    assert ledger.get("gen-1") is None


def test_migrations_run_once_and_reopening_keeps_the_rows(ledger_url: str) -> None:
    first = open_ledger(ledger_url)
    first.ingest(chain("gen-1")["requested"])
    first.close()
    second = open_ledger(ledger_url)
    try:
        assert second.get("gen-1") is not None
        with second.transaction() as db:
            rows = db.query("SELECT version, name FROM ledger_migrations", {})
        assert rows == [
            {"version": 1, "name": "ledger"},
            {"version": 2, "name": "listed_at"},
            {"version": 3, "name": "deliveries_by_generation"},
            {"version": 4, "name": "prune_indexes"},
            {"version": 5, "name": "listed_key"},
            # PostgreSQL's alone (0006_event_key.postgres.sql): SQLite records it, runs nothing.
            {"version": 6, "name": "event_key"},
            {"version": 7, "name": "time_attribute"},
            {"version": 8, "name": "request_event"},
            {"version": 9, "name": "receiver_lease"},
            {"version": 10, "name": "received_data"},
        ]
    finally:
        second.close()


def test_a_ledger_a_newer_release_migrated_opens_with_a_warning_naming_both_versions(
    ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not refused: a replica of the release before keeps running through a rolling update or
    a rollback (docs/ledger.md); but what it may then fail to write is said at open."""
    first = open_ledger(ledger_url)
    highest = max(m.version for m in migrations(first.dialect))
    with first.transaction() as db:
        db.run(
            "INSERT INTO ledger_migrations (version, name, applied_at) VALUES (:v, 'next', :at)",
            {"v": highest + 1, "at": "2027-01-01T00:00:00+00:00"},
        )
    first.close()
    caplog.clear()
    second = open_ledger(ledger_url)
    try:
        assert second.get("gen-none") is None
    finally:
        second.close()
    [warning] = [r for r in caplog.records if "newer than this release" in r.getMessage()]
    assert warning.levelname == "WARNING"
    assert f"migration {highest + 1:04d}" in warning.getMessage()
    assert f"knows ({highest:04d})" in warning.getMessage()


def test_an_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        open_ledger("mysql://db/ledger")
    assert caught.value.fields == ["ledger_url"]


def test_a_late_earlier_event_moves_no_generation_to_another_page(ledger: Ledger) -> None:
    for n in range(4):
        events = chain(f"gen-{n}", start=T0 + timedelta(minutes=n))
        ledger.ingest(events["requested"])
        ledger.ingest(events["persisted"])
    # gen-x's image is recorded first; its request, 6 s earlier, arrives between two pages.
    late = chain("gen-x", start=T0 + timedelta(minutes=2, seconds=50))
    ledger.ingest(late["persisted"])
    first = ledger.history(limit=2)
    ledger.ingest(late["requested"])
    seen = [g.generation_id for g in first.items]
    cursor = first.next_cursor
    while cursor:
        page = ledger.history(limit=2, cursor=cursor)
        seen += [g.generation_id for g in page.items]
        cursor = page.next_cursor
    assert sorted(seen) == ["gen-0", "gen-1", "gen-2", "gen-3", "gen-x"]
    found = ledger.get("gen-x")
    assert found is not None and found.created_at == T0 + timedelta(minutes=2, seconds=50)


def test_a_ledger_made_before_listed_at_pages_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    # The ledger as migration 0001 left it, with rows.
    first = migrations("sqlite")[0]
    with sqlite3.connect(path) as conn:
        conn.execute(CREATE_TABLE)
        for statement in statements(first.sql):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO ledger_migrations VALUES (1, 'ledger', '2026-01-01T00:00:00+00:00')"
        )
        for n in range(3):
            at = f"2026-06-01T00:0{n}:00.000000Z"
            conn.execute(
                "INSERT INTO generations (generation_id, status, status_rank, created_at, "
                "updated_at) VALUES (?, 'requested', 0, ?, ?)",
                (f"gen-{n}", at, at),
            )
    ledger = open_ledger(f"sqlite:///{path}")
    try:
        page = ledger.history(limit=2)
        rest = ledger.history(limit=2, cursor=page.next_cursor)
        ids = [g.generation_id for g in (*page.items, *rest.items)]
        assert ids == ["gen-2", "gen-1", "gen-0"]
    finally:
        ledger.close()


def test_a_request_id_reused_for_another_generation_writes_nothing_of_it(ledger: Ledger) -> None:
    """A caller sending a second request under its first one's source and id: to the ledger
    that is the first event again, so the second generation gets no row and no webhook."""
    first = chain("gen-one")["requested"]
    ledger.ingest(first)
    second = chain("gen-two", webhook="https://hooks.example/x")["requested"]
    result = ledger.ingest(second.model_copy(update={"id": first.id, "subject": None}))
    assert result.duplicate and result.status is None
    assert ledger.get("gen-two") is None
    assert ledger.delivery_states("gen-two") == {}
    kept = ledger.get("gen-one")
    assert kept is not None and kept.status == "requested" and len(kept.timeline) == 1


def _webhook(ledger: Ledger, gid: str) -> tuple[str | None, list[str] | None]:
    """Where ``gid``'s webhook messages go, and which, as its row keeps them."""
    with ledger.transaction() as db:
        [row] = db.query(
            "SELECT webhook, webhook_events FROM generations WHERE generation_id = :gid",
            {"gid": gid},
        )
    return row["webhook"], row["webhook_events"]


def _another_request(gid: str, webhook: str) -> LedgerEvent:
    """A second ``generation.requested`` naming ``gid``: another source and id, a webhook."""
    event = chain(gid, webhook=webhook, webhook_events=["completed"])["requested"]
    return event.model_copy(update={"source": "/elsewhere", "id": f"again-{gid}"})


def test_only_the_first_request_of_a_generation_says_where_its_webhooks_go(
    ledger: Ledger,
) -> None:
    """A second request naming a generation may not name a webhook the first left out (it
    would be sent that generation's prompt and image URLs, signed by the ledger), nor change
    the one the first named."""
    events = chain("gen-quiet")
    ledger.ingest(events["requested"])
    second = ledger.ingest(_another_request("gen-quiet", "https://hooks.example/other"))
    assert not second.duplicate and second.generation_id == "gen-quiet"
    for name in ("enhanced", "rendered", "persisted"):
        ledger.ingest(events[name])
    assert _webhook(ledger, "gen-quiet") == (None, None)
    assert ledger.delivery_states("gen-quiet") == {}

    ledger.ingest(chain("gen-told", webhook="https://hooks.example/mine")["requested"])
    ledger.ingest(_another_request("gen-told", "https://hooks.example/other"))
    assert _webhook(ledger, "gen-told") == (
        "https://hooks.example/mine",
        ["started", "completed", "failed"],
    )


def test_a_request_recorded_after_its_enhanced_event_still_names_the_webhook(
    ledger: Ledger,
) -> None:
    events = chain("gen-late", webhook="https://hooks.example/mine", webhook_events=["started"])
    ledger.ingest(events["enhanced"])  # overtook its request: the row is made without it
    assert _webhook(ledger, "gen-late") == (None, None)
    ledger.ingest(events["requested"])
    assert _webhook(ledger, "gen-late") == ("https://hooks.example/mine", ["started"])
    assert ledger.delivery_states("gen-late")["started"]["state"] == "pending"
    ledger.ingest(_another_request("gen-late", "https://hooks.example/other"))
    assert _webhook(ledger, "gen-late") == ("https://hooks.example/mine", ["started"])


def test_the_upsert_takes_a_webhook_from_a_request_only(ledger: Ledger) -> None:
    """The upsert's own rule, whatever the fold hands it: of the changes to an existing row,
    only the one recording its first request (it sets ``requested_at``) names the webhook."""
    hook = {"webhook": "https://hooks.example/other", "webhook_events": ["completed"]}

    def upsert(status: Status, fields: dict[str, Any]) -> None:
        with ledger.transaction() as db:
            db.query(UPSERT_GENERATION, upsert_params(Change("gen-sql", status, T0, fields), T0))

    upsert("enhanced", {})  # the row, made before its request
    upsert("rendered", hook)
    assert _webhook(ledger, "gen-sql") == (None, None)
    upsert("requested", {})
    upsert("persisted", hook)
    assert _webhook(ledger, "gen-sql") == (None, None)


def _insert_as_before_listed_at(ledger: Ledger, gid: str, at: datetime) -> None:
    """A row as a replica older than migration 0002 inserts it (a rolling update): no
    listed_at. (Still accepted: that replica must keep working until it is replaced.)"""
    with ledger.transaction() as db:
        db.run(
            "INSERT INTO generations (generation_id, status, status_rank, created_at, "
            "updated_at, requested_at) VALUES (:gid, 'requested', 0, :at, :at, :at)",
            {"gid": gid, "at": at},
        )


def _pages(ledger: Ledger, limit: int, cursor: str | None = None, **filters: Any) -> list[str]:
    """The ids of every page from ``cursor`` on, in order."""
    seen: list[str] = []
    while True:
        page = ledger.history(limit=limit, cursor=cursor, **filters)
        seen += [g.generation_id for g in page.items]
        if not (cursor := page.next_cursor):
            return seen


def test_rows_without_listed_at_are_each_on_one_page_in_order(ledger: Ledger) -> None:
    for n in range(6):
        at = T0 + timedelta(minutes=n)
        if n % 2:
            _insert_as_before_listed_at(ledger, f"gen-{n}", at)
        else:
            ledger.ingest(chain(f"gen-{n}", start=at)["requested"])
    newest_first = [f"gen-{n}" for n in range(5, -1, -1)]
    for limit in (1, 2, 4):  # each such row ends a page, begins one, is inside one
        assert _pages(ledger, limit) == newest_first
    assert _pages(ledger, 1, status="requested") == newest_first


def test_a_row_without_listed_at_keeps_its_place_when_its_next_event_arrives(
    ledger: Ledger,
) -> None:
    _insert_as_before_listed_at(ledger, "gen-0", T0)
    for n in (1, 2, 3):
        ledger.ingest(chain(f"gen-{n}", start=T0 + timedelta(minutes=n))["requested"])
    first = ledger.history(limit=2)
    # gen-0's prompt, enhanced long after, is recorded between two pages.
    ledger.ingest(chain("gen-0", start=T0 + timedelta(minutes=10))["enhanced"])
    rest = _pages(ledger, 2, cursor=first.next_cursor)
    assert [g.generation_id for g in first.items] + rest == ["gen-3", "gen-2", "gen-1", "gen-0"]


def _plan(ledger: Ledger, sql: str, params: dict[str, Any]) -> str:
    """How the database would run ``sql``: PostgreSQL's EXPLAIN, SQLite's query plan."""
    with ledger.transaction() as db:
        if ledger.dialect == "postgres":
            # An empty table is cheapest read whole: asked not to, it says what it could use.
            db.run("SET LOCAL enable_seqscan = off", {})
            return "\n".join(row["QUERY PLAN"] for row in db.query(f"EXPLAIN {sql}", params))
        return "\n".join(row["detail"] for row in db.query(f"EXPLAIN QUERY PLAN {sql}", params))


@pytest.mark.parametrize(
    ("sql", "index"),
    [
        (PRUNE["events"], "ledger_events_recorded"),
        (PRUNE["generations"], "generations_updated"),
        (PRUNE["deliveries"], "webhook_deliveries_created"),
        (HISTORY_PAGE.format(where=AFTER), "generations_listed"),
        (HISTORY_PAGE.format(where=f"status = :status AND {AFTER}"), "generations_status"),
        (HISTORY_PAGE.format(where=f"model = :model AND {AFTER}"), "generations_model"),
    ],
    ids=["prune-events", "prune-generations", "prune-deliveries", "page", "status", "model"],
)
def test_prune_and_history_pages_seek_an_index(ledger: Ledger, sql: str, index: str) -> None:
    """Each seeks its rows in an index (a page in its order, no sort), never reads the table."""
    params = {"before": T0, "after_at": T0, "after_id": "gen-1", "limit": 3}
    plan = _plan(ledger, sql, {**params, "status": "persisted", "model": "tiny"})
    if ledger.dialect == "postgres":
        assert index in plan and "Index Cond" in plan and "Sort" not in plan, plan
    else:
        assert f"USING INDEX {index} (" in plan and "B-TREE" not in plan, plan
        assert plan.startswith("SEARCH"), plan


def test_a_replayed_request_keeps_its_seed_and_time_and_notifies_no_one(ledger: Ledger) -> None:
    """The request replayed: its original time and the seed enhance drew for it (the plugins
    choose alike), under a new id linked back; the caller's webhook is not called for an
    operator's replay."""
    from imagegen.ledger.replay import replay_request

    events = chain("gen-replayed", webhook="https://hooks.example/x")
    for name in ("requested", "enhanced"):
        ledger.ingest(events[name])
    original = ledger.get("gen-replayed")
    assert original is not None and original.seed is not None
    request = replay_request(ledger, "gen-replayed", new_id="gen-again")
    assert (request.generation_id, request.replay_of) == ("gen-again", "gen-replayed")
    assert request.seed == original.seed and request.requested_at == original.requested_at
    assert request.webhook is None


def test_a_replay_from_requested_sends_the_request_the_generation_took(ledger: Ledger) -> None:
    """Another generation.requested naming the same generation (another source and id), later
    in time, says nothing of where its messages go (fold.REQUEST_COLUMNS): the first recorded
    is the generation's request, and the one replayed, not the latest by a caller-chosen time."""
    from imagegen.ledger.replay import replay_request

    events = chain("gen-first", webhook="https://hooks.example/x")
    ledger.ingest(events["requested"])
    first = events["requested"]
    other = LedgerEvent(
        source="/someone/else",
        id="other-1",
        type=first.type,
        subject="gen-first",
        time=T0 + timedelta(minutes=5),
        data={"generation_id": "gen-first", "prompt": "something else", "model": "tiny"},
    )
    ledger.ingest(other)
    ledger.ingest(events["enhanced"])
    assert replay_request(ledger, "gen-first").prompt == "a red fox"


def _retried_request(gid: str, **data: Any) -> LedgerEvent:
    """A second ``generation.requested`` naming ``gid`` (another source and id), with ``data``."""
    first = chain(gid)["requested"]
    return first.model_copy(
        update={"source": "/retry", "id": f"retry-{gid}", "data": {**first.data, **data}}
    )


def test_a_second_request_changes_nothing_the_first_said(ledger: Ledger) -> None:
    """Status, history and its model filter describe the request that replay sends and whose
    webhook the row took: the first recorded, not a later one under another source and id.
    What the stages say afterwards (the enhanced job, the image) still applies."""
    from imagegen.ledger.replay import replay_request

    events = chain("gen-asked")
    ledger.ingest(events["requested"])  # "a red fox", model tiny, the default size, no seed
    ledger.ingest(
        _retried_request(
            "gen-asked",
            prompt="a blue whale",
            model="other",
            width=768,
            height=512,
            seed=7,
            replay_of="gen-elsewhere",
        )
    )

    found = ledger.get("gen-asked")
    assert found is not None and found.status == "requested"
    said = (found.original_prompt, found.model, found.width, found.height, found.seed)
    assert said == ("a red fox", "tiny", 1024, 1024, None)
    assert found.replay_of is None
    assert [g.generation_id for g in ledger.history(model="tiny").items] == ["gen-asked"]
    assert ledger.history(model="other").items == []
    request = replay_request(ledger, "gen-asked")
    assert (request.prompt, request.model) == (found.original_prompt, found.model)

    ledger.ingest(events["enhanced"])  # the job enhance made: its prompt, size and seed
    found = ledger.get("gen-asked")
    assert found is not None
    assert (found.prompt, found.width, found.height, found.seed) == (
        "a red fox, oil painting",
        256,
        256,
        42,
    )
    ledger.ingest(_retried_request("gen-asked", prompt="a blue whale", model="other"))
    found = ledger.get("gen-asked")
    assert found is not None and found.prompt == "a red fox, oil painting"
    assert (found.original_prompt, found.model) == ("a red fox", "tiny")


def _request_row(ledger: Ledger, gid: str) -> dict[str, Any]:
    """The generation's webhook and the request it names (REQUEST_EVENT_COLUMNS)."""
    with ledger.statement() as db:
        [row] = db.query(
            "SELECT webhook, request_source, request_id FROM generations "
            "WHERE generation_id = :gid",
            {"gid": gid},
        )
    return row


def test_a_valid_request_after_an_invalid_one_is_the_generations_request(
    ledger: Ledger,
) -> None:
    """An invalid request (enhance fails it) says nothing of the image: the first valid request
    recorded after it, under another source and id, is the generation's request. Status,
    history and its model filter show it and replay sends it; a later one changes nothing.
    The messages still go where the first request said: its caller was told it started."""
    from imagegen.ledger.replay import replay_request

    events = chain("gen-again", webhook="https://hooks.example/first")
    invalid = events["requested"].model_copy(
        update={"data": {**events["requested"].data, "width": "wide"}}
    )
    ledger.ingest(invalid)
    refused = events["failed"].model_copy(
        update={
            "source": source_for("enhance"),
            "data": {**events["failed"].data, "stage": "enhance"},
        }
    )
    ledger.ingest(refused)
    retried = _retried_request(
        "gen-again", webhook="https://hooks.example/retry", seed=7, replay_of="gen-before"
    )
    ledger.ingest(retried)

    found = ledger.get("gen-again")
    assert found is not None and found.status == "failed"
    said = (found.original_prompt, found.model, found.width, found.height, found.seed)
    assert said == ("a red fox", "tiny", 1024, 1024, 7)
    assert found.replay_of == "gen-before"
    assert [g.generation_id for g in ledger.history(model="tiny").items] == ["gen-again"]
    request = replay_request(ledger, "gen-again")
    assert (request.prompt, request.width, request.seed) == ("a red fox", 1024, 7)
    assert _request_row(ledger, "gen-again") == {
        "webhook": "https://hooks.example/first",
        "request_source": retried.source,
        "request_id": retried.id,
    }

    ledger.ingest(
        _retried_request("gen-again", prompt="a blue whale", model="other", width=512).model_copy(
            update={"id": "retry-again"}
        )
    )
    found = ledger.get("gen-again")
    assert found is not None
    assert (found.original_prompt, found.model, found.width) == ("a red fox", "tiny", 1024)
    assert _request_row(ledger, "gen-again")["request_id"] == retried.id
    assert replay_request(ledger, "gen-again").prompt == "a red fox"


def test_a_replay_from_requested_passes_over_an_invalid_request_for_a_valid_one(
    ledger: Ledger,
) -> None:
    """The row names the invalid request it recorded first where a valid request's job
    described the image before that request was recorded: replay still sends the valid one.
    With none valid, the invalid one is what replay finds (a 409 naming its fields)."""
    from imagegen.ledger.replay import NotReplayable, replay_request

    events = chain("gen-late")
    invalid = events["requested"].model_copy(
        update={"data": {**events["requested"].data, "width": "wide"}}
    )
    ledger.ingest(invalid)
    with pytest.raises(NotReplayable) as caught:
        replay_request(ledger, "gen-late")
    assert [e["field"] for e in caught.value.errors] == ["width"]
    ledger.ingest(events["enhanced"])  # the valid request's job, ahead of the request itself
    ledger.ingest(_retried_request("gen-late", seed=7))
    assert _request_row(ledger, "gen-late")["request_id"] == invalid.id
    request = replay_request(ledger, "gen-late")
    assert (request.prompt, request.width, request.seed) == ("a red fox", 1024, 7)


def test_a_request_recorded_after_its_enhanced_event_fills_in_what_it_left_out(
    ledger: Ledger,
) -> None:
    """The first request recorded after the row was made (its prompt.enhanced overtook it)
    fills in only what the row lacks; a second request after it, nothing."""
    events = chain("gen-overtaken")
    ledger.ingest(events["enhanced"])
    ledger.ingest(
        events["requested"].model_copy(
            update={
                "data": {
                    **events["requested"].data,
                    "prompt": "a red fox",
                    "replay_of": "gen-before",
                }
            }
        )
    )
    ledger.ingest(_retried_request("gen-overtaken", prompt="a blue whale", replay_of="gen-x"))
    found = ledger.get("gen-overtaken")
    assert found is not None and found.status == "enhanced"
    assert (found.prompt, found.original_prompt) == ("a red fox, oil painting", "a red fox")
    assert found.replay_of == "gen-before"


def test_each_stage_time_is_when_its_stage_did_its_work(ledger: Ledger) -> None:
    """image.rendered's time is its data's rendered_at, a request's its data's requested_at
    (as enhance takes it), whatever time attribute their events carry, or none."""
    events = chain("gen-timed")
    untimed = {
        name: events[name].model_copy(update={"time": None}) for name in ("requested", "rendered")
    }
    untimed["requested"] = untimed["requested"].model_copy(
        update={"data": {**events["requested"].data, "requested_at": T0.isoformat()}}
    )
    for name in ("requested", "enhanced", "rendered", "persisted"):
        ledger.ingest(untimed.get(name, events[name]))
    found = ledger.get("gen-timed")
    assert found is not None
    assert (found.requested_at, found.rendered_at) == (T0, T0 + timedelta(seconds=4))
    assert found.durations == {"enhance": 1.0, "render": 3.0, "persist": 2.0, "total": 6.0}


def test_a_request_dated_ahead_of_the_clock_is_listed_when_it_came(ledger: Ledger) -> None:
    """Enhance refuses it (imagegen.identity.not_ahead): dated 2999, it would head the history."""
    ledger.ingest(chain("gen-now")["requested"])
    ahead = datetime(2999, 12, 31, 23, 0, tzinfo=UTC)
    requested = chain("gen-ahead")["requested"]
    for gid, update in (
        ("gen-ahead-time", {"time": ahead}),
        ("gen-ahead-data", {"requested_at": ahead.isoformat()}),
    ):
        data = {**requested.data, "generation_id": gid}
        if "requested_at" in update:
            data["requested_at"] = update["requested_at"]
        event = requested.model_copy(
            update={"id": gid, "subject": gid, "data": data, "time": update.get("time")}
        )
        before = datetime.now(UTC)
        ledger.ingest(event)
        found = ledger.get(gid)
        assert found is not None
        assert before - timedelta(seconds=1) <= found.requested_at <= datetime.now(UTC), gid
    newest = ledger.history(limit=3).items
    assert all(g.requested_at.year < 2999 for g in newest)


def test_times_are_answered_in_utc_whatever_the_sessions_time_zone(ledger_url: str) -> None:
    """PostgreSQL answers a timestamptz in the session's TimeZone (the server's default, or a
    URL's options): the ledger answers UTC, as SQLite does, in the API, pages and webhooks."""
    if ledger_url.startswith("postgresql"):
        ledger_url = ledger_url.replace("options=", "options=-cTimeZone%3DAsia/Kolkata%20", 1)
    ledger = open_ledger(ledger_url)
    try:
        ledger.ingest(chain("gen-utc", webhook="https://hooks.example/x")["requested"])
        found = ledger.get("gen-utc")
        assert found is not None
        listed = ledger.history(limit=1).items[0]
        [message] = ledger.claim_deliveries(lease=60)
        sent = json.loads(message.payload)["data"]
        for at in (found.created_at, found.updated_at, found.timeline[0].time, listed.created_at):
            assert at.utcoffset() == timedelta(0), at
        assert sent["created_at"] == "2026-06-01T12:00:00Z"
    finally:
        ledger.close()


def test_an_export_carries_each_events_time_attribute_as_received(ledger: Ledger) -> None:
    """The ledger keeps a stage's time for its timeline (often another event's, or its own
    clock where the event had none); an export gives the attribute the event came with, and
    none where it came with none."""
    events = chain("gen-sent")
    untimed = events["requested"].model_copy(update={"time": None})
    for event in (untimed, events["enhanced"], events["failed"]):
        ledger.ingest(event)
    out = io.StringIO()
    ledger.export_jsonl(out)
    lines = {json.loads(line)["type"]: json.loads(line) for line in out.getvalue().splitlines()}
    assert "time" not in lines[untimed.type]
    for name in ("enhanced", "failed"):
        event = events[name]
        assert datetime.fromisoformat(lines[event.type]["time"]) == event.time


def test_a_row_recorded_before_migration_0008_replays_its_first_recorded_request(
    ledger: Ledger,
) -> None:
    """Rows without the request that took them (recorded before 0008, or by a replica older
    than it during a rolling update) replay the request recorded first, as before."""
    from imagegen.ledger.replay import replay_request

    events = chain("gen-old")
    ledger.ingest(events["requested"])
    other = _another_request("gen-old", "https://hooks.example/other")
    ledger.ingest(other.model_copy(update={"data": {**other.data, "prompt": "another"}}))
    with ledger.transaction() as db:
        changed = db.run(
            "UPDATE generations SET request_source = NULL, request_id = NULL "
            "WHERE generation_id = :gid AND request_id = :id",
            {"gid": "gen-old", "id": events["requested"].id},
        )
    assert changed == 1  # the row named the request recorded first
    assert replay_request(ledger, "gen-old").prompt == "a red fox"
