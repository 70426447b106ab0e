-- 020_queue.sql — a narrow delivery queue beside the messages, and attempts that stand for the
-- daemon's own transitions (issue 9: a lighter hot path).
--
-- Why: until now every delivery cost PostgreSQL three versions of the wide `outbox.messages` row
-- — the insert and two updates (claim: prepared → sending; outcome: sending → submitted) — and
-- both updates were non-HOT, because `state` is in the predicate of three partial indexes: each
-- rewrote the whole row elsewhere and inserted into the primary key, the idempotency index and a
-- partial index. The statement trigger then wrote a history row for each of the two updates.
--
-- Now:
--   * `outbox.queue` is the index of the messages the daemon has to look at: one narrow row per
--     outbox message that is prepared (due at `due_at`) or sending (`leased`, its lease ending at
--     `due_at`). The claim walks it instead of a partial index of `outbox.messages`; lease
--     expiries are found in it too. It is derived data: `outbox.messages` stays the truth (state,
--     lease, claim id, attempts), every change of a message keeps the queue in step in the same
--     statement (the triggers below, or the hot-path functions themselves), under the message's
--     row lock.
--   * `outbox.messages` loses `messages_due_idx`, `messages_lease_idx` and `messages_state_idx`.
--     No index of the table mentions a column the daemon changes, so its updates are HOT (same
--     page, no index insert, a WAL record of the changed bytes only) when the page has room:
--     fillfactor 50 leaves room for every row of a page to be updated once before the page is
--     pruned. Trade-off: the heap of messages takes up to twice the space, and `api.outbox(state)`
--     for created, submitted, failed or deleted reads the whole table (prepared and sending go
--     through the queue).
--   * The daemon's claim and its recorded outcomes no longer write history rows: the attempt row
--     stands for them. `outbox.attempts.claimed_at` (when the claim took the message) and
--     `to_state` (the state a recorded outcome moved the message to) let `api.message_history`
--     show the `send` and `done` / `retry` / `fail` transitions as before. Every other change —
--     every public action, reclaims, hand-backs, deferrals — is logged as before, with the send
--     transition of the claim it ends.
--     The two functions tell the update trigger to stand aside with the transaction-local setting
--     `outbox.hot` (reset at once after their statement). Anyone who sets it himself only skips
--     the history and the queue of the rows he may change anyway; a message he so takes out of the
--     queue is not delivered until it is changed again.
--   * `outbox.messages.claimed_at`: when the current (or last) claim took the message.
--   * The DingTalk trigger on attempts (010) becomes one per statement: it ran once per done
--     attempt of every agent.
--
-- Existing data: the queue is filled from the messages in prepared and sending; history rows
-- already written stay (attempts from before this migration have no claimed_at / to_state, so the
-- view does not show their transitions twice).

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

--------------------------------------------------------------------------------------------------
-- Tables
--------------------------------------------------------------------------------------------------

CREATE TABLE outbox.queue (
    message_id  uuid PRIMARY KEY,
    priority    integer NOT NULL,
    due_at      timestamptz NOT NULL,
    leased      boolean NOT NULL DEFAULT false
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_cost_limit = 1000);
COMMENT ON TABLE outbox.queue IS
    'The outbox messages in prepared (due at due_at) or sending (leased until due_at); derived from outbox.messages';

-- The claim walks this one; the reclaim of expired leases the other.
CREATE INDEX queue_due_idx ON outbox.queue (priority DESC, due_at) WHERE NOT leased;
CREATE INDEX queue_lease_idx ON outbox.queue (due_at) WHERE leased;

INSERT INTO outbox.queue (message_id, priority, due_at, leased)
SELECT m.id, m.priority,
       CASE WHEN m.state = 'sending' THEN coalesce(m.lease_expires_at, now()) ELSE m.next_attempt_at END,
       m.state = 'sending'
  FROM outbox.messages m
 WHERE m.class = 'outbox' AND m.state IN ('prepared', 'sending');

ALTER TABLE outbox.messages ADD COLUMN claimed_at timestamptz;
COMMENT ON COLUMN outbox.messages.claimed_at IS 'When the current (or last) claim took the message';

ALTER TABLE outbox.attempts ADD COLUMN claimed_at timestamptz, ADD COLUMN to_state text;
COMMENT ON COLUMN outbox.attempts.claimed_at IS
    'When the claim of this attempt took the message; NULL before migration 20';
