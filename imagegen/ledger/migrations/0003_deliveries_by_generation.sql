-- A generation's webhook messages, found by its id: a failed message still pending is
-- cancelled when the generation's image is persisted after all.

CREATE INDEX webhook_deliveries_generation ON webhook_deliveries (generation_id, event);
