-- The ledger: every event once (source + id), one row per generation, the webhook outbox.

CREATE TABLE ledger_events (
    seq           BIGSERIAL PRIMARY KEY,
    source        TEXT        NOT NULL,
    id            TEXT        NOT NULL,
    type          TEXT        NOT NULL,
    subject       TEXT,
    generation_id TEXT,
    time          TIMESTAMPTZ NOT NULL,
    recorded_at   TIMESTAMPTZ NOT NULL,
    data          JSONB       NOT NULL,
    CONSTRAINT ledger_events_source_id UNIQUE (source, id)
);
CREATE INDEX ledger_events_generation ON ledger_events (generation_id, time);
CREATE INDEX ledger_events_recorded ON ledger_events (recorded_at);

CREATE TABLE generations (
    generation_id   TEXT        PRIMARY KEY,
    status          TEXT        NOT NULL,
    status_rank     SMALLINT    NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    requested_at    TIMESTAMPTZ,
    enhanced_at     TIMESTAMPTZ,
    rendered_at     TIMESTAMPTZ,
    persisted_at    TIMESTAMPTZ,
    failed_at       TIMESTAMPTZ,
    failed_stage    TEXT,
    error           JSONB,
    prompt          TEXT,
    original_prompt TEXT,
    seed            BIGINT,
    model           TEXT,
    width           INTEGER,
    height          INTEGER,
    keys            JSONB,
    urls            JSONB,
    url             TEXT,
    location        TEXT,
    sha256          TEXT,
    webhook         TEXT,
    webhook_events  JSONB,
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
    next_attempt_at TIMESTAMPTZ NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    delivered_at    TIMESTAMPTZ,
    last_error      TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
