-- History pages by a key that never changes. created_at moves earlier when an earlier event of
-- a generation arrives late, so a keyset cursor over it could show a generation twice (or skip
-- one); listed_at is the time of the generation's first recorded event, set once.

ALTER TABLE generations ADD COLUMN listed_at TIMESTAMPTZ;
UPDATE generations SET listed_at = created_at;
DROP INDEX generations_created;
DROP INDEX generations_status;
DROP INDEX generations_model;
CREATE INDEX generations_listed ON generations (listed_at DESC, generation_id DESC);
CREATE INDEX generations_status ON generations (status, listed_at DESC, generation_id DESC);
CREATE INDEX generations_model ON generations (model, listed_at DESC, generation_id DESC);
CREATE INDEX generations_created ON generations (created_at);
