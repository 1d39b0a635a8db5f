-- An event is unique by (source, id) through a digest of each, not the values themselves: a
-- B-tree row holds at most 2,704 bytes (PostgreSQL's "index row size ... exceeds btree version
-- 4 maximum 2704"), and an id and a source of 1,024 characters each, which the ledger takes,
-- are up to 8 KiB in UTF-8 (1,024 CJK characters: 3 KiB). Such an event was refused at each
-- redelivery. SQLite limits no index row: its UNIQUE (source, id) stays (hence PostgreSQL's
-- alone). The insert names no conflict target (_statements.INSERT_EVENT), so either unique
-- index is its arbiter.
--
-- convert_to() is STABLE (it looks up a conversion), and an index expression must be
-- IMMUTABLE: the database's encoding, which it converts from, never changes, so the wrapper
-- says so. NUL, the one character a separator could be, PostgreSQL's text cannot hold.

CREATE FUNCTION ledger_digest(value TEXT) RETURNS BYTEA
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT sha256(convert_to(value, 'UTF8')) $$;
CREATE UNIQUE INDEX ledger_events_key ON ledger_events (ledger_digest(source), ledger_digest(id));
ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_source_id;
