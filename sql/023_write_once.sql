-- 023_write_once.sql — the daemon no longer writes outbox.messages (issue 9: a lighter hot path).
--
-- Why: after 020 each delivery still locked and updated the wide message row twice (claim:
-- prepared → sending; outcome: sending → submitted). Those updates were HOT, but the row lock and
-- the updates dirty every page of the backlog: after a checkpoint each page is written whole into
-- the WAL once (a full-page image of 8 kB for a few messages), which was most of the WAL we wrote
-- per message, and the claim's joins and updates of the wide rows most of the PostgreSQL CPU.
--
-- Now the daemon's delivery state lives in `outbox.queue` and `outbox.attempts` only:
--   * The queue row carries what the daemon changes while a message waits or is being sent:
--     `attempts`, the lease (`leased`, `due_at` as the lease end, `lease_owner`, `claim_id`,
--     `claimed_at`) and `last_error_code` of a retried attempt. The claim locks and updates the
--     queue row alone (FOR UPDATE … SKIP LOCKED on the queue: concurrent daemons still never
--     share a message) and only reads the message.
--   * A recorded outcome deletes the queue row (done, failed) or makes it due again (retry), and
--     inserts the attempt row, whose `to_state` is the message's state from then on.
--   * `outbox.messages.state` is what the last public write made it (enqueue, public action,
--     DBA). When that is prepared or sending, the state users see is the daemon's: sending or
--     prepared while the queue row exists, else the `to_state` of the newest recorded outcome.
--     `outbox.live_messages` is outbox.messages with those columns (state, attempts, lease,
--     claim, next_attempt_at, last_error_code, provider_message_id, label, updated_at) as they
--     are now; `api.message` (and so `api.service_message`, `api.outbox`, …), the task views,
--     retention and `outboxd status` read it. Same columns as before for users.
--   * The update trigger reads a row's state before the change the same way, so public actions
--     and a DBA's UPDATE are validated and logged against the state users see. An UPDATE that
--     does not set a new state (a label, a due time) changes no state, whatever the stored column
--     says. Public actions lock the queue row first, so they and the claim still take turns.
--   * Reclaims, hand-backs and rate-limit deferrals change only the queue and write their history
--     rows themselves.
--   * Before a week of attempts is dropped, the messages whose state it decides get that state
--     written into outbox.messages (outbox.drop_log_partitions), so no message loses its state.
--
-- Trade-offs: reading a message's state costs a queue probe, and for a finished message whose
-- stored state is still prepared, a probe of each week of attempts; `api.outbox('submitted')`
-- and the like compute the state of every message. A delivered message's row is never rewritten
-- by the daemon (until retention settles it as above).
--
-- Existing data: the queue rows get the attempts, lease and claim of their messages.

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

--------------------------------------------------------------------------------------------------
-- The queue carries the delivery state
--------------------------------------------------------------------------------------------------

ALTER TABLE outbox.queue
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN lease_owner text,
    ADD COLUMN claim_id uuid,
    ADD COLUMN claimed_at timestamptz,
    ADD COLUMN last_error_code text;
COMMENT ON TABLE outbox.queue IS
    'The outbox messages in prepared (due at due_at) or sending (leased until due_at), with their delivery state';

UPDATE outbox.queue q
   SET attempts = m.attempts, lease_owner = m.lease_owner, claim_id = m.claim_id,
       claimed_at = m.claimed_at, last_error_code = m.last_error_code
  FROM outbox.messages m
 WHERE m.id = q.message_id;

--------------------------------------------------------------------------------------------------
-- The state users see
--------------------------------------------------------------------------------------------------

CREATE VIEW outbox.live_messages AS
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
                q.lease_owner, CASE WHEN q.leased THEN q.due_at END AS lease_expires_at,
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

COMMENT ON VIEW outbox.live_messages IS
    'outbox.messages as users see them: the daemon''s state from the queue and the attempts (migration 23)';

--------------------------------------------------------------------------------------------------
-- Public writes: validated against the state users see, and the queue kept in step
--------------------------------------------------------------------------------------------------