COMMENT ON COLUMN outbox.attempts.to_state IS
    'The state this recorded outcome moved the message to (its send and outcome transitions are not in outbox.history)';

DROP INDEX outbox.messages_due_idx;
DROP INDEX outbox.messages_lease_idx;
DROP INDEX outbox.messages_state_idx;

-- New pages only; existing pages fill up as before until rewritten (VACUUM FULL, pg_repack).
ALTER TABLE outbox.messages SET (fillfactor = 50);

--------------------------------------------------------------------------------------------------
-- Keeping the queue in step
--------------------------------------------------------------------------------------------------

-- After INSERT: 004's body, plus the prepared outbox messages join the queue.
CREATE OR REPLACE FUNCTION outbox.on_messages_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_count integer;
    v_first uuid;
    v_actor text := outbox.actor();
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE class = 'outbox' AND state NOT IN ('created', 'prepared')) THEN
        RAISE EXCEPTION 'ERR-400-032: an outbox message can only be created in state "created" or "prepared"'
            USING ERRCODE = 'check_violation';
    END IF;

    INSERT INTO outbox.history (message_id, old_state, new_state, action, changed_by)
    SELECT id, NULL, state, 'create', v_actor FROM new_rows WHERE class = 'outbox';

    INSERT INTO outbox.queue (message_id, priority, due_at)
    SELECT id, priority, next_attempt_at FROM new_rows WHERE class = 'outbox' AND state = 'prepared';

    SELECT count(*), (array_agg(id))[1] INTO v_count, v_first
      FROM new_rows WHERE class = 'outbox' AND state = 'prepared';
    PERFORM outbox.notify_prepared(v_count, v_first,
        ARRAY(SELECT id FROM new_rows WHERE class = 'outbox' AND state = 'prepared' LIMIT 16));
    RETURN NULL;
END
$$;

-- After UPDATE: 001's validation, history and notification, plus the queue: a message that is
-- (still) prepared or sending gets its row with the due time or lease end it has now; one that
-- left both states loses it. Stands aside for outbox.claim and outbox.record_outcomes, which keep
-- the queue themselves and whose attempt rows stand for their transitions.
CREATE OR REPLACE FUNCTION outbox.on_messages_update() RETURNS trigger
LANGUAGE plpgsql SET enable_nestloop = off SET search_path = pg_catalog, outbox, pg_temp AS $$
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

    WITH changed AS (
        SELECT n.id, o.state AS old_state, n.state AS new_state
          FROM new_rows n JOIN old_rows o USING (id)
         WHERE n.state IS DISTINCT FROM o.state
    ), resolved AS (
        SELECT DISTINCT ON (c.id) c.id, c.old_state, c.new_state, t.action, t.notify
          FROM changed c
          LEFT JOIN (outbox.transitions t JOIN outbox.actions a ON a.code = t.action)
                 ON t.from_state = c.old_state AND t.to_state = c.new_state
         ORDER BY c.id, (t.action = v_action) DESC NULLS LAST, a.internal, t.action
    ), logged AS (
        INSERT INTO outbox.history (message_id, old_state, new_state, action, changed_at, changed_by)
        SELECT r.id, r.old_state, r.new_state, r.action, now(), v_actor FROM resolved r
         WHERE r.action IS NOT NULL
        UNION ALL
        -- The claim's send transition, which outbox.claim no longer logs, is logged with the
        -- change that ends it here (a reclaim, a hand-back, a deferral, a public action), at the
        -- time of the claim. (Claims from before migration 20 have no claimed_at: logged then.)
        SELECT r.id, 'prepared', 'sending', 'send', o.claimed_at, coalesce(o.lease_owner, v_actor)
          FROM resolved r JOIN old_rows o ON o.id = r.id
         WHERE r.action IS NOT NULL AND r.old_state = 'sending' AND o.claimed_at IS NOT NULL
    )
    SELECT (SELECT r.id FROM resolved r WHERE r.action IS NULL LIMIT 1),
           (SELECT count(*) FROM resolved r WHERE r.notify),
           ARRAY(SELECT r.id FROM resolved r WHERE r.notify LIMIT 16)
      INTO v_bad, v_count, v_ids;

    IF v_bad IS NOT NULL THEN
        SELECT o.state, n.state INTO v_old, v_new
          FROM old_rows o JOIN new_rows n USING (id) WHERE o.id = v_bad;
        RAISE EXCEPTION 'ERR-400-032: message % cannot go from state "%" to state "%"',
            v_bad, v_old, v_new
            USING ERRCODE = 'check_violation';
    END IF;

    WITH moved AS (
        SELECT n.id, n.class = 'outbox' AND n.state IN ('prepared', 'sending') AS queued,
               n.priority,
               CASE WHEN n.state = 'sending' THEN coalesce(n.lease_expires_at, now())
                    ELSE n.next_attempt_at END AS due_at,
               n.state = 'sending' AS leased
          FROM new_rows n JOIN old_rows o USING (id)
         WHERE n.state IS DISTINCT FROM o.state OR n.class IS DISTINCT FROM o.class
            OR n.priority IS DISTINCT FROM o.priority
            OR n.next_attempt_at IS DISTINCT FROM o.next_attempt_at
            OR n.lease_expires_at IS DISTINCT FROM o.lease_expires_at
    ), gone AS (
        DELETE FROM outbox.queue q USING moved m WHERE q.message_id = m.id AND NOT m.queued
    )
    INSERT INTO outbox.queue AS q (message_id, priority, due_at, leased)
    SELECT m.id, m.priority, m.due_at, m.leased FROM moved m WHERE m.queued
    ON CONFLICT (message_id) DO UPDATE
       SET priority = EXCLUDED.priority, due_at = EXCLUDED.due_at, leased = EXCLUDED.leased;

    IF v_count > 0 THEN
        PERFORM outbox.notify_prepared(v_count::integer, v_ids[1], v_ids);
    END IF;
    RETURN NULL;
