-- Migration 21: the task scheduler sleeps while nothing is due, and is woken by NOTIFY (issue 9,
-- "idle: no queries between polls").
--
-- Before this, every daemon's scheduler looked for due tasks and unfinished executions every
-- tasks.poll_interval (1 s), two transactions each time, even with no task at all: 243
-- transactions in 120 s of an idle daemon (bench/run). Now the scheduler asks once when it has
-- something to do (outbox.task_wakeup) and sleeps until then — at most the daemon's
-- poll_interval, the fallback poll — unless a notification on channel `outbox_tasks` wakes it.
--
-- Adds:
--   * outbox.task_wakeup(): when the scheduler has work next: the earliest next_run_at of a task
--     it schedules; -infinity (now) for a task not planned yet or an execution still enqueuing;
--     NULL when there is nothing. One index probe on each of 015's partial indexes.
--   * NOTIFY outbox_tasks (empty payload, at commit; PostgreSQL sends one per transaction however
--     many rows fire it) from triggers, for the changes that give a scheduler work sooner than it
--     knows of:
--       - a task inserted (api.add_task) or updated so that it needs planning (next_run_at NULL:
--         api.resume_task) or is due earlier than before (a DBA moving next_run_at), when it is
--         enabled, unfinished and not manual;
--       - a manual execution inserted (api.run_task: to fan out now).
--     The scheduler's own writes (outbox.advance_task moves next_run_at later, refuse_task
--     disables, the executions it inserts it fans out itself) do not notify, so a scheduler is not
--     woken by its own work. Triggers instead of new versions of 015's functions: every way of
--     changing a task (the api functions, plain SQL) wakes the scheduler, and 015's function
--     bodies stay where they are.
--
-- A notification is only a wake-up: the daemon LISTENs on `outbox_tasks` on the connection that
-- LISTENs on `outbox`, and re-reads the tables. A missed one (the LISTEN connection was down) is
-- covered by the wake-up after every reconnect and by the poll.

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

-- When the scheduler has work next (see the header). Not SECURITY DEFINER: the daemon reads the
-- tables itself (015 grants it SELECT). STABLE: it only reads.
CREATE FUNCTION outbox.task_wakeup() RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT least(
        -- The predicate and order of tasks_due_idx (015): one index probe.
        (SELECT coalesce(t.next_run_at, '-infinity')
           FROM outbox.tasks t
          WHERE t.enabled AND t.finished_at IS NULL AND t.schedule_kind <> 'manual'
          ORDER BY t.next_run_at NULLS FIRST
          LIMIT 1),
        -- task_runs_enqueuing_idx (015).
        (SELECT '-infinity'::timestamptz
          WHERE EXISTS (SELECT 1 FROM outbox.task_runs r WHERE r.state = 'enqueuing')))
$$;

COMMENT ON FUNCTION outbox.task_wakeup() IS
    'When the task scheduler has work next: -infinity = now, NULL = nothing (migration 21)';

-- The trigger function of the wake-ups; the WHEN clauses of the triggers decide. Not SECURITY
-- DEFINER: pg_notify needs no right.
CREATE FUNCTION outbox.notify_tasks() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('outbox_tasks', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_wake_on_insert
    AFTER INSERT ON outbox.tasks
    FOR EACH ROW
    WHEN (NEW.enabled AND NEW.finished_at IS NULL AND NEW.schedule_kind <> 'manual')
    EXECUTE FUNCTION outbox.notify_tasks();

CREATE TRIGGER tasks_wake_on_update
    AFTER UPDATE ON outbox.tasks
    FOR EACH ROW
    WHEN (NEW.enabled AND NEW.finished_at IS NULL AND NEW.schedule_kind <> 'manual'
          AND (NEW.next_run_at IS NULL OR NEW.next_run_at < OLD.next_run_at))
    EXECUTE FUNCTION outbox.notify_tasks();

CREATE TRIGGER task_runs_wake_on_manual_run
    AFTER INSERT ON outbox.task_runs
    FOR EACH ROW
    WHEN (NEW.trigger = 'manual')
    EXECUTE FUNCTION outbox.notify_tasks();

REVOKE ALL ON FUNCTION outbox.task_wakeup(), outbox.notify_tasks() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.task_wakeup() TO outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (21, 'task_wakeups');

COMMIT;