-- After UPDATE: 020's trigger, with each row's state before the change read as users saw it. A
-- row whose stored state the statement left as it was keeps the state it had (unless a public
-- action, which sets outbox.action, set it: `repeat` of a delivered message stores prepared over
-- prepared). The queue: a message entering prepared or sending gets its row, one leaving them
-- loses it, one staying there gets the priority, due time or lease the statement changed.
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
        INSERT INTO outbox.queue AS q (message_id, priority, due_at, leased, attempts, lease_owner,
                                       claim_id, claimed_at, last_error_code)
        SELECT t.id, t.priority,
               CASE WHEN t.new_state = 'sending' THEN coalesce(t.lease_expires_at, now()) ELSE t.next_attempt_at END,
               t.new_state = 'sending', t.attempts,
               CASE WHEN t.new_state = 'sending' THEN t.lease_owner END,
               CASE WHEN t.new_state = 'sending' THEN t.claim_id END,
               CASE WHEN t.new_state = 'sending' THEN now() END,
               t.last_error_code
          FROM target t
         WHERE t.queued AND (NOT t.was_queued OR t.new_state IS DISTINCT FROM t.old_state)
        ON CONFLICT (message_id) DO UPDATE
           SET priority = EXCLUDED.priority, due_at = EXCLUDED.due_at, leased = EXCLUDED.leased,
               lease_owner = EXCLUDED.lease_owner, claim_id = EXCLUDED.claim_id,
               claimed_at = EXCLUDED.claimed_at
    ), mirrored AS (
        UPDATE outbox.queue q
           SET priority = t.priority,
               due_at = CASE WHEN q.leased AND t.lease_expires_at IS DISTINCT FROM t.old_lease_expires_at
                             THEN coalesce(t.lease_expires_at, now())
                             WHEN NOT q.leased AND t.next_attempt_at IS DISTINCT FROM t.old_next_attempt_at
                             THEN t.next_attempt_at
                             ELSE q.due_at END,
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

-- 004's body of api.execute_object_action, with the state users see: the queue row is locked
-- first (a claim in progress finishes before the action looks), then the state is read through
-- outbox.live_messages.
CREATE OR REPLACE FUNCTION outbox.run_action(pObject uuid, pAction text, pParams jsonb, pDaemon boolean)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_state  text;
    v_action outbox.actions%ROWTYPE;
    v_tr     outbox.transitions%ROWTYPE;
    v_new    outbox.states%ROWTYPE;
BEGIN
    SELECT * INTO v_action FROM outbox.actions WHERE code = lower(pAction);
    IF NOT FOUND OR v_action.internal THEN
        RAISE EXCEPTION 'ERR-400-029: unknown action "%"', pAction USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_action.daemon_only AND NOT pDaemon THEN
        RAISE EXCEPTION 'ERR-403-033: action "%" is reserved for the daemon (role outboxd_daemon)', v_action.code
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    PERFORM 1 FROM outbox.messages WHERE id = pObject AND class = 'outbox' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ERR-400-030: message "%" not found', pObject USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM 1 FROM outbox.queue WHERE message_id = pObject FOR UPDATE;
    SELECT state INTO v_state FROM outbox.live_messages WHERE id = pObject;

    SELECT * INTO v_tr FROM outbox.transitions WHERE from_state = v_state AND action = v_action.code;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ERR-400-032: action "%" is not allowed in state "%"', v_action.code, v_state
            USING ERRCODE = 'check_violation';
    END IF;

    PERFORM set_config('outbox.action', v_action.code, true);
    UPDATE outbox.messages m
       SET state = v_tr.to_state,
           updated_at = now(),
           next_attempt_at = CASE WHEN v_tr.to_state = 'prepared'
                                  THEN greatest(coalesce(m.send_at, now()), now())
                                  ELSE m.next_attempt_at END,
           attempts = CASE WHEN v_action.code = 'repeat' THEN 0 ELSE m.attempts END,
           last_error_code = CASE WHEN v_action.code = 'repeat' THEN NULL ELSE m.last_error_code END,
           lease_owner = CASE WHEN v_tr.to_state = 'sending' THEN outbox.actor() ELSE NULL END,
           lease_expires_at = CASE WHEN v_tr.to_state = 'sending'
                                   THEN now() + make_interval(secs => coalesce((pParams ->> 'lease_seconds')::double precision, 300))
                                   ELSE NULL END
     WHERE m.id = pObject;
    PERFORM set_config('outbox.action', '', true);

    SELECT * INTO v_new FROM outbox.states WHERE code = v_tr.to_state;
    RETURN jsonb_build_object(
        'action', jsonb_build_object('id', v_action.id, 'code', v_action.code),
        'method', v_tr.id,
        'object', pObject,
        'newstate', jsonb_build_object('id', v_new.id, 'code', v_new.code, 'label', v_new.label,
                                       'type', v_new.type_code, 'typecode', v_new.type_code,
                                       'typename', v_new.type_label));
END
$$;

--------------------------------------------------------------------------------------------------
-- Claim
--------------------------------------------------------------------------------------------------

-- As in 020, with the queue row as the only one written: locked (SKIP LOCKED: concurrent daemons
-- take different messages) and leased; the message is only read.
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
    RETURN QUERY
    WITH due AS (
        SELECT q.ctid AS row FROM outbox.queue q
         WHERE NOT q.leased AND q.due_at <= now()
         ORDER BY q.priority DESC, q.due_at
         LIMIT p_limit
         FOR UPDATE OF q SKIP LOCKED
    ), leased AS (
        -- By the locked rows' ctids (a TID scan: no index lookups; a locked row cannot move),
        -- never a hash join over the whole queue.
        UPDATE outbox.queue q
           SET leased = true, due_at = v_until, attempts = q.attempts + 1, lease_owner = p_worker,
               claim_id = p_claim_id, claimed_at = now()
         WHERE q.ctid = ANY (ARRAY(SELECT d.row FROM due d))
        RETURNING q.message_id, q.attempts
    )
    SELECT m.id, m.code, a.type_code, a.code, m.profile, m.address, m.subject, m.content, m.label,
           l.attempts, m.max_attempts, m.priority, m.created_at
      FROM leased l
      JOIN outbox.messages m ON m.id = l.message_id
      JOIN outbox.agents a ON a.id = m.agent_id;
END
$$;

-- The history of leases that ended without an outcome: for each message, the claim's send
-- transition at the time of the claim (outbox.claim does not log it) and the way back to prepared
-- (p_action: release, reclaim, defer). Called by the owner's functions below only.
CREATE FUNCTION outbox.log_lease_end(p_ids uuid[], p_claimed_at timestamptz[], p_owners text[],
                                     p_action text, p_worker text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, outbox, pg_temp AS $$
    INSERT INTO outbox.history (message_id, old_state, new_state, action, changed_at, changed_by)
    SELECT l.id, 'prepared', 'sending', 'send', l.claimed_at, coalesce(l.owner, p_worker)
      FROM unnest(p_ids, p_claimed_at, p_owners) AS l(id, claimed_at, owner)
     WHERE l.claimed_at IS NOT NULL
    UNION ALL
    SELECT l.id, 'sending', 'prepared', p_action, now(), p_worker
      FROM unnest(p_ids) AS l(id)
$$;

REVOKE ALL ON FUNCTION outbox.log_lease_end(uuid[], timestamptz[], text[], text, text) FROM PUBLIC;

-- As in 020: the claim's leases go back to the queue, logged as a release.
CREATE OR REPLACE FUNCTION outbox.release_claim(p_worker text, p_claim_id uuid) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_ids     uuid[];
    v_claimed timestamptz[];
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, hashtext(p_claim_id::text));
    INSERT INTO outbox.released_claims (claim_id, worker) VALUES (p_claim_id, p_worker)
    ON CONFLICT (claim_id) DO NOTHING;
    DELETE FROM outbox.released_claims r WHERE r.released_at < now() - interval '1 day';
    WITH released AS (
        UPDATE outbox.queue q
           SET leased = false, due_at = now(), attempts = greatest(q.attempts - 1, 0),
               lease_owner = NULL, claim_id = NULL
         WHERE q.leased AND q.claim_id = p_claim_id AND q.lease_owner = p_worker
        RETURNING q.message_id, q.claimed_at
    )
    SELECT array_agg(r.message_id), array_agg(r.claimed_at) INTO v_ids, v_claimed FROM released r;
    PERFORM outbox.log_lease_end(v_ids, v_claimed, NULL, 'release', p_worker);
    RETURN coalesce(cardinality(v_ids), 0);
END
$$;

-- As in 003, on the queue.
CREATE OR REPLACE FUNCTION outbox.extend_leases(p_worker text, p_ids uuid[], p_claim_ids uuid[], p_lease_ms integer)
RETURNS TABLE (id uuid, claim_id uuid)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    UPDATE outbox.queue q
       SET due_at = now() + make_interval(secs => p_lease_ms::double precision / 1000::double precision)
      FROM unnest(p_ids, p_claim_ids) AS h(id, claim_id)
     WHERE q.message_id = h.id AND q.claim_id = h.claim_id AND q.leased AND q.lease_owner = p_worker
    RETURNING q.message_id, q.claim_id
$$;

--------------------------------------------------------------------------------------------------
-- Outcomes
--------------------------------------------------------------------------------------------------

-- As in 020, on the queue: a done or failed message's queue row goes, a retried one's is due
-- again; the attempt row says the state the message is in now. The message is only read (for a
-- reply or a DingTalk send result). Stale and duplicate outcomes are judged as before.
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
    ), finished AS (
        -- By key (= ANY of an array: index lookups), never a hash join over the whole queue.
        DELETE FROM outbox.queue q USING input i
         WHERE q.message_id = ANY (ARRAY(SELECT i.id FROM input i WHERE i.outcome <> 'retry'))
           AND q.message_id = i.id AND q.claim_id = i.claim_id AND i.outcome <> 'retry'
           AND q.leased AND q.lease_owner = p_worker
        RETURNING q.message_id, q.claim_id, q.attempts, q.claimed_at
    ), retried AS (
        UPDATE outbox.queue q
           SET leased = false, lease_owner = NULL, last_error_code = i.error_code,
               due_at = now() + make_interval(secs => coalesce(i.retry_delay_ms, 0)::double precision / 1000::double precision)
          FROM input i
         WHERE q.message_id = ANY (ARRAY(SELECT i.id FROM input i WHERE i.outcome = 'retry'))
           AND q.message_id = i.id AND q.claim_id = i.claim_id AND i.outcome = 'retry'
           AND q.leased AND q.lease_owner = p_worker
        RETURNING q.message_id, q.claim_id, q.attempts, q.claimed_at
    ), updated AS (
        SELECT i.*, f.attempts, f.claimed_at,
               CASE i.outcome WHEN 'done' THEN 'submitted' WHEN 'retry' THEN 'prepared' ELSE 'failed' END AS state
          FROM (SELECT * FROM finished UNION ALL SELECT * FROM retried) f
          JOIN input i ON i.id = f.message_id AND i.claim_id = f.claim_id
    ), attempts AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, remote_status, provider_message_id, duration_ms,
                                     profile, claimed_at, to_state)
        SELECT u.id, u.attempts, u.claim_id, p_worker, u.outcome,
               CASE WHEN u.outcome = 'done' THEN NULL ELSE u.error_code END, u.error_text,
               u.remote_status, u.provider_id, u.duration_ms, u.profile, u.claimed_at, u.state
          FROM updated u
    ), replies AS (
        INSERT INTO outbox.messages (class, parent, agent_id, profile, address, subject, content)
        SELECT 'inbox', m.id, m.agent_id, m.profile, m.address, m.subject, u.reply
          FROM updated u JOIN outbox.messages m ON m.id = u.id
         WHERE u.reply IS NOT NULL AND u.outcome = 'done'
    ), dingtalk AS (
        -- what 010's trigger on attempts does for other writers of attempts
        INSERT INTO outbox.dingtalk_send_results (message_id, task_id, profile)
        SELECT m.id, u.provider_id, m.profile
          FROM updated u
          JOIN outbox.messages m ON m.id = u.id
          JOIN outbox.agents a ON a.id = m.agent_id
         WHERE u.outcome = 'done' AND u.provider_id IS NOT NULL AND a.code = 'dingtalk.agent'
           AND coalesce(m.address, '') NOT LIKE 'chat:%'
        ON CONFLICT (message_id) DO NOTHING
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
               AND NOT EXISTS (SELECT 1 FROM outbox.queue q
                                WHERE q.message_id = r.id AND q.claim_id = r.claim_id AND q.leased)
               AS duplicate,
               coalesce((SELECT q.claimed_at FROM outbox.queue q
                          WHERE q.message_id = r.id AND q.claim_id = r.claim_id),
                        (SELECT t.claimed_at FROM outbox.attempts t
                          WHERE t.message_id = r.id AND t.claim_id = r.claim_id LIMIT 1)) AS claimed_at
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
-- Expired leases, hand-backs, deferrals: the queue, and their own history rows
--------------------------------------------------------------------------------------------------

-- As in 020. An expired lease goes back to the queue (or, the 5th time since the last repeat,
-- the message fails: that one is a public change of outbox.messages, logged by the trigger).
CREATE OR REPLACE FUNCTION outbox.reclaim_expired(p_worker text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
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
         WHERE q.leased AND q.due_at < now()
         FOR UPDATE OF q SKIP LOCKED
    ), requeued AS (
        UPDATE outbox.queue q
           SET leased = false, due_at = now(), attempts = greatest(q.attempts - 1, 0),
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

-- As in 020, on the queue: the hand-back on shutdown.
CREATE OR REPLACE FUNCTION outbox.release(p_worker text, p_ids uuid[], p_claim_ids uuid[], p_delay_ms integer)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_ids     uuid[];
    v_claimed timestamptz[];
BEGIN
    WITH released AS (
        UPDATE outbox.queue q
           SET leased = false,
               due_at = now() + make_interval(secs => p_delay_ms::double precision / 1000::double precision),
               attempts = greatest(q.attempts - 1, 0), lease_owner = NULL, claim_id = NULL
          FROM unnest(p_ids, p_claim_ids) AS h(id, claim_id)
         WHERE q.message_id = h.id AND q.claim_id = h.claim_id AND q.leased AND q.lease_owner = p_worker
        RETURNING q.message_id, q.attempts, h.claim_id, q.claimed_at
    ), attempts AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, claimed_at)
        SELECT r.message_id, r.attempts + 1, r.claim_id, p_worker, 'interrupted', 'shutdown',
               'handed back by a daemon shutting down', r.claimed_at
          FROM released r
    )
    SELECT array_agg(r.message_id), array_agg(r.claimed_at) INTO v_ids, v_claimed FROM released r;
    PERFORM outbox.log_lease_end(v_ids, v_claimed, NULL, 'release', p_worker);
    RETURN coalesce(cardinality(v_ids), 0);
