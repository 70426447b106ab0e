-- 022_log_partitions.sql — the attempt and history logs as weekly partitions (issue 9: retention
-- drops partitions instead of deleting rows).
--
-- Why: both logs are insert-only and grow with every delivery; retention deleted their rows message
-- by message (an index lookup, a dead tuple and later a vacuum per row). Partitioned by time, an
-- expired week is one DROP TABLE: no dead tuples, no vacuum, no index bloat.
--
--   * `outbox.attempts` is partitioned by `finished_at`, `outbox.history` by `changed_at`, in
--     weeks starting on Monday 00:00 UTC: `outbox.attempts_w20261130` holds
--     [2026-11-30, 2026-12-07). A default partition (`…_default`) takes any row outside the weeks
--     that exist (rows written with an old time, or after the daemon created none for a month):
--     nothing is ever refused.
--   * `outbox.ensure_log_partitions(weeks_ahead)` creates this week's and the next weeks'
--     partitions; `outboxd migrate`, a daemon migrating on start and every retention round call it
--     (4 weeks ahead).
--   * `outbox.drop_log_partitions(older_than)` drops the weeks that ended before now - older_than
--     and deletes the default partition's rows older than that. The retention round calls it with
--     `delete_after`; `outbox.purge_batch` no longer deletes log rows message by message.
--
-- Trade-offs: the logs are kept by age, not by message. A purged message's log rows stay until
-- their week is dropped (at most a week after the message); a message older than `delete_after`
-- that is still alive (created and never sent, or repeated now and then) loses its oldest history
-- and attempt rows. Reading one message's log (api.message_attempt, api.message_history) looks in
-- every week's partition: one index probe per partition kept (14 for the usual 90 days). The
-- primary keys become (id, finished_at) and (id, changed_at): a partitioned table's keys must
-- hold its partition key; id stays unique by its identity sequence.
--
-- Existing rows are copied into the partitions (one INSERT per log, inside this migration's
-- transaction) and the old tables dropped.

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

-- The views read the old tables; they are made again below, unchanged.
DROP VIEW api.message_attempt;
DROP VIEW api.message_history;
DROP VIEW api.task_messages;
DROP TRIGGER attempts_dingtalk_done ON outbox.attempts;

ALTER TABLE outbox.attempts RENAME TO attempts_unpartitioned;
ALTER TABLE outbox.history RENAME TO history_unpartitioned;
ALTER INDEX outbox.attempts_pkey RENAME TO attempts_unpartitioned_pkey;
ALTER INDEX outbox.attempts_message_idx RENAME TO attempts_unpartitioned_message_idx;
ALTER INDEX outbox.history_pkey RENAME TO history_unpartitioned_pkey;
ALTER INDEX outbox.history_message_idx RENAME TO history_unpartitioned_message_idx;
ALTER SEQUENCE outbox.attempts_id_seq RENAME TO attempts_unpartitioned_id_seq;
ALTER SEQUENCE outbox.history_id_seq RENAME TO history_unpartitioned_id_seq;

CREATE TABLE outbox.attempts (
    id                  bigint GENERATED ALWAYS AS IDENTITY,
    message_id          uuid NOT NULL,
    attempt             integer NOT NULL,
    worker              text,
    outcome             text NOT NULL CHECK (outcome IN ('done', 'retry', 'failed', 'interrupted')),
    error_code          text,
    error_text          text,
    remote_status       integer,
    provider_message_id text,
    duration_ms         integer,
    finished_at         timestamptz NOT NULL DEFAULT now(),
    claim_id            uuid,
    profile             text,
    claimed_at          timestamptz,
    to_state            text,
    PRIMARY KEY (id, finished_at)
) PARTITION BY RANGE (finished_at);
CREATE INDEX attempts_message_idx ON outbox.attempts (message_id, attempt);
CREATE TABLE outbox.attempts_default PARTITION OF outbox.attempts DEFAULT;

COMMENT ON TABLE outbox.attempts IS 'One row per delivery attempt; weekly partitions by finished_at (migration 22)';
COMMENT ON COLUMN outbox.attempts.claim_id IS 'The claim this attempt belongs to (NULL before migration 3)';
COMMENT ON COLUMN outbox.attempts.profile IS
    '<kind>/<profile> that made the attempt (a fallback profile when it delivered); NULL before migration 13';
