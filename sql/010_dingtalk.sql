-- 010_dingtalk.sql — DingTalk: convenience senders, work-notification send results, group chats
-- (issue 10).
--
-- Adds:
--   * api.send_dingbot: a DingTalk custom robot message (text, markdown, link, actionCard, with
--     @all / @mobiles / @userids) built from arguments and enqueued with api.send_message for
--     agent dingbot.agent;
--   * api.send_dingtalk: a DingTalk app message (work notification to users / departments /
--     everyone, or a group chat `chat:<chatid>`) for agent dingtalk.agent;
--   * outbox.dingtalk_send_results: one row per delivered work notification (its task_id is the
--     message's provider id), written by a trigger on the `done` attempt; the daemon later calls
--     DingTalk's getsendresult and stores the per-user outcome here (asyncsend_v2 only says the
--     task was accepted). api.dingtalk_send_results() reads it;
--   * outbox.dingtalk_chats: group chats requested with api.dingtalk_create_chat (or
--     `outboxd dingtalk chat-create`); the daemon calls chat/create and records the chatid.
--     api.dingtalk_chats() lists them;
--   * the daemon's functions: outbox.dingtalk_due_send_results, outbox.dingtalk_record_send_result,
--     outbox.dingtalk_claim_chats, outbox.dingtalk_record_chat.
--
-- HTTP calls are the daemon's (src/connector/dingtalk/poller.rs), never made from here.
--
-- Rights (see 004): the tables belong to the owner. Applications use the api functions (SECURITY
-- DEFINER, since they read or write the tables); the daemon claims and records through the
-- outbox.dingtalk_* functions (SECURITY DEFINER too: the daemon has no table writes).
--
-- Error codes raised here (in the message text, before the colon):
--   ERR-400-050  bad DingTalk argument (unknown msgtype, missing text or URL, no recipient)

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

--------------------------------------------------------------------------------------------------
-- Convenience senders
--------------------------------------------------------------------------------------------------

