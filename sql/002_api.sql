-- 002_api.sql — the public SQL surface (schema `api`) and the daemon's hot path.
--
-- `api.*` keeps the names, argument order and return shapes of the Apostol platform's message
-- module (api.send_message, api.add_outbox, api.outbox, api.get_service_message,
-- api.execute_object_action, api.add_inbox, api.set_object_label), so applications and DBAs enqueue
-- and inspect with plain SQL. Agents may be given by id or by code.
--
-- `outbox.claim`, `outbox.extend_leases`, `outbox.record_outcomes`, `outbox.reclaim_expired` and
-- `outbox.release` are the daemon's set-based hot path: one round trip per batch, every state change
-- validated and logged by the trigger of 001 (the same state machine as execute_object_action).
--
-- Error codes raised here (in the message text, before the colon):
--   ERR-400-029  unknown action            ERR-400-032  action not allowed in the current state
--   ERR-400-030  message not found         ERR-400-031  agent not found

BEGIN;

--------------------------------------------------------------------------------------------------
-- The view every reader uses
--------------------------------------------------------------------------------------------------

-- Columns carry Apostol's names, in Apostol's order, for the parts of its object model outboxd has;
-- outboxd's own columns (attempts, schedule, lease, last error) follow.
CREATE VIEW api.service_message AS
SELECT m.id,
       m.id                AS object,
       m.parent,
       m.class             AS classcode,
       initcap(m.class)    AS classlabel,
       m.class || '.message' AS typecode,
       initcap(m.class) || ' message' AS typename,
       s.type_code         AS statetypecode,
       s.type_label        AS statetypename,
       s.id                AS state,
       s.code              AS statecode,
       s.label             AS statelabel,
       m.created_at        AS created,
       m.updated_at        AS lastupdate,
       m.updated_at        AS operdate,
       m.code,
       m.subject           AS name,
       m.label,
       m.description,
       a.type_code         AS agenttypecode,
       a.id                AS agent,
       a.code              AS agentcode,
       a.name              AS agentname,
       a.description       AS agentdescription,
       m.profile,
       m.address,
       m.subject,
       m.content,
       m.priority,
       CASE WHEN m.priority > 0 THEN 'high' WHEN m.priority < 0 THEN 'low' ELSE 'medium' END AS prioritycode,
       m.send_at           AS sendat,
       m.next_attempt_at   AS nextattemptat,
       m.attempts,
       m.max_attempts      AS maxattempts,
       m.lease_owner       AS leaseowner,
       m.lease_expires_at  AS leaseexpiresat,
       m.last_error_code   AS lasterrorcode,
       m.provider_message_id AS providermessageid
  FROM outbox.messages m
  JOIN outbox.agents a ON a.id = m.agent_id
  JOIN outbox.states s ON s.code = m.state;

COMMENT ON VIEW api.service_message IS 'Messages as Apostol''s api.service_message shows them';

-- Attempts and history, for inspection.
CREATE VIEW api.message_attempt AS
SELECT t.message_id, t.attempt, t.outcome, t.error_code, t.error_text, t.remote_status,
       t.provider_message_id, t.duration_ms, t.worker, t.finished_at
  FROM outbox.attempts t;

CREATE VIEW api.message_history AS
SELECT h.message_id, h.old_state, h.new_state, h.action, h.changed_at, h.changed_by
  FROM outbox.history h;

--------------------------------------------------------------------------------------------------
-- Lookups
--------------------------------------------------------------------------------------------------

-- An agent by id (as text) or by code; raises ERR-400-031 when there is none.
CREATE FUNCTION outbox.agent_id(pAgent text) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_id uuid;
BEGIN
    IF pAgent ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        SELECT id INTO v_id FROM outbox.agents WHERE id = pAgent::uuid;
    ELSE
        SELECT id INTO v_id FROM outbox.agents WHERE code = pAgent;
    END IF;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'ERR-400-031: agent "%" not found', pAgent USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_id;
END
$$;

CREATE FUNCTION api.outbox(pState text) RETURNS SETOF api.service_message
LANGUAGE sql STABLE AS $$
    SELECT * FROM api.service_message
     WHERE classcode = 'outbox' AND statecode = pState
     ORDER BY priority DESC, created
$$;

CREATE FUNCTION api.get_service_message(pId uuid) RETURNS SETOF api.service_message
LANGUAGE sql STABLE AS $$
    SELECT * FROM api.service_message WHERE id = pId
$$;

--------------------------------------------------------------------------------------------------
-- Enqueueing
--------------------------------------------------------------------------------------------------