COMMENT ON COLUMN outbox.attempts.claimed_at IS 'When the claim of this attempt took the message; NULL before migration 20';
COMMENT ON COLUMN outbox.attempts.to_state IS
    'The state this recorded outcome moved the message to (its send and outcome transitions are not in outbox.history)';

CREATE TABLE outbox.history (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    message_id  uuid NOT NULL,
    old_state   text,
    new_state   text NOT NULL,
    action      text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    changed_by  text NOT NULL,
    PRIMARY KEY (id, changed_at)
) PARTITION BY RANGE (changed_at);
CREATE INDEX history_message_idx ON outbox.history (message_id, id);
CREATE TABLE outbox.history_default PARTITION OF outbox.history DEFAULT;

COMMENT ON TABLE outbox.history IS 'Logged state changes; weekly partitions by changed_at (migration 22)';

--------------------------------------------------------------------------------------------------
-- Partition upkeep
--------------------------------------------------------------------------------------------------

-- Creates the missing weekly partitions of both logs from p_weeks_back weeks back (the migration
-- below; the daemon passes none) to p_weeks_ahead weeks ahead; returns how many it created. A
-- week whose rows already went to the default partition is left to it (creating the partition
-- would have to move them; the default partition still serves).
CREATE FUNCTION outbox.ensure_log_partitions(p_weeks_ahead integer DEFAULT 4, p_weeks_back integer DEFAULT 0)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_week  timestamp := date_trunc('week', now() AT TIME ZONE 'UTC');
    v_from  timestamp;
    v_log   text;
    v_name  text;
    v_made  integer := 0;
BEGIN
    -- One creator at a time (key space 2: "outb", 22).
    PERFORM pg_advisory_xact_lock(1869968482, 22);
    FOR i IN -greatest(p_weeks_back, 0) .. greatest(p_weeks_ahead, 0) LOOP
        v_from := v_week + make_interval(weeks => i);
        FOREACH v_log IN ARRAY ARRAY['attempts', 'history'] LOOP
            v_name := v_log || '_w' || to_char(v_from, 'YYYYMMDD');
            CONTINUE WHEN to_regclass('outbox.' || v_name) IS NOT NULL;
            BEGIN
                EXECUTE format('CREATE TABLE outbox.%I PARTITION OF outbox.%I FOR VALUES FROM (%L) TO (%L)',
                               v_name, v_log, v_from AT TIME ZONE 'UTC',
                               (v_from + interval '7 days') AT TIME ZONE 'UTC');
                v_made := v_made + 1;
            EXCEPTION WHEN check_violation THEN
                NULL;  -- the default partition holds rows of that week
            END;
        END LOOP;
    END LOOP;
    RETURN v_made;
END
$$;

-- Drops the weekly partitions of both logs that ended before now() - p_older_than, and deletes
-- the rows of the default partitions older than that; returns how many partitions it dropped.
CREATE FUNCTION outbox.drop_log_partitions(p_older_than interval) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_cutoff  timestamptz := now() - p_older_than;
    v_part    record;
    v_dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, 22);
    FOR v_part IN
        SELECT c.relname
          FROM pg_catalog.pg_inherits i
          JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent IN ('outbox.attempts'::regclass, 'outbox.history'::regclass)
           AND c.relname ~ '^(attempts|history)_w[0-9]{8}$'
           AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 7)::timestamp AT TIME ZONE 'UTC' <= v_cutoff
         ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE outbox.%I', v_part.relname);
        v_dropped := v_dropped + 1;
    END LOOP;
    DELETE FROM outbox.attempts_default WHERE finished_at < v_cutoff;
    DELETE FROM outbox.history_default WHERE changed_at < v_cutoff;
    RETURN v_dropped;
END
$$;

-- Weeks for the rows there are (back to the oldest, plus the four ahead), then the rows.
SELECT outbox.ensure_log_partitions(4, ceil(extract(epoch FROM now() - least(
           (SELECT min(finished_at) FROM outbox.attempts_unpartitioned),
           (SELECT min(changed_at) FROM outbox.history_unpartitioned), now())) / (7 * 86400))::integer + 1);

INSERT INTO outbox.attempts (id, message_id, attempt, worker, outcome, error_code, error_text,
                             remote_status, provider_message_id, duration_ms, finished_at,
                             claim_id, profile, claimed_at, to_state)
