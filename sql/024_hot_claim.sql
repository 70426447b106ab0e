-- 024_hot_claim.sql — the claim's update of a queue row is a HOT update (issue 9).
--
-- Why: after 023 the claim still cost two index insertions per message. It set `leased` and
-- moved `due_at` to the lease end, and both are in the queue's indexes (queue_due_idx is on
-- due_at WHERE NOT leased, queue_lease_idx on due_at WHERE leased), so every claimed row's new
-- version got new entries in queue_pkey and queue_lease_idx: ~150 B of WAL and a b-tree descent
-- each, and again at the outcome.
--
-- Now:
--   * `due_at` is when the message became (or becomes) due, whether it is leased or not; the
--     lease end has its own column, `lease_until`, read only while `leased`. The claim sets
--     leased, lease_until, attempts, lease_owner, claim_id and claimed_at — none indexed — so,
--     with room on the page (fillfactor 35: the claimed version is wider than the queued one and
--     a claim updates whole pages at once), PostgreSQL writes the new version next to the old one
--     and no index changes.
--   * One index orders the queue for the claim, `queue_order_idx (priority DESC, due_at)`, over
--     leased rows too: the claim walks past the leases in flight (they sit at its head, a heap
--     probe each) and filters them out.
--   * No index finds expired leases any more. The claim finds them on its walk instead: a leased
--     row keeps its place in claim order, so a lease that expired is met before any message that
--     became due after it. The claim hands it back exactly as outbox.reclaim_expired did (an
--     interrupted attempt, the history of the lease, the 5th time a failure) and claims it again
--     in the same call. outbox.reclaim_expired stays for operators and tests, a scan of the whole
--     queue; the daemon calls it once at start only.
--
-- Trade-offs: the queue takes about 2.5× the pages of 023's (fillfactor 35); an expired lease
-- behind a backlog of messages due before it waits for them (as it would as a prepared message);
-- outbox.reclaim_expired reads the whole queue.
--
-- Existing data: leased rows get their lease end in lease_until (due_at keeps it: a due time in
-- the past once the lease has expired). The new fillfactor applies to pages written from now on.

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

--------------------------------------------------------------------------------------------------
-- The queue
--------------------------------------------------------------------------------------------------

ALTER TABLE outbox.queue ADD COLUMN lease_until timestamptz;
ALTER TABLE outbox.queue SET (fillfactor = 35);
COMMENT ON TABLE outbox.queue IS
    'The outbox messages in prepared or sending (leased until lease_until), due since (or at) due_at, with their delivery state';
COMMENT ON COLUMN outbox.queue.lease_until IS 'While leased: when the lease ends (else left as it was, unread)';
COMMENT ON COLUMN outbox.queue.due_at IS 'When the message became or becomes due (leased or not): its place in claim order';

UPDATE outbox.queue SET lease_until = due_at WHERE leased;

DROP INDEX outbox.queue_due_idx;
DROP INDEX outbox.queue_lease_idx;
-- The claim walks this one, leases in flight included (a partial index on NOT leased would
-- change with every claim).
CREATE INDEX queue_order_idx ON outbox.queue (priority DESC, due_at);

--------------------------------------------------------------------------------------------------
-- The state users see: the lease end from lease_until
--------------------------------------------------------------------------------------------------