-- Inserts an outbox message in state "created" unless one with the same code exists for the agent
-- (the idempotency key). Returns the message id and whether it was created by this call.
CREATE FUNCTION outbox.insert_outbox(
    pParent uuid, pAgent text, pCode text, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text, pDescription text, pPriority integer, pSendAt timestamptz, pMaxAttempts integer,
    OUT id uuid, OUT created boolean
)
LANGUAGE plpgsql AS $$
DECLARE
    v_agent uuid := outbox.agent_id(pAgent);
    v_code  text := coalesce(nullif(pCode, ''), outbox.random_code());
BEGIN
    INSERT INTO outbox.messages AS m (class, parent, agent_id, code, profile, address, subject, content,
                                      label, description, priority, send_at, max_attempts)
    VALUES ('outbox', pParent, v_agent, v_code, coalesce(nullif(pProfile, ''), 'default'), pAddress,
            pSubject, pContent, pLabel, pDescription, coalesce(pPriority, 0), pSendAt, pMaxAttempts)
    ON CONFLICT (agent_id, code) WHERE class = 'outbox' DO NOTHING
    RETURNING m.id INTO id;
    created := id IS NOT NULL;
    IF NOT created THEN
        SELECT m.id INTO id FROM outbox.messages m
         WHERE m.class = 'outbox' AND m.agent_id = v_agent AND m.code = v_code;
    END IF;
END
$$;