END
$$;

-- 013's rate_take with the claim read from, and the deferral written to, the queue; the slot a
-- deferred message reserved stays on the message (rate-limited messages only).
CREATE OR REPLACE FUNCTION outbox.rate_take(p_worker text, p_id uuid, p_claim_id uuid, p_buckets text[],
                                            p_window_ms integer[], p_counts integer[], p_late_ms integer,
                                            p_now timestamptz DEFAULT NULL)
RETURNS TABLE (result text, slot_at timestamptz, wait_ms integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_now      timestamptz := coalesce(p_now, now());
    v_held_at  timestamptz;
    v_held_in  text;
    v_claimed  timestamptz;
    v_w        record;
    v_slots    timestamptz[];
    v_n        integer;
    v_earliest timestamptz;
    v_worst    timestamptz := NULL;
    v_worst_in text;
    v_wait     integer;
BEGIN
    SELECT m.rate_slot_at, m.rate_bucket, q.claimed_at INTO v_held_at, v_held_in, v_claimed
      FROM outbox.queue q JOIN outbox.messages m ON m.id = q.message_id
     WHERE q.message_id = p_id AND q.claim_id = p_claim_id AND q.leased AND q.lease_owner = p_worker;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    IF (SELECT count(*) FROM outbox.rate_windows w WHERE w.bucket = ANY (p_buckets))
       < cardinality(p_buckets) THEN
        INSERT INTO outbox.rate_windows (bucket, window_ms, max_count)
        SELECT b.bucket, b.window_ms, b.max_count
          FROM unnest(p_buckets, p_window_ms, p_counts) AS b(bucket, window_ms, max_count)
         ORDER BY b.bucket
        ON CONFLICT (bucket) DO NOTHING;
    END IF;

    IF v_held_at IS NOT NULL AND (v_held_in <> ALL (p_buckets)
         OR v_now - v_held_at > make_interval(secs => p_late_ms::double precision / 1000::double precision)) THEN
        v_held_at := NULL;
    END IF;

    FOR v_w IN
        SELECT w.bucket, w.window_ms, w.max_count, w.slots, w.blocked_until
          FROM outbox.rate_windows w
         WHERE w.bucket = ANY (p_buckets)
         ORDER BY w.bucket
           FOR UPDATE
    LOOP
        IF v_held_at IS NOT NULL AND v_w.bucket = v_held_in THEN
            IF v_w.blocked_until > v_held_at THEN
                v_held_at := NULL;
            ELSE
                v_earliest := v_held_at;
                IF v_worst IS NULL OR v_earliest > v_worst THEN
                    v_worst := v_earliest;
                    v_worst_in := v_w.bucket;
                END IF;
                CONTINUE;
            END IF;
        END IF;
        v_slots := ARRAY(SELECT s FROM unnest(v_w.slots) AS s
                          WHERE s > v_now - make_interval(secs => v_w.window_ms::double precision / 1000::double precision)
                          ORDER BY s);
        v_n := cardinality(v_slots);
        v_earliest := v_now;
        IF v_n >= v_w.max_count THEN
            v_earliest := greatest(v_earliest, v_slots[v_n - v_w.max_count + 1]
                                   + make_interval(secs => v_w.window_ms::double precision / 1000::double precision));
        END IF;
        IF v_n > 0 THEN
            v_earliest := greatest(v_earliest, v_slots[v_n]);
        END IF;
        IF v_w.blocked_until IS NOT NULL THEN
            v_earliest := greatest(v_earliest, v_w.blocked_until);
        END IF;
        IF v_worst IS NULL OR v_earliest > v_worst THEN
            v_worst := v_earliest;
            v_worst_in := v_w.bucket;
        END IF;
    END LOOP;

    PERFORM set_config('outbox.hot', 'on', true);
    IF v_worst IS NULL OR v_worst <= v_now THEN
        UPDATE outbox.rate_windows w
           SET slots = (SELECT array_agg(s ORDER BY s) FROM (
                            SELECT s FROM unnest(w.slots || v_now) AS s
                             WHERE s > v_now - make_interval(secs => w.window_ms::double precision / 1000::double precision)
                             ORDER BY s DESC LIMIT w.max_count) AS kept),
               updated_at = now()
         WHERE w.bucket = ANY (p_buckets) AND w.bucket IS DISTINCT FROM
               (CASE WHEN v_held_at IS NOT NULL THEN v_held_in END);
        IF v_held_at IS NOT NULL OR (SELECT m.rate_slot_at FROM outbox.messages m WHERE m.id = p_id) IS NOT NULL THEN
            UPDATE outbox.messages m SET rate_slot_at = NULL, rate_bucket = NULL WHERE m.id = p_id;
        END IF;
        PERFORM set_config('outbox.hot', '', true);
        RETURN QUERY SELECT 'send'::text, v_now, 0;
        RETURN;
    END IF;

    IF v_held_at IS NULL OR v_worst_in <> v_held_in THEN
        UPDATE outbox.rate_windows w
           SET slots = (SELECT array_agg(s ORDER BY s) FROM (
                            SELECT s FROM unnest(w.slots || v_worst) AS s
                             WHERE s > v_now - make_interval(secs => w.window_ms::double precision / 1000::double precision)
                             ORDER BY s DESC LIMIT w.max_count) AS kept),
               updated_at = now()
         WHERE w.bucket = v_worst_in;
    END IF;
    v_wait := ceil(extract(epoch FROM v_worst - v_now) * 1000)::integer;
    UPDATE outbox.messages m SET rate_slot_at = v_worst, rate_bucket = v_worst_in WHERE m.id = p_id;
    UPDATE outbox.queue q
       SET leased = false,
           due_at = now() + make_interval(secs => v_wait::double precision / 1000::double precision),
           attempts = greatest(q.attempts - 1, 0), lease_owner = NULL, claim_id = NULL
     WHERE q.message_id = p_id;
    PERFORM outbox.log_lease_end(ARRAY[p_id], ARRAY[v_claimed], NULL, 'defer', p_worker);
    PERFORM set_config('outbox.hot', '', true);
    RETURN QUERY SELECT 'deferred'::text, v_worst, v_wait;
END
$$;

--------------------------------------------------------------------------------------------------
-- Readers: the state users see
--------------------------------------------------------------------------------------------------

-- 006's view, over outbox.live_messages (same columns).
CREATE OR REPLACE VIEW api.message AS
SELECT m.id,
       m.id                  AS object,
       m.parent,
       NULL::uuid            AS entity,
       'message'::text       AS entitycode,
       'Message'::text       AS entityname,
       NULL::uuid            AS class,
       m.class               AS classcode,
       initcap(m.class)      AS classlabel,
       NULL::uuid            AS type,
       'message.' || m.class AS typecode,
       initcap(m.class) || ' message' AS typename,
       NULL::text            AS typedescription,
       NULL::uuid            AS statetype,
       s.type_code           AS statetypecode,
       s.type_label          AS statetypename,
       s.id                  AS state,
       s.code                AS statecode,
       s.label               AS statelabel,
       m.created_at          AS created,
       m.updated_at          AS lastupdate,
       m.updated_at          AS operdate,
       m.code,
       m.subject             AS name,
       m.label,
       m.description,
       NULL::uuid            AS agenttype,
       a.type_code           AS agenttypecode,
       CASE a.type_code WHEN 'system.agent' THEN 'System' WHEN 'email.agent' THEN 'E-mail'
                        WHEN 'api.agent' THEN 'API' ELSE a.type_code END AS agenttypename,
       NULL::text            AS agenttypedescription,
       a.id                  AS agent,
       a.code                AS agentcode,
       a.name                AS agentname,
       a.description         AS agentdescription,
       m.profile,
       m.address,
       m.subject,
       m.content,
       m.priority,
       CASE WHEN m.priority < 0 THEN 'low' WHEN m.priority = 0 THEN 'medium'
            WHEN m.priority < 10 THEN 'high' ELSE 'critical' END AS prioritycode,
       CASE WHEN m.priority < 0 THEN 'Low' WHEN m.priority = 0 THEN 'Medium'
            WHEN m.priority < 10 THEN 'High' ELSE 'Critical' END AS priorityname,
       NULL::text            AS prioritydescription,
       NULL::uuid            AS owner,
       NULL::text            AS ownercode,
       NULL::text            AS ownername,
       NULL::uuid            AS oper,
       NULL::text            AS opercode,
       NULL::text            AS opername,
       NULL::uuid            AS area,
       NULL::text            AS areacode,
       NULL::text            AS areaname,
       NULL::text            AS areadescription,
       NULL::uuid            AS scope,
       NULL::text            AS scopecode,
       NULL::text            AS scopename,
       NULL::text            AS scopedescription,
       -- outboxd's own
       m.send_at             AS sendat,
       m.next_attempt_at     AS nextattemptat,
       m.attempts,
       m.max_attempts        AS maxattempts,
       m.lease_owner         AS leaseowner,
       m.lease_expires_at    AS leaseexpiresat,
       m.last_error_code     AS lasterrorcode,
       m.provider_message_id AS providermessageid
  FROM outbox.live_messages m
  JOIN outbox.agents a ON a.id = m.agent_id
  JOIN outbox.states s ON s.code = m.state;

-- 015's views, over outbox.live_messages.
CREATE OR REPLACE VIEW api.task_runs AS
SELECT r.id, r.task_id, t.name AS task, r.run_no, r.due_at, r.trigger, r.state, r.last_error, r.enqueued,
       count(m.id) FILTER (WHERE m.state = 'submitted')                          AS sent,
       count(m.id) FILTER (WHERE m.state = 'failed')                             AS failed,
       count(m.id) FILTER (WHERE m.state IN ('created', 'prepared', 'sending'))  AS pending,
       count(m.id) FILTER (WHERE m.state = 'deleted')                            AS deleted,
       count(tm.first_read_at)                                                   AS read,
       r.created_at, r.enqueued_at
  FROM outbox.task_runs r
  JOIN outbox.tasks t ON t.id = r.task_id
  LEFT JOIN outbox.task_messages tm ON tm.run_id = r.id
  LEFT JOIN outbox.live_messages m ON m.id = tm.message_id
 GROUP BY r.id, t.name;

CREATE OR REPLACE VIEW api.task_messages AS
SELECT tm.run_id, r.task_id, t.name AS task, r.run_no, tm.address, tm.message_id, m.state,
       m.attempts, m.last_error_code AS error_code,
       (SELECT a.error_text FROM outbox.attempts a WHERE a.message_id = m.id
         ORDER BY a.id DESC LIMIT 1)                                             AS error_text,
       m.updated_at, tm.read_token IS NOT NULL AS has_read_link, tm.first_read_at,
       tm.last_read_at, tm.read_count
  FROM outbox.task_messages tm
  JOIN outbox.task_runs r ON r.id = tm.run_id
  JOIN outbox.tasks t ON t.id = r.task_id
  JOIN outbox.live_messages m ON m.id = tm.message_id;

--------------------------------------------------------------------------------------------------
-- Retention: "finished" as users see it
--------------------------------------------------------------------------------------------------

-- 017's clear_content, the finished messages found through outbox.live_messages.
CREATE OR REPLACE FUNCTION outbox.clear_content(p_older_than interval, p_limit integer)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_count integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7310593858634612081) THEN
        RETURN -1;
    END IF;
    WITH doomed AS (
        SELECT d.id FROM outbox.messages d
         WHERE d.id IN (SELECT l.id FROM outbox.live_messages l
                         WHERE (l.class = 'outbox' AND l.state IN ('submitted', 'failed', 'deleted')
                                AND l.updated_at < now() - p_older_than)
                            OR (l.class = 'inbox' AND l.created_at < now() - p_older_than))
           AND (d.content IS NOT NULL
                OR EXISTS (SELECT 1 FROM outbox.message_templates t
                            WHERE t.message_id = d.id AND t.vars <> '{}'::jsonb)
                OR EXISTS (SELECT 1 FROM outbox.task_messages tm
                            WHERE tm.message_id = d.id AND tm.body IS NOT NULL))
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    ), cleared AS (
        UPDATE outbox.messages m SET content = NULL
          FROM doomed WHERE m.id = doomed.id
        RETURNING 1
    ), vars AS (
        UPDATE outbox.message_templates t SET vars = '{}'::jsonb
          FROM doomed WHERE t.message_id = doomed.id AND t.vars <> '{}'::jsonb
    ), bodies AS (
        UPDATE outbox.task_messages tm SET body = NULL
          FROM doomed WHERE tm.message_id = doomed.id AND tm.body IS NOT NULL
    )
    SELECT count(*) INTO v_count FROM cleared;
    RETURN v_count;
