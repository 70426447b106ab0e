-- 006_apostol.sql — the SQL surface shaped like Apostol's where applications touch it (issue 13).
--
-- Why: an application written for the Apostol db-platform enqueues with
--   SELECT id FROM api.send_message(null, (SELECT id FROM api.agent WHERE code = 'smtp.agent'),
--                                   'noreply@example.com', 'user@example.com', 'Hello', 'Body');
-- which needs an `api.agent` view and an `api.send_message` that returns the message row. This
-- migration adds, with Apostol's names (see ../shared/apostol.md and the README, "Apostol
-- compatibility"):
--
--   * the views `api.message` (every message), `api.outbox` and `api.inbox` (one class each), and
--     `api.service_message` again: Apostol's 56 columns in Apostol's order, then outboxd's own
--     (sendat, nextattemptat, attempts, maxattempts, leaseowner, leaseexpiresat, lasterrorcode,
--     providermessageid). Columns of the platform's object model that outboxd has no table for are
--     present: the uuids entity, class, type, statetype, agenttype, owner, oper, area, scope are
--     NULL; entitycode/entityname are the constants 'message'/'Message'; owner*, oper*, area*,
--     scope* are NULL. `typecode` is 'message.outbox' / 'message.inbox' (002 said 'outbox.message').
--   * priority codes: `priority` stays outboxd's integer (higher is delivered first);
--     `prioritycode` is low (< 0), medium (0, the default), high (1 to 9), critical (10 and more).
--     The view `api.priority` lists the codes with the integer to pass as pPriority.
--   * `api.agent`: the agents, with the object columns Apostol's view starts with.
--   * `api.send_message` returns `SETOF api.message` (callers write `SELECT id FROM …`); its
--     arguments are unchanged: Apostol's eight in Apostol's order (pParent, pAgent, pProfile,
--     pAddress, pSubject, pContent, pLabel, pDescription), then outboxd's named extras
--     (pCode, pPriority, pSendAt, pMaxAttempts).
--   * `api.outbox(pState uuid)` beside `api.outbox(pState text)`; both return `SETOF api.outbox`,
--     `api.get_service_message` returns `SETOF api.service_message`.
--   * `api.execute_object_action(pObject uuid, pCode text, pParams jsonb)` (002 named the second
--     parameter pAction) and an overload taking the action's uuid (`outbox.actions.id`).
--   * the action codes Apostol knows that no outboxd state allows (edit, enable, drop, …) are
--     listed in outbox.actions without transitions, so they are answered with ERR-400-032 (not
--     allowed in the current state), as Apostol does, instead of ERR-400-029 (unknown action).
--
-- Rights (see 004): the views are readable by outboxd_app and outboxd_daemon; send_message is
-- SECURITY DEFINER (it inserts into outbox.messages); the readers and execute_object_action are
-- not (views and outbox.object_action/daemon_action carry the rights; execute_object_action must
-- run as the caller so that send/done/fail stay the daemon's).

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

--------------------------------------------------------------------------------------------------
-- Views with Apostol's columns
--------------------------------------------------------------------------------------------------

-- The readers of 002 return the old view's row type: dropped here and created again below.
DROP FUNCTION api.outbox(text);
DROP FUNCTION api.get_service_message(uuid);
DROP FUNCTION api.send_message(uuid, text, text, text, text, text, text, text, text, integer, timestamptz, integer);
DROP FUNCTION api.send_message(uuid, uuid, text, text, text, text, text, text, text, integer, timestamptz, integer);
DROP VIEW api.service_message;

CREATE VIEW api.message AS
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
  FROM outbox.messages m
  JOIN outbox.agents a ON a.id = m.agent_id
  JOIN outbox.states s ON s.code = m.state;

COMMENT ON VIEW api.message IS
    'Messages with Apostol''s 56 columns in Apostol''s order, then outboxd''s own';

-- The same rows and columns under Apostol's other names (views over views are flattened by the
-- planner: the indexes of outbox.messages serve all of them).
CREATE VIEW api.service_message AS SELECT * FROM api.message;
CREATE VIEW api.outbox AS SELECT * FROM api.message WHERE classcode = 'outbox';
CREATE VIEW api.inbox AS SELECT * FROM api.message WHERE classcode = 'inbox';