END
$$;

-- After DELETE (retention, an operator): no queue row outlives its message.
CREATE FUNCTION outbox.on_messages_delete() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
BEGIN
    DELETE FROM outbox.queue q USING old_rows o
     WHERE q.message_id = o.id AND o.class = 'outbox' AND o.state IN ('prepared', 'sending');
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_delete AFTER DELETE ON outbox.messages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.on_messages_delete();

--------------------------------------------------------------------------------------------------
-- Claim
--------------------------------------------------------------------------------------------------

-- As in 003, through the queue: the due rows in priority order, each joined to its message, which
-- is locked (SKIP LOCKED: concurrent daemons take different messages) and checked to be still
-- prepared. The message's update touches no indexed column (HOT); its queue row becomes a lease.
CREATE OR REPLACE FUNCTION outbox.claim(p_worker text, p_limit integer, p_lease_ms integer, p_claim_id uuid)
RETURNS TABLE (id uuid, code text, agenttypecode text, agentcode text, profile text, address text,
               subject text, content text, label text, attempts integer, max_attempts integer,
               priority integer, created timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_until timestamptz := now() + make_interval(secs => p_lease_ms::double precision / 1000::double precision);
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, hashtext(p_claim_id::text));
    IF EXISTS (SELECT 1 FROM outbox.released_claims r WHERE r.claim_id = p_claim_id) THEN
        RETURN;
    END IF;
    PERFORM set_config('outbox.hot', 'on', true);
    RETURN QUERY
    WITH due AS (
        SELECT m.id FROM outbox.queue q JOIN outbox.messages m ON m.id = q.message_id
         WHERE NOT q.leased AND q.due_at <= now() AND m.state = 'prepared'
         ORDER BY q.priority DESC, q.due_at
         LIMIT p_limit
         FOR UPDATE OF m SKIP LOCKED
    ), claimed AS (
        UPDATE outbox.messages m
           SET state = 'sending',
               attempts = m.attempts + 1,
               lease_owner = p_worker,
               lease_expires_at = v_until,
               claim_id = p_claim_id,
               claimed_at = now(),
               updated_at = now()
          FROM due
         WHERE m.id = due.id
        RETURNING m.id, m.code, m.agent_id, m.profile, m.address, m.subject, m.content, m.label,
                  m.attempts, m.max_attempts, m.priority, m.created_at
    ), leased AS (
        -- By key (= ANY of an array: index lookups), never a hash join over the whole queue.
        UPDATE outbox.queue q SET leased = true, due_at = v_until
         WHERE q.message_id = ANY (ARRAY(SELECT c.id FROM claimed c))
    )
    SELECT c.id, c.code, a.type_code, a.code, c.profile, c.address, c.subject, c.content, c.label,
           c.attempts, c.max_attempts, c.priority, c.created_at
      FROM claimed c JOIN outbox.agents a ON a.id = c.agent_id;
    PERFORM set_config('outbox.hot', '', true);