OVERRIDING SYSTEM VALUE
SELECT id, message_id, attempt, worker, outcome, error_code, error_text, remote_status,
       provider_message_id, duration_ms, finished_at, claim_id, profile, claimed_at, to_state
  FROM outbox.attempts_unpartitioned;
INSERT INTO outbox.history (id, message_id, old_state, new_state, action, changed_at, changed_by)
OVERRIDING SYSTEM VALUE
SELECT id, message_id, old_state, new_state, action, changed_at, changed_by
  FROM outbox.history_unpartitioned;
SELECT setval(pg_get_serial_sequence('outbox.attempts', 'id'),
              greatest((SELECT max(id) FROM outbox.attempts), 1));
SELECT setval(pg_get_serial_sequence('outbox.history', 'id'),
              greatest((SELECT max(id) FROM outbox.history), 1));

DROP TABLE outbox.attempts_unpartitioned;
DROP TABLE outbox.history_unpartitioned;

-- (005's autovacuum settings of the old tables are not carried over: a partitioned table has no
-- storage of its own, and a week's partition, written once and then only read, needs no tuning.)

--------------------------------------------------------------------------------------------------
-- What read or wrote the old tables
--------------------------------------------------------------------------------------------------

-- 013's view.
CREATE VIEW api.message_attempt AS
SELECT t.message_id, t.attempt, t.outcome, t.error_code, t.error_text, t.remote_status,
       t.provider_message_id, t.duration_ms, t.worker, t.finished_at, t.profile
  FROM outbox.attempts t;

-- 020's view.
CREATE VIEW api.message_history AS
SELECT h.message_id, h.old_state, h.new_state, h.action, h.changed_at, h.changed_by
  FROM outbox.history h
UNION ALL
SELECT t.message_id, 'prepared', 'sending', 'send', t.claimed_at, t.worker
  FROM outbox.attempts t
 WHERE t.to_state IS NOT NULL
UNION ALL
SELECT t.message_id, 'sending', t.to_state,
       CASE t.outcome WHEN 'done' THEN 'done' WHEN 'retry' THEN 'retry' ELSE 'fail' END,
       t.finished_at, t.worker
  FROM outbox.attempts t
 WHERE t.to_state IS NOT NULL;

-- 015's view.
CREATE VIEW api.task_messages AS
SELECT tm.run_id, r.task_id, t.name AS task, r.run_no, tm.address, tm.message_id, m.state,
       m.attempts, m.last_error_code AS error_code,
       (SELECT a.error_text FROM outbox.attempts a WHERE a.message_id = m.id
         ORDER BY a.id DESC LIMIT 1)                                             AS error_text,
       m.updated_at, tm.read_token IS NOT NULL AS has_read_link, tm.first_read_at,
       tm.last_read_at, tm.read_count
  FROM outbox.task_messages tm
  JOIN outbox.task_runs r ON r.id = tm.run_id
  JOIN outbox.tasks t ON t.id = r.task_id
  JOIN outbox.messages m ON m.id = tm.message_id;

COMMENT ON VIEW api.task_messages IS 'Each recipient of each task execution: message state, last error, reads';

-- 020's trigger.
CREATE TRIGGER attempts_dingtalk_done AFTER INSERT ON outbox.attempts
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.on_dingtalk_attempt_done();

-- 005's purge, without the log rows: their weeks are dropped instead.
CREATE OR REPLACE FUNCTION outbox.purge_batch(p_older_than interval, p_limit integer) RETURNS integer
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
    ), gone AS (
        DELETE FROM outbox.messages m WHERE m.id IN (SELECT id FROM family) RETURNING m.class
    )
    SELECT count(*) FILTER (WHERE class = 'outbox') INTO v_count FROM gone;
    RETURN v_count;
END
$$;

-- 004's rights, as on the old tables.
GRANT SELECT ON outbox.attempts, outbox.history TO outboxd_daemon;
GRANT SELECT ON api.message_attempt, api.message_history, api.task_messages TO outboxd_app, outboxd_daemon;
REVOKE ALL ON FUNCTION outbox.ensure_log_partitions(integer, integer), outbox.drop_log_partitions(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.ensure_log_partitions(integer, integer), outbox.drop_log_partitions(interval)
    TO outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (22, 'log_partitions');

COMMIT;