COMMENT ON VIEW api.service_message IS 'Messages as Apostol''s api.service_message shows them';
COMMENT ON VIEW api.outbox IS 'Outbox messages (typecode message.outbox)';
COMMENT ON VIEW api.inbox IS 'Inbox messages: replies stored by api.add_inbox (typecode message.inbox)';

-- Priority codes and the integer each stands for (pass it as pPriority).
CREATE VIEW api.priority (code, name, description, value) AS
VALUES ('low',      'Low',      'Delivered after the others (priority < 0)',   -1),
       ('medium',   'Medium',   'The default (priority 0)',                     0),
       ('high',     'High',     'Delivered before medium (priority 1 to 9)',    1),
       ('critical', 'Critical', 'Delivered first (priority 10 and more)',      10);

-- The agents, with the object columns Apostol's api.agent starts with; the platform's others
-- (owner, oper, area, scope, vendor …) are not reproduced.
CREATE VIEW api.agent AS
SELECT a.id,
       a.id              AS object,
       NULL::uuid        AS parent,
       NULL::uuid        AS entity,
       'agent'::text     AS entitycode,
       'Agent'::text     AS entityname,
       NULL::uuid        AS class,
       'agent'::text     AS classcode,
       'Agent'::text     AS classlabel,
       NULL::uuid        AS type,
       a.type_code       AS typecode,
       CASE a.type_code WHEN 'system.agent' THEN 'System' WHEN 'email.agent' THEN 'E-mail'
                        WHEN 'api.agent' THEN 'API' ELSE a.type_code END AS typename,
       NULL::text        AS typedescription,
       a.code,
       a.name,
       a.name            AS label,
       a.description
  FROM outbox.agents a;

COMMENT ON VIEW api.agent IS 'Agents; applications look an agent''s id up by code';

--------------------------------------------------------------------------------------------------
-- Readers
--------------------------------------------------------------------------------------------------

-- Ordered as 002's: priority first, then age (Apostol's callers add ORDER BY created).
CREATE FUNCTION api.outbox(pState text) RETURNS SETOF api.outbox
LANGUAGE sql STABLE SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.outbox WHERE statecode = pState ORDER BY priority DESC, created
$$;

CREATE FUNCTION api.outbox(pState uuid) RETURNS SETOF api.outbox
LANGUAGE sql STABLE SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.outbox WHERE state = pState ORDER BY priority DESC, created
$$;

CREATE FUNCTION api.get_service_message(pId uuid) RETURNS SETOF api.service_message
LANGUAGE sql STABLE SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.service_message WHERE id = pId
$$;

--------------------------------------------------------------------------------------------------
-- send_message returns the row
--------------------------------------------------------------------------------------------------

