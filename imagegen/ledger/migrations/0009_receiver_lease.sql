-- Each webhook receiver (scheme, host and port of its URL: _sql._receiver) is sent one message
-- at a time across every replica sharing the database, not only within each replica: a claim
-- (SqlLedger.claim_deliveries) marks the message it takes as being sent until its lease ends
-- (sending_until), the outcome clears it, and a claim leaves out the receivers that have a
-- message with a mark not yet passed.
--
-- receiver is written when a message is inserted. The rows already there keep NULL: the key
-- is the URL up to the first '/', '?' or '#' after "://", which the two databases share no
-- function to find (PostgreSQL has strpos and regular expressions, SQLite instr). A claim
-- reckons the receiver of such a row from its URL, as it does for every row before this
-- migration, and writes it on the row with its mark. Both columns stay nullable, so a replica
-- of the release before, during a rolling update, keeps inserting and claiming without them.
ALTER TABLE webhook_deliveries ADD COLUMN receiver TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN sending_until TIMESTAMPTZ;
-- The receivers being sent to: only the rows a claim marked and no outcome cleared yet.
CREATE INDEX webhook_deliveries_sending ON webhook_deliveries (receiver, sending_until)
    WHERE sending_until IS NOT NULL;