-- As in 023.
CREATE OR REPLACE VIEW outbox.live_messages AS
SELECT m.id, m.class, m.parent, m.agent_id, m.code, m.profile, m.address, m.subject, m.content,
       CASE WHEN d.outcome = 'done' THEN coalesce(m.label, d.provider_message_id) ELSE m.label END AS label,
       m.description,
       coalesce(d.state, m.state) AS state,
       m.priority, m.send_at,
       coalesce(d.next_attempt_at, m.next_attempt_at) AS next_attempt_at,
       coalesce(d.attempts, m.attempts) AS attempts,
       m.max_attempts,
       CASE WHEN d.state IS NULL THEN m.lease_owner ELSE d.lease_owner END AS lease_owner,
       CASE WHEN d.state IS NULL THEN m.lease_expires_at ELSE d.lease_expires_at END AS lease_expires_at,
       m.created_at,
       greatest(m.updated_at, d.changed_at) AS updated_at,
       CASE WHEN d.state IS NULL THEN m.last_error_code ELSE d.last_error_code END AS last_error_code,
       coalesce(d.provider_message_id, m.provider_message_id) AS provider_message_id,
       CASE WHEN d.state IS NULL THEN m.claim_id ELSE d.claim_id END AS claim_id,
       m.rate_slot_at, m.rate_bucket,
       coalesce(d.claimed_at, m.claimed_at) AS claimed_at
  FROM outbox.messages m
  LEFT JOIN LATERAL (
        -- The daemon's part of a message whose stored state is prepared or sending: its queue
        -- row, else its newest recorded outcome.
        (SELECT CASE WHEN q.leased THEN 'sending' ELSE 'prepared' END AS state, q.attempts,
                q.lease_owner, CASE WHEN q.leased THEN q.lease_until END AS lease_expires_at,
                q.claim_id, q.claimed_at, CASE WHEN NOT q.leased THEN q.due_at END AS next_attempt_at,
                q.last_error_code, NULL::text AS provider_message_id, NULL::text AS outcome,
                q.claimed_at AS changed_at
           FROM outbox.queue q
          WHERE m.class = 'outbox' AND m.state IN ('prepared', 'sending') AND q.message_id = m.id)
        UNION ALL
        (SELECT t.to_state, t.attempt, NULL::text, NULL::timestamptz, t.claim_id, t.claimed_at,
                NULL::timestamptz, t.error_code, t.provider_message_id, t.outcome, t.finished_at
           FROM outbox.attempts t
          WHERE m.class = 'outbox' AND m.state IN ('prepared', 'sending') AND t.message_id = m.id
            AND t.to_state IS NOT NULL
          ORDER BY t.finished_at DESC
          LIMIT 1)
        LIMIT 1
  ) d ON true;


--------------------------------------------------------------------------------------------------
-- Public writes: the lease end goes to lease_until
--------------------------------------------------------------------------------------------------