-- Creates and submits in one call: the message is "prepared" (NOTIFY outbox at commit) when it
-- returns. A pCode that already exists for the agent returns the existing message untouched.
-- SECURITY DEFINER: inserts into outbox.messages, which applications may not write.
CREATE FUNCTION api.send_message(
    pParent uuid, pAgent text, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text DEFAULT NULL, pDescription text DEFAULT NULL, pCode text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v record;
BEGIN
    SELECT * INTO v FROM outbox.insert_outbox(pParent, pAgent, pCode, pProfile, pAddress, pSubject,
                                              pContent, pLabel, pDescription, pPriority, pSendAt,
                                              pMaxAttempts);
    IF v.created THEN
        PERFORM outbox.run_action(v.id, 'submit', NULL, false);
    END IF;
    RETURN QUERY SELECT * FROM api.message WHERE id = v.id;
END
$$;

-- The agent by id (Apostol's call). SECURITY DEFINER like the text one (it only calls it).
CREATE FUNCTION api.send_message(
    pParent uuid, pAgent uuid, pProfile text, pAddress text, pSubject text, pContent text,
    pLabel text DEFAULT NULL, pDescription text DEFAULT NULL, pCode text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.send_message(pParent, pAgent::text, pProfile, pAddress, pSubject, pContent,
                                   pLabel, pDescription, pCode, pPriority, pSendAt, pMaxAttempts)
$$;

--------------------------------------------------------------------------------------------------
-- Actions
--------------------------------------------------------------------------------------------------

-- Action codes of the platform that no state of an outbox message allows: known (so ERR-400-032,
-- naming the current state), never a transition.
INSERT INTO outbox.actions (code, label) VALUES
    ('abort', 'Abort'), ('accept', 'Accept'), ('add', 'Add'), ('approve', 'Approve'),
    ('check', 'Check'), ('complete', 'Complete'), ('confirm', 'Confirm'),
    ('disable', 'Disable'), ('drop', 'Drop'), ('edit', 'Edit'), ('enable', 'Enable'),
    ('execute', 'Execute'), ('open', 'Open'), ('plan', 'Plan'), ('postpone', 'Postpone'),
    ('prepare', 'Prepare'), ('reject', 'Reject'), ('reserve', 'Reserve'), ('return', 'Return'),
    ('save', 'Save'), ('start', 'Start'), ('stop', 'Stop'), ('update', 'Update')
ON CONFLICT (code) DO NOTHING;

-- Apostol names the second parameter pCode; 004's body otherwise. Not SECURITY DEFINER (see 004):
-- the caller's own EXECUTE right on outbox.daemon_action decides whether send/done/fail run.
DROP FUNCTION api.execute_object_action(uuid, text, jsonb);

CREATE FUNCTION api.execute_object_action(pObject uuid, pCode text, pParams jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
BEGIN
    IF has_function_privilege('outbox.daemon_action(uuid, text, jsonb)', 'EXECUTE') THEN
        RETURN outbox.daemon_action(pObject, pCode, pParams);
    END IF;
    RETURN outbox.object_action(pObject, pCode, pParams);
END
$$;

-- The action by its uuid (outbox.actions.id, also `action.id` of the answer). An unknown uuid is
-- ERR-400-029. Reads outbox.actions through outbox.action_code (applications may not read it).
CREATE FUNCTION outbox.action_code(pAction uuid) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_code text;
BEGIN
    SELECT a.code INTO v_code FROM outbox.actions a WHERE a.id = pAction AND NOT a.internal;
    IF v_code IS NULL THEN
        RAISE EXCEPTION 'ERR-400-029: unknown action "%"', pAction USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v_code;
END
$$;

CREATE FUNCTION api.execute_object_action(pObject uuid, pAction uuid, pParams jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT api.execute_object_action(pObject, outbox.action_code(pAction), pParams)
$$;

--------------------------------------------------------------------------------------------------
-- Grants (004's model)
--------------------------------------------------------------------------------------------------

REVOKE ALL ON api.message, api.service_message, api.outbox, api.inbox, api.priority, api.agent
    FROM PUBLIC;
GRANT SELECT ON api.message, api.service_message, api.outbox, api.inbox, api.priority, api.agent
    TO outboxd_app, outboxd_daemon;

REVOKE ALL ON FUNCTION api.outbox(text), api.outbox(uuid), api.get_service_message(uuid),
    api.send_message(uuid, text, text, text, text, text, text, text, text, integer, timestamptz, integer),
    api.send_message(uuid, uuid, text, text, text, text, text, text, text, integer, timestamptz, integer),
    api.execute_object_action(uuid, text, jsonb), api.execute_object_action(uuid, uuid, jsonb),
    outbox.action_code(uuid)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION api.outbox(text), api.outbox(uuid), api.get_service_message(uuid),
    api.send_message(uuid, text, text, text, text, text, text, text, text, integer, timestamptz, integer),
    api.send_message(uuid, uuid, text, text, text, text, text, text, text, integer, timestamptz, integer),
    api.execute_object_action(uuid, text, jsonb), api.execute_object_action(uuid, uuid, jsonb),
    outbox.action_code(uuid)
    TO outboxd_app, outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (6, 'apostol');

COMMIT;
