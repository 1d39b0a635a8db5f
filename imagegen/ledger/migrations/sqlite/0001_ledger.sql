-- The ledger: every event once (source + id), one row per generation, the webhook outbox.
-- SQLite: times are UTC ISO-8601 text of one fixed width (they sort as they compare), JSON is text.

CREATE TABLE ledger_events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    source        TEXT        NOT NULL,
    id            TEXT        NOT NULL,
    type          TEXT        NOT NULL,
    subject       TEXT,
    generation_id TEXT,
    time          TEXT        NOT NULL,
    recorded_at   TEXT        NOT NULL,
    data          TEXT        NOT NULL,
    CONSTRAINT ledger_events_source_id UNIQUE (source, id)
);
CREATE INDEX ledger_events_generation ON ledger_events (generation_id, time);
CREATE INDEX ledger_events_recorded ON ledger_events (recorded_at);

CREATE TABLE generations (
    generation_id   TEXT        PRIMARY KEY,
    status          TEXT        NOT NULL,
    status_rank     INTEGER     NOT NULL,
    created_at      TEXT        NOT NULL,
    updated_at      TEXT        NOT NULL,
    requested_at    TEXT,
    enhanced_at     TEXT,
    rendered_at     TEXT,
    persisted_at    TEXT,
    failed_at       TEXT,
    failed_stage    TEXT,
    error           TEXT, 
    prompt          TEXT,
    original_prompt TEXT,
    seed            INTEGER,
    model           TEXT,
    width           INTEGER,
    height          INTEGER,
    keys            TEXT, 
    urls            TEXT, 
    url             TEXT,
    location        TEXT,
    sha256          TEXT,
    webhook         TEXT,
    webhook_events  TEXT, 
    replay_of       TEXT
);
-- Keyset pagination, newest first, optionally by status or model.
CREATE INDEX generations_created ON generations (created_at DESC, generation_id DESC);
CREATE INDEX generations_status ON generations (status, created_at DESC, generation_id DESC);
CREATE INDEX generations_model ON generations (model, created_at DESC, generation_id DESC);

CREATE TABLE webhook_deliveries (
    msg_id          TEXT        PRIMARY KEY,
    generation_id   TEXT        NOT NULL,
    event           TEXT        NOT NULL,
    url             TEXT        NOT NULL,
    payload         TEXT        NOT NULL,
    state           TEXT        NOT NULL DEFAULT 'pending',
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TEXT        NOT NULL,
    created_at      TEXT        NOT NULL,
    delivered_at    TEXT,
    last_error      TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
