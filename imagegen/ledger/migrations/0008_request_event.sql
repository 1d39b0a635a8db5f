-- Which generation.requested a generation's row took its request from (its webhook: the first
-- recorded, fold.REQUEST_COLUMNS), by that event's source and id, written by the upsert that
-- took it. A replay from `requested` sends that event. The lowest seq is not always it: on
-- PostgreSQL an event's seq is drawn before the row is locked, so of two requests for one
-- generation recorded at once, the one with the lower seq may reach the row second.
--
-- NULL in rows recorded before this migration (and in those a replica older than it inserts
-- during a rolling update): a replay then takes the request with the lowest seq, as before.

ALTER TABLE generations ADD COLUMN request_source TEXT;
ALTER TABLE generations ADD COLUMN request_id TEXT;
