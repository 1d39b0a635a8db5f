-- History pages by COALESCE(listed_at, created_at) (_sql.LISTED_KEY), not listed_at alone: a
-- replica still on the code before 0002, during a rolling update, inserts rows without
-- listed_at, so NULL for good (PostgreSQL sorted them first and failed the page they ended;
-- SQLite sorted them last, beyond every cursor). The column stays nullable, so that such an
-- insert keeps working. The indexes are on the expression as the query writes it, or neither
-- database uses them for the order or the cursor.

UPDATE generations SET listed_at = created_at WHERE listed_at IS NULL;
DROP INDEX generations_listed;
DROP INDEX generations_status;
DROP INDEX generations_model;
CREATE INDEX generations_listed ON generations
    ((COALESCE(listed_at, created_at)) DESC, generation_id DESC);
CREATE INDEX generations_status ON generations
    (status, (COALESCE(listed_at, created_at)) DESC, generation_id DESC);
CREATE INDEX generations_model ON generations
    (model, (COALESCE(listed_at, created_at)) DESC, generation_id DESC);