END
$$;

-- As in 003; the claim's messages are found through the leases of the queue.
CREATE OR REPLACE FUNCTION outbox.release_claim(p_worker text, p_claim_id uuid) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, hashtext(p_claim_id::text));
    INSERT INTO outbox.released_claims (claim_id, worker) VALUES (p_claim_id, p_worker)
    ON CONFLICT (claim_id) DO NOTHING;
    DELETE FROM outbox.released_claims r WHERE r.released_at < now() - interval '1 day';
    PERFORM set_config('outbox.action', 'release', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    WITH updated AS (
        UPDATE outbox.messages m
           SET state = 'prepared',
               attempts = greatest(m.attempts - 1, 0),
               lease_owner = NULL, lease_expires_at = NULL, claim_id = NULL, updated_at = now()
          FROM outbox.queue q
         WHERE q.leased AND m.id = q.message_id
           AND m.state = 'sending' AND m.claim_id = p_claim_id AND m.lease_owner = p_worker
        RETURNING m.id
    )
    SELECT count(*) INTO v_count FROM updated;
    RETURN v_count;
END
$$;

--------------------------------------------------------------------------------------------------
-- Outcomes
--------------------------------------------------------------------------------------------------

-- As in 013, with the queue: a done or failed message leaves it, a retried one is due again. The
-- attempt row records when the claim took the message and the state the outcome moved it to,
-- instead of two history rows. The stale and duplicate outcomes are judged as before.
CREATE OR REPLACE FUNCTION outbox.record_outcomes(
    p_worker text, p_ids uuid[], p_claim_ids uuid[], p_attempts integer[], p_outcomes text[],
    p_error_codes text[], p_error_texts text[], p_remote_status integer[], p_provider_ids text[],
    p_duration_ms integer[], p_retry_delay_ms integer[], p_replies text[], p_profiles text[]
) RETURNS TABLE (id uuid, claim_id uuid, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp
SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    v_ids    uuid[];
    v_claims uuid[];
BEGIN
    PERFORM set_config('outbox.hot', 'on', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_claim_ids, p_outcomes, p_error_codes, p_error_texts,
                             p_remote_status, p_provider_ids, p_duration_ms, p_retry_delay_ms,
                             p_replies, p_profiles)
               AS u(id, claim_id, outcome, error_code, error_text, remote_status, provider_id,
                    duration_ms, retry_delay_ms, reply, profile)
    ), updated AS (
        UPDATE outbox.messages m
           SET state = CASE i.outcome WHEN 'done' THEN 'submitted' WHEN 'retry' THEN 'prepared' ELSE 'failed' END,
               next_attempt_at = CASE WHEN i.outcome = 'retry'
                                      THEN now() + make_interval(secs => coalesce(i.retry_delay_ms, 0)::double precision / 1000::double precision)
                                      ELSE m.next_attempt_at END,
               last_error_code = CASE WHEN i.outcome = 'done' THEN NULL ELSE i.error_code END,
               provider_message_id = coalesce(i.provider_id, m.provider_message_id),
               label = CASE WHEN i.outcome = 'done' AND m.label IS NULL THEN i.provider_id ELSE m.label END,
               lease_owner = NULL,
               lease_expires_at = NULL,
               updated_at = now()
          FROM input i
         WHERE m.id = i.id AND m.claim_id = i.claim_id AND m.state = 'sending'
           AND m.lease_owner = p_worker
        RETURNING m.id, m.claim_id, m.attempts, m.agent_id, m.profile, m.address, m.subject,
                  m.claimed_at, m.state, m.next_attempt_at,
                  i.outcome, i.error_code, i.error_text, i.remote_status, i.provider_id,
                  i.duration_ms, i.reply, i.profile AS attempt_profile
    ), attempts AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, remote_status, provider_message_id, duration_ms,
                                     profile, claimed_at, to_state)
        SELECT u.id, u.attempts, u.claim_id, p_worker, u.outcome, u.error_code, u.error_text,
               u.remote_status, u.provider_id, u.duration_ms, u.attempt_profile, u.claimed_at,
               u.state
          FROM updated u
    ), replies AS (
        INSERT INTO outbox.messages (class, parent, agent_id, profile, address, subject, content)
        SELECT 'inbox', u.id, u.agent_id, u.profile, u.address, u.subject, u.reply
          FROM updated u
         WHERE u.reply IS NOT NULL AND u.outcome = 'done'
    ), dingtalk AS (
        -- what 010's trigger on attempts does for other writers of attempts
        INSERT INTO outbox.dingtalk_send_results (message_id, task_id, profile)
        SELECT u.id, u.provider_id, u.profile
          FROM updated u JOIN outbox.agents a ON a.id = u.agent_id
         WHERE u.outcome = 'done' AND u.provider_id IS NOT NULL AND a.code = 'dingtalk.agent'
           AND coalesce(u.address, '') NOT LIKE 'chat:%'
        ON CONFLICT (message_id) DO NOTHING
    ), dequeued AS (
        DELETE FROM outbox.queue q
         WHERE q.message_id = ANY (ARRAY(SELECT u.id FROM updated u WHERE u.state <> 'prepared'))
    ), requeued AS (
        UPDATE outbox.queue q SET leased = false, due_at = u.next_attempt_at
          FROM updated u
         WHERE q.message_id = u.id AND u.state = 'prepared'
    )
    SELECT array_agg(u.id), array_agg(u.claim_id) INTO v_ids, v_claims FROM updated u;
    PERFORM set_config('outbox.hot', '', true);

    RETURN QUERY SELECT a.id, a.claim_id, 'recorded'::text FROM unnest(v_ids, v_claims) AS a(id, claim_id);
    IF coalesce(cardinality(v_ids), 0) = cardinality(p_ids) THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_claim_ids, p_attempts, p_outcomes, p_error_codes,
                             p_error_texts, p_remote_status, p_provider_ids, p_duration_ms,
                             p_profiles)
               AS u(id, claim_id, attempt, outcome, error_code, error_text, remote_status,
                    provider_id, duration_ms, profile)
    ), rest AS (
        SELECT i.* FROM input i
         WHERE NOT EXISTS (SELECT 1 FROM unnest(v_ids, v_claims) AS a(id, claim_id)
                            WHERE a.id = i.id AND a.claim_id = i.claim_id)
    ), judged AS (
        SELECT r.*,
               EXISTS (SELECT 1 FROM outbox.attempts t
                        WHERE t.message_id = r.id AND t.claim_id = r.claim_id) AS logged,
               EXISTS (SELECT 1 FROM outbox.attempts t
                        WHERE t.message_id = r.id AND t.claim_id = r.claim_id AND t.worker = p_worker
                          AND t.outcome = r.outcome
                          AND t.error_code IS NOT DISTINCT FROM r.error_code
                          AND coalesce(t.error_text, '') NOT LIKE 'stale:%')
               AND EXISTS (SELECT 1 FROM outbox.messages m
                            WHERE m.id = r.id AND m.claim_id = r.claim_id AND m.state <> 'sending')
               AS duplicate,
               (SELECT m.claimed_at FROM outbox.messages m
                 WHERE m.id = r.id AND m.claim_id = r.claim_id) AS claimed_at
          FROM rest r
    ), logged AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, remote_status, provider_message_id, duration_ms,
                                     profile, claimed_at)
        SELECT j.id, j.attempt, j.claim_id, p_worker, j.outcome, j.error_code,
               'stale: the claim had lost its lease when this outcome arrived; the message was not changed'
                   || coalesce(' (' || j.error_text || ')', ''),
               j.remote_status, j.provider_id, j.duration_ms, j.profile, j.claimed_at
          FROM judged j
         WHERE NOT j.logged
    )
    SELECT j.id, j.claim_id, CASE WHEN j.duplicate THEN 'duplicate' ELSE 'stale' END
      FROM judged j;
