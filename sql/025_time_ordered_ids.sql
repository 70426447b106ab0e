-- 025_time_ordered_ids.sql — new messages get time-ordered ids (UUIDv7) and codes (issue 9).
--
-- Why: message ids were random (gen_random_uuid, version 4), so every new message inserted into a
-- random leaf of messages_pkey, queue_pkey, attempts_message_idx and history_message_idx, and its
-- default code into a random leaf of the idempotency index. Once those indexes outgrow
-- shared_buffers, each insert and each claim's join to outbox.messages reads a page from disk
-- (or the OS cache), and every leaf touched for the first time after a checkpoint is a full-page
-- image in the WAL: the claim's p50 grew 1.6–1.7× from 100k to 1M and from 1M to 10M messages.
--
-- Now: outbox.uuid_v7() — RFC 9562 version 7: 48 bits of Unix time in milliseconds, then the
-- version, 74 random bits and the variant — makes the default id of outbox.messages, and the
-- default code (outbox.random_code(), still 64 hex digits as Apostol's codes) starts with one.
-- The two column defaults are the function's expression itself, as 004 did for `code`: a
-- function with a pinned search_path is not inlined (a GUC save and restore per row of a bulk
-- insert), and a default stored parsed needs neither pinning nor a right to execute. Messages made
-- close together sit close together in every index keyed by message id, and the claim, which
-- takes messages roughly in the order they became due, reads the rightmost pages.
--
-- Nothing else changes: ids stay uuid, any uuid an application supplies is still accepted, and
-- existing rows keep their ids. The id reveals when a message was made, to the millisecond; so
-- did created_at to anyone who could read the message.

BEGIN;

-- As every migration after 004: what this creates belongs to the owner, and is resolved with only
-- pg_catalog on the path.
SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

-- A version 4 uuid has the right variant; its first 48 bits become the time, and setting two bits
-- turns version 0100 (4) into 0111 (7).
CREATE FUNCTION outbox.uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT encode(set_bit(set_bit(
               overlay(uuid_send(gen_random_uuid())
                       PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                       FROM 1 FOR 6),
               52, 1), 53, 1), 'hex')::uuid
$$;

COMMENT ON FUNCTION outbox.uuid_v7() IS
    'A version 7 uuid (RFC 9562): Unix milliseconds, then random bits; what new messages get as id';

CREATE OR REPLACE FUNCTION outbox.random_code() RETURNS text
LANGUAGE sql VOLATILE SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT replace(outbox.uuid_v7()::text, '-', '') || replace(gen_random_uuid()::text, '-', '')
$$;

-- outbox.uuid_v7()'s expression, and outbox.random_code()'s (see above for why not the calls).
ALTER TABLE outbox.messages ALTER COLUMN id
    SET DEFAULT encode(set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1), 'hex')::uuid;
ALTER TABLE outbox.messages ALTER COLUMN code
    SET DEFAULT encode(set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1), 'hex')
        || replace(gen_random_uuid()::text, '-', '');

INSERT INTO outbox.schema_migrations (version, name) VALUES (25, 'time_ordered_ids');

COMMIT;
