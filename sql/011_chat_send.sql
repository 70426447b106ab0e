-- 011_chat_send.sql — one convenience function per chat platform: Slack, Feishu, Telegram (issue 10).
--
-- Why: as Apostol's SendMail / SendFCM wrap api.send_message for e-mail and push, these build the
-- JSON content a chat connector reads from plain arguments, so an application writes
--   SELECT api.send_telegram('default', '-1001234567890', 'Backup <b>done</b>', 'HTML');
-- instead of assembling the JSON itself. Each one calls api.send_message (006) with its agent
-- (slack.agent, feishu.agent, telegram.agent, seeded by 008) and returns the new message's id;
-- the message is "prepared" when it returns. The trailing arguments are api.send_message's own
-- (pParent, pLabel, pDescription, pCode — the idempotency key: an existing code returns the
-- existing message —, pPriority, pSendAt, pMaxAttempts), so they can be named as there.
--
--   api.send_slack(pProfile, pChannel, pText, pBlocks jsonb, pThreadTs, …)
--       content {"text", "blocks", "thread_ts"}, address = the channel (NULL for a webhook
--       profile, which posts to its own channel). Text or blocks is required.
--   api.send_feishu(pProfile, pText, pPost jsonb, pCard jsonb, …)
--       exactly one of them: {"msg_type":"text","content":{"text"}},
--       {"msg_type":"post","content":{"post"}} or {"msg_type":"interactive","card"}.
--   api.send_telegram(pProfile, pChatId, pText, pParseMode, pDisableNotification, …)
--       content {"text", "parse_mode", "disable_notification"}, address = the chat id.
--
-- Arguments that cannot make a message raise ERR-400-070 (SQLSTATE 22023, invalid_parameter_value)
-- before anything is written; the connectors check the rest when they deliver (bad-content).
-- Absent optional arguments are left out of the JSON, so the profile's defaults apply.
--
-- Rights (see 004): not SECURITY DEFINER — they write nothing themselves; api.send_message, which
-- is, does. EXECUTE for outboxd_app and outboxd_daemon, like api.send_message; not PUBLIC.

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE FUNCTION api.send_slack(
    pProfile text, pChannel text, pText text, pBlocks jsonb DEFAULT NULL,
    pThreadTs text DEFAULT NULL,
    pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL, pDescription text DEFAULT NULL,
    pCode text DEFAULT NULL, pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL,
    pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, api, pg_temp AS $$
DECLARE
    v_content jsonb := '{}';
BEGIN
    IF coalesce(pText, '') = '' AND pBlocks IS NULL THEN
        RAISE EXCEPTION 'ERR-400-070: a Slack message needs pText or pBlocks'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pBlocks IS NOT NULL AND jsonb_typeof(pBlocks) <> 'array' THEN
        RAISE EXCEPTION 'ERR-400-070: pBlocks must be a JSON array of blocks'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- With blocks, text is the notification's fallback.
    IF coalesce(pText, '') <> '' THEN
        v_content := v_content || jsonb_build_object('text', pText);
    END IF;
    IF pBlocks IS NOT NULL THEN
        v_content := v_content || jsonb_build_object('blocks', pBlocks);
    END IF;
    IF pThreadTs IS NOT NULL THEN
        v_content := v_content || jsonb_build_object('thread_ts', pThreadTs);
    END IF;
    RETURN (SELECT m.id FROM api.send_message(pParent, 'slack.agent', pProfile, pChannel, NULL,
                                              v_content::text, pLabel, pDescription, pCode,
                                              pPriority, pSendAt, pMaxAttempts) AS m);
END
$$;

COMMENT ON FUNCTION api.send_slack(text, text, text, jsonb, text, uuid, text, text, text, integer, timestamptz, integer) IS
    'Sends a Slack message (text, blocks, thread_ts) to a channel; returns the message id';

CREATE FUNCTION api.send_feishu(
    pProfile text, pText text, pPost jsonb DEFAULT NULL, pCard jsonb DEFAULT NULL,
    pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL, pDescription text DEFAULT NULL,
    pCode text DEFAULT NULL, pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL,
    pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, api, pg_temp AS $$
DECLARE
    v_content jsonb;
BEGIN
    IF num_nonnulls(nullif(pText, ''), pPost, pCard) <> 1 THEN
        RAISE EXCEPTION 'ERR-400-070: a Feishu message is one of pText, pPost or pCard'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(coalesce(pPost, pCard, '{}')) <> 'object' THEN
        RAISE EXCEPTION 'ERR-400-070: pPost and pCard must be JSON objects'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_content := CASE
        WHEN pCard IS NOT NULL THEN jsonb_build_object('msg_type', 'interactive', 'card', pCard)
        WHEN pPost IS NOT NULL THEN
            jsonb_build_object('msg_type', 'post', 'content', jsonb_build_object('post', pPost))
        ELSE jsonb_build_object('msg_type', 'text', 'content', jsonb_build_object('text', pText))
    END;
    -- The bot posts to its own group: no address.
    RETURN (SELECT m.id FROM api.send_message(pParent, 'feishu.agent', pProfile, NULL, NULL,
                                              v_content::text, pLabel, pDescription, pCode,
                                              pPriority, pSendAt, pMaxAttempts) AS m);
END
$$;

COMMENT ON FUNCTION api.send_feishu(text, text, jsonb, jsonb, uuid, text, text, text, integer, timestamptz, integer) IS
    'Sends a Feishu bot message (text, post or interactive card); returns the message id';

CREATE FUNCTION api.send_telegram(
    pProfile text, pChatId text, pText text, pParseMode text DEFAULT NULL,
    pDisableNotification boolean DEFAULT NULL,
    pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL, pDescription text DEFAULT NULL,
    pCode text DEFAULT NULL, pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL,
    pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, api, pg_temp AS $$
DECLARE
    v_content jsonb;
BEGIN
    IF coalesce(pChatId, '') = '' OR coalesce(pText, '') = '' THEN
        RAISE EXCEPTION 'ERR-400-070: a Telegram message needs pChatId and pText'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pParseMode IS NOT NULL AND pParseMode NOT IN ('MarkdownV2', 'HTML', 'Markdown') THEN
        RAISE EXCEPTION 'ERR-400-070: pParseMode must be MarkdownV2, HTML or Markdown, not "%"',
            pParseMode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_content := jsonb_build_object('text', pText);
    IF pParseMode IS NOT NULL THEN
        v_content := v_content || jsonb_build_object('parse_mode', pParseMode);
    END IF;
    IF pDisableNotification IS NOT NULL THEN
        v_content := v_content || jsonb_build_object('disable_notification', pDisableNotification);
    END IF;
    RETURN (SELECT m.id FROM api.send_message(pParent, 'telegram.agent', pProfile, pChatId, NULL,
                                              v_content::text, pLabel, pDescription, pCode,
                                              pPriority, pSendAt, pMaxAttempts) AS m);
END
$$;

COMMENT ON FUNCTION api.send_telegram(text, text, text, text, boolean, uuid, text, text, text, integer, timestamptz, integer) IS
    'Sends a Telegram message (text, parse_mode, disable_notification) to a chat; returns the message id';

REVOKE ALL ON FUNCTION
    api.send_slack(text, text, text, jsonb, text, uuid, text, text, text, integer, timestamptz, integer),
    api.send_feishu(text, text, jsonb, jsonb, uuid, text, text, text, integer, timestamptz, integer),
    api.send_telegram(text, text, text, text, boolean, uuid, text, text, text, integer, timestamptz, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    api.send_slack(text, text, text, jsonb, text, uuid, text, text, text, integer, timestamptz, integer),
    api.send_feishu(text, text, jsonb, jsonb, uuid, text, text, text, integer, timestamptz, integer),
    api.send_telegram(text, text, text, text, boolean, uuid, text, text, text, integer, timestamptz, integer)
    TO outboxd_app, outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (11, 'chat_send');

COMMIT;