-- As in 023; a message entering sending (a DBA's UPDATE) is due now, leased until its
-- lease_expires_at, and a lease_expires_at a statement changes goes to lease_until.
CREATE OR REPLACE FUNCTION outbox.on_messages_update() RETURNS trigger
LANGUAGE plpgsql SET enable_nestloop = off SET jit = off SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_action text := nullif(current_setting('outbox.action', true), '');
    v_actor  text := outbox.actor();
    v_bad    uuid;
    v_old    text;
    v_new    text;
    v_count  bigint;
    v_ids    uuid[];
BEGIN
    IF current_setting('outbox.hot', true) = 'on' THEN
        RETURN NULL;
    END IF;

    WITH was AS (
        SELECT n.*, coalesce(d.state, o.state) AS old_state,
               CASE WHEN n.state = o.state AND v_action IS NULL THEN coalesce(d.state, o.state)
                    ELSE n.state END AS new_state,
               coalesce(d.queued, false) AS was_queued, d.claimed_at AS claim_at,
               d.lease_owner AS claim_owner,
               o.priority AS old_priority, o.next_attempt_at AS old_next_attempt_at,
               o.lease_expires_at AS old_lease_expires_at, o.lease_owner AS old_lease_owner,
               o.claim_id AS old_claim_id
          FROM old_rows o
          JOIN new_rows n USING (id)
          LEFT JOIN LATERAL (
                -- as in outbox.live_messages, for the row before the change
                (SELECT CASE WHEN q.leased THEN 'sending' ELSE 'prepared' END AS state,
                        q.claimed_at, q.lease_owner, true AS queued
                   FROM outbox.queue q
                  WHERE o.class = 'outbox' AND o.state IN ('prepared', 'sending') AND q.message_id = o.id)
                UNION ALL
                (SELECT t.to_state, NULL::timestamptz, NULL::text, false
                   FROM outbox.attempts t
                  WHERE o.class = 'outbox' AND o.state IN ('prepared', 'sending') AND t.message_id = o.id
                    AND t.to_state IS NOT NULL
                  ORDER BY t.finished_at DESC
                  LIMIT 1)
                LIMIT 1
          ) d ON true
    ), resolved AS (
        SELECT DISTINCT ON (w.id) w.id, w.old_state, w.new_state, w.claim_at, w.claim_owner,
               t.action, t.notify
          FROM was w
          LEFT JOIN (outbox.transitions t JOIN outbox.actions a ON a.code = t.action)
                 ON t.from_state = w.old_state AND t.to_state = w.new_state
         WHERE w.new_state IS DISTINCT FROM w.old_state
         ORDER BY w.id, (t.action = v_action) DESC NULLS LAST, a.internal, t.action
    ), logged AS (
        INSERT INTO outbox.history (message_id, old_state, new_state, action, changed_at, changed_by)
        SELECT r.id, r.old_state, r.new_state, r.action, now(), v_actor FROM resolved r
         WHERE r.action IS NOT NULL
        UNION ALL
        -- The claim's send transition, which outbox.claim does not log, is logged with the change
        -- that ends it, at the time of the claim.
        SELECT r.id, 'prepared', 'sending', 'send', r.claim_at, coalesce(r.claim_owner, v_actor)
          FROM resolved r
         WHERE r.action IS NOT NULL AND r.old_state = 'sending' AND r.claim_at IS NOT NULL
    ), target AS (
        SELECT w.*, w.class = 'outbox' AND w.new_state IN ('prepared', 'sending') AS queued
          FROM was w
    ), gone AS (
        DELETE FROM outbox.queue q USING target t
         WHERE q.message_id = t.id AND t.was_queued AND NOT t.queued
    ), entered AS (
        INSERT INTO outbox.queue AS q (message_id, priority, due_at, leased, lease_until, attempts,
                                       lease_owner, claim_id, claimed_at, last_error_code)
        SELECT t.id, t.priority,
               CASE WHEN t.new_state = 'sending' THEN now() ELSE t.next_attempt_at END,
               t.new_state = 'sending',
               CASE WHEN t.new_state = 'sending' THEN coalesce(t.lease_expires_at, now()) END,
               t.attempts,
               CASE WHEN t.new_state = 'sending' THEN t.lease_owner END,
               CASE WHEN t.new_state = 'sending' THEN t.claim_id END,
               CASE WHEN t.new_state = 'sending' THEN now() END,
               t.last_error_code
          FROM target t
         WHERE t.queued AND (NOT t.was_queued OR t.new_state IS DISTINCT FROM t.old_state)
        ON CONFLICT (message_id) DO UPDATE
           SET priority = EXCLUDED.priority, due_at = EXCLUDED.due_at, leased = EXCLUDED.leased,
               lease_until = EXCLUDED.lease_until, lease_owner = EXCLUDED.lease_owner, claim_id = EXCLUDED.claim_id,
               claimed_at = EXCLUDED.claimed_at
    ), mirrored AS (
        UPDATE outbox.queue q
           SET priority = t.priority,
               due_at = CASE WHEN NOT q.leased AND t.next_attempt_at IS DISTINCT FROM t.old_next_attempt_at
                             THEN t.next_attempt_at ELSE q.due_at END,
               lease_until = CASE WHEN q.leased AND t.lease_expires_at IS DISTINCT FROM t.old_lease_expires_at
                                  THEN coalesce(t.lease_expires_at, now()) ELSE q.lease_until END,
               lease_owner = CASE WHEN t.lease_owner IS DISTINCT FROM t.old_lease_owner
                                  THEN t.lease_owner ELSE q.lease_owner END,
               claim_id = CASE WHEN t.claim_id IS DISTINCT FROM t.old_claim_id
                               THEN t.claim_id ELSE q.claim_id END
          FROM target t
         WHERE q.message_id = t.id AND t.queued AND t.was_queued AND t.new_state = t.old_state
           AND (t.priority <> t.old_priority
                OR t.next_attempt_at IS DISTINCT FROM t.old_next_attempt_at
                OR t.lease_expires_at IS DISTINCT FROM t.old_lease_expires_at
                OR t.lease_owner IS DISTINCT FROM t.old_lease_owner
                OR t.claim_id IS DISTINCT FROM t.old_claim_id)
    )
    SELECT b.id, b.old_state, b.new_state,
           (SELECT count(*) FROM resolved r WHERE r.notify),
           ARRAY(SELECT r.id FROM resolved r WHERE r.notify LIMIT 16)
      INTO v_bad, v_old, v_new, v_count, v_ids
      FROM (SELECT 1) one
      LEFT JOIN (SELECT r.id, r.old_state, r.new_state FROM resolved r WHERE r.action IS NULL LIMIT 1) b
             ON true;

    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'ERR-400-032: message % cannot go from state "%" to state "%"',
            v_bad, v_old, v_new
            USING ERRCODE = 'check_violation';
    END IF;

    IF v_count > 0 THEN
        PERFORM outbox.notify_prepared(v_count::integer, v_ids[1], v_ids);
    END IF;
    RETURN NULL;
END
$$;

--------------------------------------------------------------------------------------------------
-- Claim, and the leases that expired
--------------------------------------------------------------------------------------------------

-- 023's reclaim_expired for the given leased rows, which the caller has locked: each goes back to
-- the queue in its place in claim order (due_at is kept), or, the 5th time since the last repeat,
-- the message fails. Called by outbox.claim and outbox.reclaim_expired only.
CREATE FUNCTION outbox.reclaim_leases(p_worker text, p_ids uuid[]) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_count   integer;
    v_ids     uuid[];
    v_claimed timestamptz[];
    v_owners  text[];
BEGIN
    PERFORM set_config('outbox.action', 'reclaim', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    WITH expired AS (
        SELECT q.message_id AS id, q.lease_owner, q.attempts, q.claim_id, q.claimed_at,
               (SELECT count(*) FROM outbox.history h
                 WHERE h.message_id = q.message_id AND h.action = 'reclaim'
                   AND h.id > coalesce((SELECT max(r.id) FROM outbox.history r
                                         WHERE r.message_id = q.message_id AND r.action = 'repeat'), 0)
               ) >= 4 AS dead
          FROM outbox.queue q
         WHERE q.message_id = ANY (p_ids) AND q.leased
    ), requeued AS (
        UPDATE outbox.queue q
           SET leased = false, attempts = greatest(q.attempts - 1, 0),
               lease_owner = NULL, claim_id = NULL, last_error_code = 'lease-expired'
          FROM expired e
         WHERE q.message_id = e.id AND NOT e.dead
    ), failed AS (
        -- a public change: the trigger logs it and takes the message out of the queue
        UPDATE outbox.messages m
           SET state = 'failed', attempts = e.attempts, last_error_code = 'lease-expired',
               lease_owner = NULL, lease_expires_at = NULL, claim_id = NULL, updated_at = now()
          FROM expired e
         WHERE m.id = e.id AND e.dead
    ), attempts AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, claimed_at)
        SELECT e.id, e.attempts, e.claim_id, e.lease_owner,
               CASE WHEN e.dead THEN 'failed' ELSE 'interrupted' END, 'lease-expired',
               CASE WHEN e.dead
                    THEN 'the lease expired for the 5th time: the message kills or hangs every daemon that takes it'
                    ELSE 'the lease expired before the outcome was recorded (daemon killed or hung)' END,
               e.claimed_at
          FROM expired e
    )
    SELECT count(*), array_agg(e.id) FILTER (WHERE NOT e.dead),
           array_agg(e.claimed_at) FILTER (WHERE NOT e.dead),
           array_agg(e.lease_owner) FILTER (WHERE NOT e.dead)
      INTO v_count, v_ids, v_claimed, v_owners
      FROM expired e;
    PERFORM outbox.log_lease_end(v_ids, v_claimed, v_owners, 'reclaim', p_worker);
    PERFORM set_config('outbox.action', '', true);
    RETURN v_count;