-- Creates an outbox message in state "created". With a code that already exists for the agent,
-- returns the existing message instead (idempotency key).
CREATE FUNCTION api.add_outbox(
    pParent uuid, pAgent text, pCode text, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text DEFAULT NULL, pDescription text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE sql AS $$
    SELECT id FROM outbox.insert_outbox(pParent, pAgent, pCode, pProfile, pAddress, pSubject, pContent,
                                        pLabel, pDescription, pPriority, pSendAt, pMaxAttempts)
$$;

CREATE FUNCTION api.add_outbox(
    pParent uuid, pAgent uuid, pCode text, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text DEFAULT NULL, pDescription text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE sql AS $$
    SELECT api.add_outbox(pParent, pAgent::text, pCode, pProfile, pAddress, pSubject, pContent,
                          pLabel, pDescription, pPriority, pSendAt, pMaxAttempts)
$$;

-- Creates and submits in one call: the message is "prepared" (and NOTIFY outbox sent at commit)
-- when it returns. A pCode that already exists for the agent returns the existing message untouched.
CREATE FUNCTION api.send_message(
    pParent uuid, pAgent text, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text DEFAULT NULL, pDescription text DEFAULT NULL, pCode text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v record;
BEGIN
    SELECT * INTO v FROM outbox.insert_outbox(pParent, pAgent, pCode, pProfile, pAddress, pSubject,
                                              pContent, pLabel, pDescription, pPriority, pSendAt,
                                              pMaxAttempts);
    IF v.created THEN
        PERFORM api.execute_object_action(v.id, 'submit');
    END IF;
    RETURN v.id;
END
$$;

CREATE FUNCTION api.send_message(
    pParent uuid, pAgent uuid, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text DEFAULT NULL, pDescription text DEFAULT NULL, pCode text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE sql AS $$
    SELECT api.send_message(pParent, pAgent::text, pProfile, pAddress, pSubject, pContent,
                            pLabel, pDescription, pCode, pPriority, pSendAt, pMaxAttempts)
$$;

-- Stores a provider's reply as an inbox message whose parent is the outbox message.
CREATE FUNCTION api.add_inbox(
    pParent uuid, pAgent text, pCode text, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text DEFAULT NULL, pDescription text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql AS $$
    INSERT INTO outbox.messages (class, parent, agent_id, code, profile, address, subject, content,
                                 label, description)
    VALUES ('inbox', pParent, outbox.agent_id(pAgent), coalesce(nullif(pCode, ''), outbox.random_code()),
            coalesce(nullif(pProfile, ''), 'default'), pAddress, pSubject, pContent, pLabel, pDescription)
    RETURNING id
$$;

CREATE FUNCTION api.add_inbox(
    pParent uuid, pAgent uuid, pCode text, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text DEFAULT NULL, pDescription text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql AS $$
    SELECT api.add_inbox(pParent, pAgent::text, pCode, pProfile, pAddress, pSubject, pContent,
                         pLabel, pDescription)
$$;

--------------------------------------------------------------------------------------------------
-- Actions
--------------------------------------------------------------------------------------------------

-- Runs one action of the state machine. Returns Apostol's jsonb shape:
-- {"action": {"id", "code"}, "method", "object", "newstate": {"id", "code", "label", "type", "typecode"}}.
-- pParams (optional): {"lease_seconds": n} for "send" (default 300): how long an external sender
-- may hold the message before outboxd reclaims it.
CREATE FUNCTION api.execute_object_action(pObject uuid, pAction text, pParams jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
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

    SELECT state INTO v_state FROM outbox.messages WHERE id = pObject FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ERR-400-030: message "%" not found', pObject USING ERRCODE = 'no_data_found';
    END IF;

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
                                   THEN now() + make_interval(secs => coalesce((pParams ->> 'lease_seconds')::numeric, 300))
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

-- Sets the label. Like Apostol, reports its own errors in result/message instead of raising.
CREATE FUNCTION api.set_object_label(pObject uuid, pLabel text)
RETURNS TABLE (id uuid, result boolean, message text)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE outbox.messages m SET label = pLabel, updated_at = now() WHERE m.id = pObject;
    IF FOUND THEN
        RETURN QUERY SELECT pObject, true, 'Success'::text;
    ELSE
        RETURN QUERY SELECT pObject, false, format('ERR-400-030: message "%s" not found', pObject);
    END IF;
END
$$;

--------------------------------------------------------------------------------------------------
-- The daemon's hot path
--------------------------------------------------------------------------------------------------

-- Claims up to p_limit due prepared messages for p_worker: moves them to "sending" with a lease
-- and returns what a connector needs. SKIP LOCKED lets several daemons claim concurrently without
-- blocking or double delivery.
CREATE FUNCTION outbox.claim(p_worker text, p_limit integer, p_lease_ms integer)
RETURNS TABLE (id uuid, code text, agenttypecode text, agentcode text, profile text, address text,
               subject text, content text, label text, attempts integer, max_attempts integer,
               priority integer, created timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('outbox.action', 'send', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    RETURN QUERY
    WITH due AS (
        SELECT d.id FROM outbox.messages d
         WHERE d.state = 'prepared' AND d.next_attempt_at <= now()
         ORDER BY d.priority DESC, d.next_attempt_at
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox.messages m
       SET state = 'sending',
           attempts = m.attempts + 1,
           lease_owner = p_worker,
           lease_expires_at = now() + p_lease_ms * interval '1 millisecond',
           updated_at = now()
      FROM due, outbox.agents a
     WHERE m.id = due.id AND a.id = m.agent_id
    RETURNING m.id, m.code, a.type_code, a.code, m.profile, m.address, m.subject, m.content, m.label,
              m.attempts, m.max_attempts, m.priority, m.created_at;
END
$$;

-- Heartbeat: extends the leases p_worker still holds; returns how many it still holds.
CREATE FUNCTION outbox.extend_leases(p_worker text, p_ids uuid[], p_lease_ms integer) RETURNS integer
LANGUAGE sql AS $$
    WITH extended AS (
        UPDATE outbox.messages m
           SET lease_expires_at = now() + p_lease_ms * interval '1 millisecond'
         WHERE m.id = ANY (p_ids) AND m.state = 'sending' AND m.lease_owner = p_worker
        RETURNING 1
    )
    SELECT count(*)::integer FROM extended
$$;

-- Records a batch of delivery outcomes in one round trip: one attempt row each, and the transition
-- done → submitted, retry → prepared (due after p_retry_delay_ms), failed → failed. Only messages
-- whose lease p_worker still holds change state (a reclaimed message belongs to someone else now);
-- the attempt is recorded either way. Replies (non-null p_replies of done messages) are stored as
-- inbox messages. Returns the messages that changed state, with their new state.
CREATE FUNCTION outbox.record_outcomes(
    p_worker text, p_ids uuid[], p_outcomes text[], p_error_codes text[], p_error_texts text[],
    p_remote_status integer[], p_provider_ids text[], p_duration_ms integer[],
    p_retry_delay_ms integer[], p_replies text[]
) RETURNS TABLE (id uuid, state text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('outbox.action', 'retry', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_outcomes, p_error_codes, p_error_texts, p_remote_status,
                             p_provider_ids, p_duration_ms, p_retry_delay_ms, p_replies)
               AS u(id, outcome, error_code, error_text, remote_status, provider_id, duration_ms,
                    retry_delay_ms, reply)
    ), updated AS (
        UPDATE outbox.messages m
           SET state = CASE i.outcome WHEN 'done' THEN 'submitted' WHEN 'retry' THEN 'prepared' ELSE 'failed' END,
               next_attempt_at = CASE WHEN i.outcome = 'retry'
                                      THEN now() + coalesce(i.retry_delay_ms, 0) * interval '1 millisecond'
                                      ELSE m.next_attempt_at END,
               last_error_code = CASE WHEN i.outcome = 'done' THEN NULL ELSE i.error_code END,
               provider_message_id = coalesce(i.provider_id, m.provider_message_id),
               label = CASE WHEN i.outcome = 'done' AND m.label IS NULL THEN i.provider_id ELSE m.label END,
               lease_owner = NULL,
               lease_expires_at = NULL,
               updated_at = now()
          FROM input i
         WHERE m.id = i.id AND m.state = 'sending' AND m.lease_owner = p_worker
        RETURNING m.id, m.state, m.agent_id, m.profile, m.address, m.subject, i.reply, i.outcome
    ), attempts AS (
        INSERT INTO outbox.attempts (message_id, attempt, worker, outcome, error_code, error_text,
                                     remote_status, provider_message_id, duration_ms)
        SELECT i.id, m.attempts, p_worker, i.outcome, i.error_code, i.error_text, i.remote_status,
               i.provider_id, i.duration_ms
          FROM input i JOIN outbox.messages m ON m.id = i.id
    ), replies AS (
        INSERT INTO outbox.messages (class, parent, agent_id, profile, address, subject, content)
        -- From `updated` alone: joined back to `input` (estimated at one row) this was a nested
        -- loop, O(rows²) per batch.
        SELECT 'inbox', u.id, u.agent_id, u.profile, u.address, u.subject, u.reply
          FROM updated u
         WHERE u.reply IS NOT NULL AND u.outcome = 'done'
    )
    SELECT u.id, u.state FROM updated u;
END
$$;

-- Reclaims messages whose lease expired (their daemon died or hung): back to prepared, due now.
-- The interrupted attempt is recorded but does not count against max_attempts — except that a
-- message whose lease expired 5 times (it kills or hangs every daemon that takes it) is failed
-- with code lease-expired instead of being handed out forever.
CREATE FUNCTION outbox.reclaim_expired(p_worker text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM set_config('outbox.action', 'reclaim', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    WITH expired AS (
        SELECT e.id, e.lease_owner, e.attempts,
               (SELECT count(*) FROM outbox.attempts t
                 WHERE t.message_id = e.id AND t.error_code = 'lease-expired') AS expiries
          FROM outbox.messages e
         WHERE e.state = 'sending' AND e.lease_expires_at < now()
         FOR UPDATE SKIP LOCKED
    ), updated AS (
        UPDATE outbox.messages m
           SET state = CASE WHEN e.expiries >= 4 THEN 'failed' ELSE 'prepared' END,
               next_attempt_at = now(), attempts = greatest(m.attempts - 1, 0),
               lease_owner = NULL, lease_expires_at = NULL, last_error_code = 'lease-expired',
               updated_at = now()
          FROM expired e
         WHERE m.id = e.id
        RETURNING m.id
    ), logged AS (
        INSERT INTO outbox.attempts (message_id, attempt, worker, outcome, error_code, error_text)
        SELECT e.id, e.attempts, e.lease_owner,
               CASE WHEN e.expiries >= 4 THEN 'failed' ELSE 'interrupted' END, 'lease-expired',
               CASE WHEN e.expiries >= 4
                    THEN 'the lease expired for the 5th time: the message kills or hangs every daemon that takes it'
                    ELSE 'the lease expired before the outcome was recorded (daemon killed or hung)' END
          FROM expired e JOIN updated u ON u.id = e.id
    )
    SELECT count(*) INTO v_count FROM updated;
    RETURN v_count;
END
$$;

-- Hands messages back on shutdown: prepared again after p_delay_ms, not counted as an attempt.
CREATE FUNCTION outbox.release(p_worker text, p_ids uuid[], p_delay_ms integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM set_config('outbox.action', 'release', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    WITH updated AS (
        UPDATE outbox.messages m
           SET state = 'prepared',
               next_attempt_at = now() + p_delay_ms * interval '1 millisecond',
               attempts = greatest(m.attempts - 1, 0),
               lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE m.id = ANY (p_ids) AND m.state = 'sending' AND m.lease_owner = p_worker
        RETURNING m.id, m.attempts
    ), logged AS (
        INSERT INTO outbox.attempts (message_id, attempt, worker, outcome, error_code, error_text)
        SELECT u.id, u.attempts + 1, p_worker, 'interrupted', 'shutdown',
               'handed back by a daemon shutting down'
          FROM updated u
    )
    SELECT count(*) INTO v_count FROM updated;
    RETURN v_count;
END
$$;

--------------------------------------------------------------------------------------------------
-- Housekeeping
--------------------------------------------------------------------------------------------------

-- Deletes finished outbox messages (submitted, failed, deleted) last changed before
-- now() - p_older_than, with their inbox replies, attempts and history. Returns how many outbox
-- messages went. Run it from cron or pg_cron, e.g. SELECT outbox.purge('30 days').
CREATE FUNCTION outbox.purge(p_older_than interval) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    WITH doomed AS (
        SELECT d.id FROM outbox.messages d
         WHERE d.class = 'outbox' AND d.state IN ('submitted', 'failed', 'deleted')
           AND d.updated_at < now() - p_older_than
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

INSERT INTO outbox.schema_migrations (version, name) VALUES (2, 'api');

COMMIT;