END
$$;

--------------------------------------------------------------------------------------------------
-- Expired leases and hand-backs
--------------------------------------------------------------------------------------------------

-- As in 003, the expired leases found through the queue. The interrupted (or failed) attempt row
-- carries its claim time; the reclaim itself is logged in the history as before.
CREATE OR REPLACE FUNCTION outbox.reclaim_expired(p_worker text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM set_config('outbox.action', 'reclaim', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    WITH expired AS (
        SELECT e.id, e.lease_owner, e.attempts, e.claim_id, e.claimed_at,
               (SELECT count(*) FROM outbox.history h
                 WHERE h.message_id = e.id AND h.action = 'reclaim'
                   AND h.id > coalesce((SELECT max(r.id) FROM outbox.history r
                                         WHERE r.message_id = e.id AND r.action = 'repeat'), 0)
               ) AS expiries
          FROM outbox.queue q JOIN outbox.messages e ON e.id = q.message_id
         WHERE q.leased AND q.due_at < now()
           AND e.state = 'sending' AND e.lease_expires_at < now()
         FOR UPDATE OF e SKIP LOCKED
    ), updated AS (
        UPDATE outbox.messages m
           SET state = CASE WHEN e.expiries >= 4 THEN 'failed' ELSE 'prepared' END,
               next_attempt_at = now(), attempts = greatest(m.attempts - 1, 0),
               lease_owner = NULL, lease_expires_at = NULL, claim_id = NULL,
               last_error_code = 'lease-expired', updated_at = now()
          FROM expired e
         WHERE m.id = e.id
        RETURNING m.id
    ), logged AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, claimed_at)
        SELECT e.id, e.attempts, e.claim_id, e.lease_owner,
               CASE WHEN e.expiries >= 4 THEN 'failed' ELSE 'interrupted' END, 'lease-expired',
               CASE WHEN e.expiries >= 4
                    THEN 'the lease expired for the 5th time: the message kills or hangs every daemon that takes it'
                    ELSE 'the lease expired before the outcome was recorded (daemon killed or hung)' END,
               e.claimed_at
          FROM expired e JOIN updated u ON u.id = e.id
    )
    SELECT count(*) INTO v_count FROM updated;
    RETURN v_count;