END
$$;

REVOKE ALL ON FUNCTION outbox.reclaim_leases(text, uuid[]) FROM PUBLIC;

-- As in 023, except: the queue row's lease end goes to lease_until and due_at stays (a HOT
-- update), the walk in claim order passes over the leases in flight, and an expired lease it meets
-- is handed back with outbox.reclaim_leases and claimed again. A new column, `reclaimed`, says
-- which of the messages had been handed back so (the daemon counts them as lease reclaims).
DROP FUNCTION outbox.claim(text, integer, integer, uuid);
CREATE FUNCTION outbox.claim(p_worker text, p_limit integer, p_lease_ms integer, p_claim_id uuid)
RETURNS TABLE (id uuid, code text, agenttypecode text, agentcode text, profile text, address text,
               subject text, content text, label text, attempts integer, max_attempts integer,
               priority integer, created timestamptz, reclaimed boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_until   timestamptz := now() + make_interval(secs => p_lease_ms::double precision / 1000::double precision);
    v_rows    tid[];
    v_expired uuid[];
    v_handed  uuid[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, hashtext(p_claim_id::text));
    IF EXISTS (SELECT 1 FROM outbox.released_claims r WHERE r.claim_id = p_claim_id) THEN
        RETURN;
    END IF;
    LOOP
        SELECT array_agg(d.row) FILTER (WHERE NOT d.leased), array_agg(d.id) FILTER (WHERE d.leased)
          INTO v_rows, v_expired
          FROM (SELECT q.ctid AS row, q.message_id AS id, q.leased
                  FROM outbox.queue q
                 WHERE q.due_at <= now() AND (NOT q.leased OR q.lease_until < now())
                 ORDER BY q.priority DESC, q.due_at
                 LIMIT p_limit
                 FOR UPDATE OF q SKIP LOCKED) d;
        EXIT WHEN v_expired IS NULL;
        -- Leases that expired on the way: handed back (in place), then claimed again below.
        PERFORM outbox.reclaim_leases(p_worker, v_expired);
        v_handed := v_handed || v_expired;
    END LOOP;
    RETURN QUERY
    WITH leased AS (
        -- By the locked rows' ctids (a TID scan: no index lookups; a locked row cannot move).
        -- Only columns no index has change: a HOT update.
        UPDATE outbox.queue q
           SET leased = true, lease_until = v_until, attempts = q.attempts + 1, lease_owner = p_worker,
               claim_id = p_claim_id, claimed_at = now()
         WHERE q.ctid = ANY (v_rows)
        RETURNING q.message_id, q.attempts
    )
    SELECT m.id, m.code, a.type_code, a.code, m.profile, m.address, m.subject, m.content, m.label,
           l.attempts, m.max_attempts, m.priority, m.created_at, l.message_id = ANY (v_handed)
      FROM leased l
      JOIN outbox.messages m ON m.id = l.message_id
      JOIN outbox.agents a ON a.id = m.agent_id;
END
$$;

REVOKE ALL ON FUNCTION outbox.claim(text, integer, integer, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.claim(text, integer, integer, uuid) TO outboxd_daemon;

-- Every expired lease, wherever it is in the queue (a scan of the whole queue): for operators
-- and tests, and the daemon at start; the claim meets expired leases on its own.
CREATE OR REPLACE FUNCTION outbox.reclaim_expired(p_worker text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_ids uuid[];
BEGIN
    SELECT array_agg(e.message_id) INTO v_ids
      FROM (SELECT q.message_id FROM outbox.queue q
             WHERE q.leased AND q.lease_until < now()
             FOR UPDATE OF q SKIP LOCKED) e;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN outbox.reclaim_leases(p_worker, v_ids);
END
$$;

-- As in 023, on lease_until (a HOT update).
CREATE OR REPLACE FUNCTION outbox.extend_leases(p_worker text, p_ids uuid[], p_claim_ids uuid[], p_lease_ms integer)
RETURNS TABLE (id uuid, claim_id uuid)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    UPDATE outbox.queue q
       SET lease_until = now() + make_interval(secs => p_lease_ms::double precision / 1000::double precision)
      FROM unnest(p_ids, p_claim_ids) AS h(id, claim_id)
     WHERE q.message_id = h.id AND q.claim_id = h.claim_id AND q.leased AND q.lease_owner = p_worker
    RETURNING q.message_id, q.claim_id
$$;

INSERT INTO outbox.schema_migrations (version, name) VALUES (24, 'hot_claim');

COMMIT;
