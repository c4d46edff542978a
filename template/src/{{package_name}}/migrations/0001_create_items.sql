-- Items of the example API. Migrations are plain SQL applied in file-name order by
-- `<service> migrate`, each in its own transaction; never edit one once applied.
CREATE TABLE items (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    description text        NOT NULL DEFAULT '' CHECK (char_length(description) <= 2000),
    -- Idempotency key of CreateItem: a retried create finds the first item.
    request_id  uuid        UNIQUE,
    -- Bumped on every update; the etag is derived from it.
    version     bigint      NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Keyset pagination of ListItems walks (create_time, id).
CREATE INDEX items_create_time_id_idx ON items (create_time, id);
