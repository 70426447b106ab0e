-- 005_retention.sql — retention in small batches, and autovacuum settings for the hot table.
--
-- Adds what the daemon's retention task (`[retention]` in outboxd.toml) and `outboxd purge` call:
--   * outbox.clear_content(older_than, limit): empties the content of finished messages (submitted,
--     failed, deleted) and of inbox replies older than that, so a password-reset link or a one-time
--     code does not live in the database for as long as the message's metadata does;
--   * outbox.purge_batch(older_than, limit): deletes finished outbox messages with their inbox
--     replies, attempts and history — the batched form of outbox.purge (002), which deletes
--     everything in one transaction;
--   * outbox.retention_preview(content_after, delete_after): what the two would touch now
--     (`outboxd purge --dry-run`).
-- Each call is one short transaction of at most `limit` messages (the daemon loops), and takes a
-- transaction-level advisory lock first: two daemons never purge at the same time, and a call that
-- finds the lock taken returns -1 instead of waiting.
--
-- Rights (see 004): the two writers are SECURITY DEFINER (they run as the owner: the daemon role
-- may not write tables) and executable by outboxd_daemon only; applications get none of them.

BEGIN;

-- As every migration after 004: what this creates belongs to the owner, and is resolved with only
-- the catalog on the path.
SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

-- A message counts as finished for retention from its last state change (updated_at).
CREATE FUNCTION outbox.clear_content(p_older_than interval, p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7310593858634612081) THEN
        RETURN -1;
    END IF;
    WITH doomed AS (
        SELECT d.id FROM outbox.messages d
         WHERE d.content IS NOT NULL
           AND ((d.class = 'outbox' AND d.state IN ('submitted', 'failed', 'deleted')
                 AND d.updated_at < now() - p_older_than)
                OR (d.class = 'inbox' AND d.created_at < now() - p_older_than))
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    ), cleared AS (
        UPDATE outbox.messages m SET content = NULL
          FROM doomed WHERE m.id = doomed.id
        RETURNING 1
    )
    SELECT count(*) INTO v_count FROM cleared;
    RETURN v_count;
END
$$;

CREATE FUNCTION outbox.purge_batch(p_older_than interval, p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7310593858634612081) THEN
        RETURN -1;
    END IF;
    WITH doomed AS (
        SELECT d.id FROM outbox.messages d
         WHERE d.class = 'outbox' AND d.state IN ('submitted', 'failed', 'deleted')
           AND d.updated_at < now() - p_older_than
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    ), family AS (
        SELECT id FROM doomed
        UNION ALL
        SELECT r.id FROM outbox.messages r JOIN doomed d ON r.parent = d.id WHERE r.class = 'inbox'
    ), logs AS (
        DELETE FROM outbox.history h WHERE h.message_id IN (SELECT id FROM family)
    ), tries AS (
        DELETE FROM outbox.attempts t WHERE t.message_id IN (SELECT id FROM family)
    ), gone AS (
        DELETE FROM outbox.messages m WHERE m.id IN (SELECT id FROM family) RETURNING m.class
    )
    SELECT count(*) FILTER (WHERE class = 'outbox') INTO v_count FROM gone;
    RETURN v_count;
END
$$;

CREATE FUNCTION outbox.retention_preview(p_content_after interval, p_delete_after interval,
                                         OUT content_rows bigint, OUT delete_rows bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT (SELECT count(*) FROM outbox.messages d
             WHERE p_content_after IS NOT NULL AND d.content IS NOT NULL
               AND ((d.class = 'outbox' AND d.state IN ('submitted', 'failed', 'deleted')
                     AND d.updated_at < now() - p_content_after)
                    OR (d.class = 'inbox' AND d.created_at < now() - p_content_after))),
           (SELECT count(*) FROM outbox.messages d
             WHERE p_delete_after IS NOT NULL AND d.class = 'outbox'
               AND d.state IN ('submitted', 'failed', 'deleted')
               AND d.updated_at < now() - p_delete_after)
$$;

-- Housekeeping is the daemon's (or an operator's), never an application's.
REVOKE ALL ON FUNCTION outbox.clear_content(interval, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.purge_batch(interval, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.retention_preview(interval, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.clear_content(interval, integer) TO outboxd_daemon;
GRANT EXECUTE ON FUNCTION outbox.purge_batch(interval, integer) TO outboxd_daemon;
GRANT EXECUTE ON FUNCTION outbox.retention_preview(interval, interval) TO outboxd_daemon;

-- Autovacuum for the hot table: every delivery updates its message twice, so dead tuples pile
-- up at the delivery rate. The default scale factor (20 % of the table) lets a large outbox
-- accumulate millions of them before a vacuum, and the claim's index scan then walks dead
-- entries; 1 % (plus 1,000 rows) keeps the due index lean, and a cost limit above the default
-- lets vacuum keep pace with a busy daemon. Inserts trigger vacuum too (PostgreSQL 13+), so the
-- visibility map stays current for index-only counts.
ALTER TABLE outbox.messages SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_limit = 1000
);
-- The logs are insert-only: only inserts and purges create work for vacuum.
ALTER TABLE outbox.attempts SET (autovacuum_vacuum_insert_scale_factor = 0.05);
ALTER TABLE outbox.history SET (autovacuum_vacuum_insert_scale_factor = 0.05);

INSERT INTO outbox.schema_migrations (version, name) VALUES (5, 'retention');

COMMIT;