-- A DingTalk robot message: pType text | markdown | link | actionCard. pTitle is required for
-- markdown, link and actionCard; pUrl for link (messageUrl) and actionCard (singleURL, the button
-- pButton, default 'Read more'); pPicUrl for link. The @ lists apply to text and markdown (DingTalk
-- renders an @ only when the text also contains @<mobile>). Returns the message id; a pCode that
-- exists for the agent returns the existing message (the idempotency key).
-- SECURITY DEFINER: only to call api.send_message, which is.
CREATE FUNCTION api.send_dingbot(
    pProfile text, pType text, pText text, pTitle text DEFAULT NULL,
    pAtAll boolean DEFAULT false, pAtMobiles text[] DEFAULT NULL, pAtUserIds text[] DEFAULT NULL,
    pUrl text DEFAULT NULL, pPicUrl text DEFAULT NULL, pButton text DEFAULT NULL,
    pCode text DEFAULT NULL, pLabel text DEFAULT NULL, pPriority integer DEFAULT 0,
    pSendAt timestamptz DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_body jsonb;
    v_at   jsonb := jsonb_strip_nulls(jsonb_build_object(
                        'isAtAll', coalesce(pAtAll, false),
                        'atMobiles', to_jsonb(pAtMobiles),
                        'atUserIds', to_jsonb(pAtUserIds)));
BEGIN
    IF coalesce(pText, '') = '' THEN
        RAISE EXCEPTION 'ERR-400-050: a DingTalk robot message needs a text' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pType <> 'text' AND coalesce(pTitle, '') = '' THEN
        RAISE EXCEPTION 'ERR-400-050: a DingTalk robot % message needs a title', pType USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pType IN ('link', 'actionCard') AND coalesce(pUrl, '') = '' THEN
        RAISE EXCEPTION 'ERR-400-050: a DingTalk robot % message needs a URL', pType USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_body := CASE pType
        WHEN 'text' THEN jsonb_build_object('msgtype', 'text',
                 'text', jsonb_build_object('content', pText), 'at', v_at)
        WHEN 'markdown' THEN jsonb_build_object('msgtype', 'markdown',
                 'markdown', jsonb_build_object('title', pTitle, 'text', pText), 'at', v_at)
        WHEN 'link' THEN jsonb_build_object('msgtype', 'link',
                 'link', jsonb_strip_nulls(jsonb_build_object('title', pTitle, 'text', pText,
                                                              'messageUrl', pUrl, 'picUrl', pPicUrl)))
        WHEN 'actionCard' THEN jsonb_build_object('msgtype', 'actionCard',
                 'actionCard', jsonb_build_object('title', pTitle, 'text', pText,
                                                  'singleTitle', coalesce(pButton, 'Read more'),
                                                  'singleURL', pUrl))
    END;
    IF v_body IS NULL THEN
        RAISE EXCEPTION 'ERR-400-050: DingTalk robot msgtype "%" is not one of text, markdown, link, actionCard', pType
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN (SELECT m.id FROM api.send_message(NULL, 'dingbot.agent', pProfile, 'robot', pTitle,
                                              v_body::text, pLabel, NULL, pCode, pPriority, pSendAt) m);
END
$$;

-- A DingTalk app message. Recipients: pChat (a group chat, alone) or any of pUsers, pDepts and
-- pToAll (a work notification). Content: pMsg (DingTalk's msg object, e.g. an image with an
-- inline {"base64": …}, see the README) or else a text message of pText. Returns the message id.
-- SECURITY DEFINER: only to call api.send_message, which is.
CREATE FUNCTION api.send_dingtalk(
    pProfile text, pText text, pUsers text[] DEFAULT NULL, pDepts text[] DEFAULT NULL,
    pToAll boolean DEFAULT false, pChat text DEFAULT NULL, pMsg jsonb DEFAULT NULL,
    pCode text DEFAULT NULL, pLabel text DEFAULT NULL, pPriority integer DEFAULT 0,
    pSendAt timestamptz DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_address text;
    v_msg     jsonb := coalesce(pMsg, CASE WHEN coalesce(pText, '') <> ''
                                           THEN jsonb_build_object('msgtype', 'text',
                                                    'text', jsonb_build_object('content', pText)) END);
BEGIN
    IF v_msg IS NULL OR jsonb_typeof(v_msg) <> 'object' OR NOT v_msg ? 'msgtype' THEN
        RAISE EXCEPTION 'ERR-400-050: a DingTalk message needs a text or a msg object with a msgtype'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pChat IS NOT NULL THEN
        IF cardinality(pUsers) > 0 OR cardinality(pDepts) > 0 OR pToAll THEN
            RAISE EXCEPTION 'ERR-400-050: a DingTalk chat message has no other recipients'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_address := 'chat:' || pChat;
    ELSE
        v_address := concat_ws(';',
            CASE WHEN cardinality(pUsers) > 0 THEN 'users:' || array_to_string(pUsers, ',') END,
            CASE WHEN cardinality(pDepts) > 0 THEN 'depts:' || array_to_string(pDepts, ',') END,
            CASE WHEN pToAll THEN 'all' END);
        IF v_address = '' THEN
            RAISE EXCEPTION 'ERR-400-050: a DingTalk work notification needs users, departments or to_all'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    RETURN (SELECT m.id FROM api.send_message(NULL, 'dingtalk.agent', pProfile, v_address, NULL,
                                              v_msg::text, pLabel, NULL, pCode, pPriority, pSendAt) m);
END
$$;

--------------------------------------------------------------------------------------------------
-- Work-notification send results
--------------------------------------------------------------------------------------------------

CREATE TABLE outbox.dingtalk_send_results (
    -- CASCADE: retention deletes messages without knowing this table.
    message_id   uuid PRIMARY KEY REFERENCES outbox.messages (id) ON DELETE CASCADE,
    task_id      text NOT NULL,
    profile      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- getsendresult calls made so far; the next is due at next_poll_at (NULL: first one not yet
    -- scheduled, the daemon adds the profile's first delay to created_at).
    polls        integer NOT NULL DEFAULT 0,
    next_poll_at timestamptz,
    polled_at    timestamptz,
    -- No more calls: the last delay passed, or DingTalk refused the task for good.
    final        boolean NOT NULL DEFAULT false,
    -- The last `send_result` DingTalk returned.
    result       jsonb,
    error_code   text,
    error_text   text
);

CREATE INDEX dingtalk_send_results_due_idx ON outbox.dingtalk_send_results (profile, created_at)
    WHERE NOT final;

-- A delivered work notification (a done attempt of a dingtalk.agent message with a provider id,
-- not sent into a chat) gets its row. The WHEN clause keeps every other attempt free of cost.
-- SECURITY DEFINER: the daemon, which records attempts, has no rights on this table.
CREATE FUNCTION outbox.on_dingtalk_attempt_done() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
BEGIN
    INSERT INTO outbox.dingtalk_send_results (message_id, task_id, profile)
    SELECT m.id, NEW.provider_message_id, m.profile
      FROM outbox.messages m
      JOIN outbox.agents a ON a.id = m.agent_id
     WHERE m.id = NEW.message_id AND a.code = 'dingtalk.agent'
       AND coalesce(m.address, '') NOT LIKE 'chat:%'
    ON CONFLICT (message_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER attempts_dingtalk_done AFTER INSERT ON outbox.attempts
    FOR EACH ROW WHEN (NEW.outcome = 'done' AND NEW.provider_message_id IS NOT NULL)
    EXECUTE FUNCTION outbox.on_dingtalk_attempt_done();

-- The daemon's claim: up to p_limit rows of p_profile due for a getsendresult call (the first
-- p_first after the send), leased for five minutes so that no other daemon polls them meanwhile.
CREATE FUNCTION outbox.dingtalk_due_send_results(p_profile text, p_first interval, p_limit integer)
RETURNS TABLE (message_id uuid, task_id text, polls integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    UPDATE outbox.dingtalk_send_results r
       SET next_poll_at = now() + interval '5 minutes'
      FROM (SELECT d.message_id FROM outbox.dingtalk_send_results d
             WHERE d.profile = p_profile AND NOT d.final
               AND coalesce(d.next_poll_at, d.created_at + p_first) <= now()
             ORDER BY d.created_at
             LIMIT p_limit
               FOR UPDATE SKIP LOCKED) due
     WHERE r.message_id = due.message_id
    RETURNING r.message_id, r.task_id, r.polls
$$;

-- The daemon's record of one call: the send_result (or the error), and when the next call is
-- due (p_next_after NULL: none, the row is final).
CREATE FUNCTION outbox.dingtalk_record_send_result(
    p_message_id uuid, p_result jsonb, p_error_code text, p_error_text text, p_next_after interval
) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    UPDATE outbox.dingtalk_send_results
       SET polls = polls + 1, polled_at = now(),
           result = coalesce(p_result, result),
           error_code = p_error_code, error_text = p_error_text,
           next_poll_at = now() + p_next_after,
           final = p_next_after IS NULL
     WHERE message_id = p_message_id
$$;

-- Send results, newest first (one message: pMessage), with DingTalk's per-user lists picked out.
-- SECURITY DEFINER: applications may not read the table.
CREATE FUNCTION api.dingtalk_send_results(pMessage uuid DEFAULT NULL)
RETURNS TABLE (message_id uuid, task_id text, profile text, polls integer, polled timestamptz,
               final boolean, invalid_user_ids jsonb, forbidden jsonb, failed_user_ids jsonb,
               read_user_ids jsonb, unread_user_ids jsonb, result jsonb, error_code text,
               error_text text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT r.message_id, r.task_id, r.profile, r.polls, r.polled_at, r.final,
           r.result -> 'invalid_user_id_list', r.result -> 'forbidden_list',
           r.result -> 'failed_user_id_list', r.result -> 'read_user_id_list',
           r.result -> 'unread_user_id_list', r.result, r.error_code, r.error_text
      FROM outbox.dingtalk_send_results r
     WHERE pMessage IS NULL OR r.message_id = pMessage
     ORDER BY r.created_at DESC
$$;

--------------------------------------------------------------------------------------------------
-- Group chats
--------------------------------------------------------------------------------------------------

CREATE TABLE outbox.dingtalk_chats (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    profile       text NOT NULL,
    name          text NOT NULL CHECK (name <> ''),
    owner         text NOT NULL CHECK (owner <> ''),
    userids       text[] NOT NULL,
    -- requested → creating (a daemon or the CLI holds it until claimed_until) → created | failed
    state         text NOT NULL DEFAULT 'requested'
                  CHECK (state IN ('requested', 'creating', 'created', 'failed')),
    claimed_until timestamptz,
    chatid        text UNIQUE,
    error_code    text,
    error_text    text,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz
);

CREATE INDEX dingtalk_chats_pending_idx ON outbox.dingtalk_chats (profile, requested_at)
    WHERE state IN ('requested', 'creating');

-- Requests a chat (name, owner userid, member userids) of the app of pProfile; returns its id.
-- The daemon creates it (chat/create) and records the chatid. pClaim: the caller creates it
-- itself (`outboxd dingtalk chat-create`), the daemon leaves it alone for five minutes.
-- SECURITY DEFINER: writes the table, which applications may not.
CREATE FUNCTION api.dingtalk_create_chat(
    pProfile text, pName text, pOwner text, pUserIds text[], pClaim boolean DEFAULT false
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_id uuid;
BEGIN
    IF coalesce(pName, '') = '' OR coalesce(pOwner, '') = '' THEN
        RAISE EXCEPTION 'ERR-400-050: a DingTalk chat needs a name and an owner'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO outbox.dingtalk_chats (profile, name, owner, userids, state, claimed_until)
    VALUES (coalesce(pProfile, 'default'), pName, pOwner, coalesce(pUserIds, '{}'),
            CASE WHEN pClaim THEN 'creating' ELSE 'requested' END,
            CASE WHEN pClaim THEN now() + interval '5 minutes' END)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

-- Every chat, newest first. SECURITY DEFINER: applications may not read the table.
CREATE FUNCTION api.dingtalk_chats()
RETURNS TABLE (id uuid, profile text, name text, owner text, userids text[], state text,
               chatid text, error_code text, error_text text, requested timestamptz,
               created timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT c.id, c.profile, c.name, c.owner, c.userids, c.state, c.chatid, c.error_code,
           c.error_text, c.requested_at, c.created_at
      FROM outbox.dingtalk_chats c
     ORDER BY c.requested_at DESC
$$;

-- The daemon's claim of requested chats of p_profile (and of creations whose claim ran out: a
-- creator that crashed mid-call may have created the chat already, so a duplicate is possible
-- then; chat/create has no idempotency key).
CREATE FUNCTION outbox.dingtalk_claim_chats(p_profile text, p_limit integer)
RETURNS TABLE (id uuid, name text, owner text, userids text[])
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    UPDATE outbox.dingtalk_chats c
       SET state = 'creating', claimed_until = now() + interval '5 minutes'
      FROM (SELECT d.id FROM outbox.dingtalk_chats d
             WHERE d.profile = p_profile
               AND (d.state = 'requested' OR (d.state = 'creating' AND d.claimed_until < now()))
             ORDER BY d.requested_at
             LIMIT p_limit
               FOR UPDATE SKIP LOCKED) due
     WHERE c.id = due.id
    RETURNING c.id, c.name, c.owner, c.userids
$$;

-- Records a creation: the chatid, or the error (a retryable error puts the request back).
CREATE FUNCTION outbox.dingtalk_record_chat(
    p_id uuid, p_chatid text, p_error_code text, p_error_text text
) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    UPDATE outbox.dingtalk_chats
       SET chatid = p_chatid,
           state = CASE WHEN p_chatid IS NOT NULL THEN 'created' ELSE 'failed' END,
           created_at = CASE WHEN p_chatid IS NOT NULL THEN now() END,
           claimed_until = NULL,
           error_code = p_error_code, error_text = p_error_text
     WHERE id = p_id
$$;

--------------------------------------------------------------------------------------------------
-- Grants
--------------------------------------------------------------------------------------------------

REVOKE ALL ON outbox.dingtalk_send_results, outbox.dingtalk_chats FROM PUBLIC;
REVOKE ALL ON FUNCTION
    api.send_dingbot(text, text, text, text, boolean, text[], text[], text, text, text, text, text, integer, timestamptz),
    api.send_dingtalk(text, text, text[], text[], boolean, text, jsonb, text, text, integer, timestamptz),
    outbox.on_dingtalk_attempt_done(),
    outbox.dingtalk_due_send_results(text, interval, integer),
    outbox.dingtalk_record_send_result(uuid, jsonb, text, text, interval),
    api.dingtalk_send_results(uuid),
    api.dingtalk_create_chat(text, text, text, text[], boolean),
    api.dingtalk_chats(),
    outbox.dingtalk_claim_chats(text, integer),
    outbox.dingtalk_record_chat(uuid, text, text, text)
    FROM PUBLIC;

-- Applications (and the daemon's role, which `outboxd dingtalk chat-create` may use): the api
-- functions. The daemon: its claims and records.
GRANT EXECUTE ON FUNCTION
    api.send_dingbot(text, text, text, text, boolean, text[], text[], text, text, text, text, text, integer, timestamptz),
    api.send_dingtalk(text, text, text[], text[], boolean, text, jsonb, text, text, integer, timestamptz),
    api.dingtalk_send_results(uuid),
    api.dingtalk_create_chat(text, text, text, text[], boolean),
    api.dingtalk_chats()
    TO outboxd_app, outboxd_daemon;
GRANT EXECUTE ON FUNCTION
    outbox.dingtalk_due_send_results(text, interval, integer),
    outbox.dingtalk_record_send_result(uuid, jsonb, text, text, interval),
    outbox.dingtalk_claim_chats(text, integer),
    outbox.dingtalk_record_chat(uuid, text, text, text)
    TO outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (10, 'dingtalk');

COMMIT;
