-- What prune deletes by (SqlLedger.prune): without these, each run reads both tables whole,
-- under the locks its deletes take. (ledger_events.recorded_at has its index since 0001.)

CREATE INDEX generations_updated ON generations (updated_at);
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at);