END
$$;

-- 017's preview, the same way.
CREATE OR REPLACE FUNCTION outbox.retention_preview(p_content_after interval, p_delete_after interval,
                                                    OUT content_rows bigint, OUT delete_rows bigint,
                                                    OUT task_body_rows bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, outbox, pg_temp AS $$
    WITH due AS (
        SELECT d.id FROM outbox.live_messages d
         WHERE p_content_after IS NOT NULL
           AND ((d.class = 'outbox' AND d.state IN ('submitted', 'failed', 'deleted')
                 AND d.updated_at < now() - p_content_after)
                OR (d.class = 'inbox' AND d.created_at < now() - p_content_after))
    ), content AS (
        SELECT d.id FROM due d JOIN outbox.messages m ON m.id = d.id
         WHERE m.content IS NOT NULL
            OR EXISTS (SELECT 1 FROM outbox.message_templates t
                        WHERE t.message_id = d.id AND t.vars <> '{}'::jsonb)
            OR EXISTS (SELECT 1 FROM outbox.task_messages tm
                        WHERE tm.message_id = d.id AND tm.body IS NOT NULL)
    )
    SELECT (SELECT count(*) FROM content),
           (SELECT count(*) FROM outbox.live_messages d
             WHERE p_delete_after IS NOT NULL AND d.class = 'outbox'
               AND d.state IN ('submitted', 'failed', 'deleted')
               AND d.updated_at < now() - p_delete_after),
           (SELECT count(*) FROM due d JOIN outbox.task_messages tm ON tm.message_id = d.id
             WHERE tm.body IS NOT NULL)
$$;

-- 022's purge, the same way.
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
         WHERE d.id IN (SELECT l.id FROM outbox.live_messages l
                         WHERE l.class = 'outbox' AND l.state IN ('submitted', 'failed', 'deleted')
                           AND l.updated_at < now() - p_older_than)
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

-- 022's drop, which first writes into outbox.messages the state of the messages whose deciding
-- attempt is in a week about to go (no history: the state does not change for users).
CREATE OR REPLACE FUNCTION outbox.drop_log_partitions(p_older_than interval) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_cutoff  timestamptz := now() - p_older_than;
    v_part    record;
    v_dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, 22);
    PERFORM set_config('outbox.hot', 'on', true);
    UPDATE outbox.messages m
       SET state = l.state, attempts = l.attempts, last_error_code = l.last_error_code,
           provider_message_id = l.provider_message_id, label = l.label,
           claim_id = l.claim_id, claimed_at = l.claimed_at, updated_at = l.updated_at,
           lease_owner = NULL, lease_expires_at = NULL
      FROM outbox.live_messages l
     WHERE l.id = m.id AND m.class = 'outbox' AND m.state IN ('prepared', 'sending')
       AND l.state NOT IN ('prepared', 'sending')
       AND NOT EXISTS (SELECT 1 FROM outbox.attempts t
                        WHERE t.message_id = m.id AND t.to_state IS NOT NULL
                          AND t.finished_at >= v_cutoff);
    PERFORM set_config('outbox.hot', '', true);
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

GRANT SELECT ON outbox.live_messages TO outboxd_daemon;
GRANT SELECT ON outbox.queue TO outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (23, 'write_once');

COMMIT;
