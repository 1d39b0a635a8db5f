-- The event's `time` attribute as received, for export (SqlLedger.export_jsonl): the `time`
-- column holds the stage's time (fold.py), often another event's, or the ledger's clock where
-- the event had none. NULL: the event carried none. An event recorded before this migration
-- kept no attribute: it is exported with the time it was exported with until now.

ALTER TABLE ledger_events ADD COLUMN time_attribute TIMESTAMPTZ;
UPDATE ledger_events SET time_attribute = time;