END
$$;

-- As in 003; the interrupted attempt row carries its claim time.
CREATE OR REPLACE FUNCTION outbox.release(p_worker text, p_ids uuid[], p_claim_ids uuid[], p_delay_ms integer)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM set_config('outbox.action', 'release', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    WITH updated AS (
        UPDATE outbox.messages m
           SET state = 'prepared',
               next_attempt_at = now() + make_interval(secs => p_delay_ms::double precision / 1000::double precision),
               attempts = greatest(m.attempts - 1, 0),
               lease_owner = NULL, lease_expires_at = NULL, claim_id = NULL, updated_at = now()
          FROM unnest(p_ids, p_claim_ids) AS h(id, claim_id)
         WHERE m.id = h.id AND m.claim_id = h.claim_id AND m.state = 'sending'
           AND m.lease_owner = p_worker
        RETURNING m.id, m.attempts, h.claim_id, m.claimed_at
    ), logged AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, claimed_at)
        SELECT u.id, u.attempts + 1, u.claim_id, p_worker, 'interrupted', 'shutdown',
               'handed back by a daemon shutting down', u.claimed_at
          FROM updated u
    )
    SELECT count(*) INTO v_count FROM updated;
    RETURN v_count;
END
$$;

--------------------------------------------------------------------------------------------------
-- History as users see it
--------------------------------------------------------------------------------------------------

-- The logged changes, and the ones the attempt rows of recorded outcomes stand for: the claim
-- (`send`, at claimed_at) and the outcome (`done`, `retry` or `fail`, at finished_at). Other
-- attempt rows (reclaims, hand-backs, stale outcomes) have their transitions in outbox.history.
-- Same columns as before.
CREATE OR REPLACE VIEW api.message_history AS
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

--------------------------------------------------------------------------------------------------
-- DingTalk send results: one trigger call per statement
--------------------------------------------------------------------------------------------------

-- 010's trigger ran once per done attempt of every agent (a plpgsql call and a message lookup
-- each). Now once per statement, and not at all for outbox.record_outcomes, which inserts the
-- send results itself from the rows it has at hand.

DROP TRIGGER attempts_dingtalk_done ON outbox.attempts;

CREATE OR REPLACE FUNCTION outbox.on_dingtalk_attempt_done() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
BEGIN
    IF current_setting('outbox.hot', true) = 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO outbox.dingtalk_send_results (message_id, task_id, profile)
    SELECT m.id, n.provider_message_id, m.profile
      FROM new_rows n
      JOIN outbox.messages m ON m.id = n.message_id
      JOIN outbox.agents a ON a.id = m.agent_id
     WHERE n.outcome = 'done' AND n.provider_message_id IS NOT NULL
       AND a.code = 'dingtalk.agent' AND coalesce(m.address, '') NOT LIKE 'chat:%'
    ON CONFLICT (message_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER attempts_dingtalk_done AFTER INSERT ON outbox.attempts
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.on_dingtalk_attempt_done();

GRANT SELECT ON outbox.queue TO outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (20, 'queue');

COMMIT;
