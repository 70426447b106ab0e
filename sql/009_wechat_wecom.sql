-- 009_wechat_wecom.sql — SQL shortcuts for WeChat and WeCom messages (issue 10).
--
-- Why: an application should not have to know the JSON each connector takes. In the spirit of
-- Apostol's SendMail / SendFCM wrappers, these functions build the content from arguments and
-- call api.send_message with the right agent, so a DBA writes
--   SELECT id FROM api.send_wechat('oa', 'oOPENID', 'TEMPLATE_ID', '{"thing01": "Order 42"}');
--   SELECT id FROM api.send_wecom_text('app', 'zhangsan|lisi', 'Build failed');
--   SELECT id FROM api.send_wecombot_text('ops', 'Disk full', ARRAY['@all']);
-- The content shapes are the connectors' (README, "WeChat and WeCom"; src/connector/wechat.rs,
-- wecom.rs, wecombot.rs). Nothing is checked here: the daemon checks the content before any
-- call and fails a malformed message with `bad-content` (its attempt's error_text says why).
--
--   api.send_wechat        wechat.agent    template message to an openid
--   api.send_wecom         wecom.agent     app message of any supported msgtype (jsonb part)
--   api.send_wecom_text    wecom.agent     text (or markdown) app message
--   api.send_wecom_file    wecom.agent     image or file app message from bytea (uploaded first)
--   api.send_wecombot      wecombot.agent  robot message of any supported msgtype (jsonb part)
--   api.send_wecombot_text wecombot.agent  robot text with @mentions
--   api.send_wecombot_image wecombot.agent robot image from bytea (the daemon adds its MD5)
--
-- Each returns the message row (`SELECT id FROM …`), like api.send_message, and takes its
-- optional extras by name: pCode (idempotency: a code already used for the agent returns the
-- existing message), pParent, pLabel, pPriority, pSendAt, pMaxAttempts.
--
-- Rights (see 004): SECURITY DEFINER like api.send_message, which they only call (it inserts into
-- outbox.messages); executable by outboxd_app and outboxd_daemon, not by PUBLIC.

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

-- {"template_id", "url"?, "miniprogram"?, "data"}; the address is the openid. pData maps the
-- template's keys to a string or {"value": …, "color": …}. The subject is the template id (for
-- whoever reads the outbox).
CREATE FUNCTION api.send_wechat(
    pProfile text, pOpenId text, pTemplateId text, pData jsonb,
    pUrl text DEFAULT NULL, pMiniProgram jsonb DEFAULT NULL,
    pCode text DEFAULT NULL, pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.send_message(
        pParent, 'wechat.agent', pProfile, pOpenId, pTemplateId,
        (jsonb_build_object('template_id', pTemplateId, 'data', pData)
         || CASE WHEN pUrl IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('url', pUrl) END
         || CASE WHEN pMiniProgram IS NULL THEN '{}'::jsonb
                 ELSE jsonb_build_object('miniprogram', pMiniProgram) END)::text,
        pLabel, NULL, pCode, pPriority, pSendAt, pMaxAttempts)
$$;

-- {"msgtype": pMsgType, <pMsgType>: pMessage, "toparty"?, "totag"?, "safe"?}; the address is
-- touser ('@all' or ids joined by '|'; NULL when only parties or tags receive it).
CREATE FUNCTION api.send_wecom(
    pProfile text, pToUser text, pMsgType text, pMessage jsonb,
    pToParty text DEFAULT NULL, pToTag text DEFAULT NULL, pSafe boolean DEFAULT false,
    pCode text DEFAULT NULL, pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.send_message(
        pParent, 'wecom.agent', pProfile, pToUser, NULL,
        (jsonb_build_object('msgtype', pMsgType, pMsgType, pMessage)
         || CASE WHEN pToParty IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('toparty', pToParty) END
         || CASE WHEN pToTag IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('totag', pToTag) END
         || CASE WHEN pSafe THEN '{"safe": 1}'::jsonb ELSE '{}'::jsonb END)::text,
        pLabel, NULL, pCode, pPriority, pSendAt, pMaxAttempts)
$$;

-- A text app message; pMarkdown sends it as msgtype markdown.
CREATE FUNCTION api.send_wecom_text(
    pProfile text, pToUser text, pText text,
    pToParty text DEFAULT NULL, pToTag text DEFAULT NULL, pMarkdown boolean DEFAULT false,
    pCode text DEFAULT NULL, pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.send_wecom(
        pProfile, pToUser, CASE WHEN pMarkdown THEN 'markdown' ELSE 'text' END,
        jsonb_build_object('content', pText), pToParty, pToTag, false,
        pCode, pParent, pLabel, pPriority, pSendAt, pMaxAttempts)
$$;

-- An image or file app message from its bytes: {"base64", "filename"}, which the daemon uploads
-- (media/upload) before the send. pMsgType is 'file' or 'image'. encode() breaks base64 into
-- lines; the newlines are removed.
CREATE FUNCTION api.send_wecom_file(
    pProfile text, pToUser text, pFileName text, pFile bytea, pMsgType text DEFAULT 'file',
    pToParty text DEFAULT NULL, pToTag text DEFAULT NULL,
    pCode text DEFAULT NULL, pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.send_wecom(
        pProfile, pToUser, pMsgType,
        jsonb_build_object('base64', translate(encode(pFile, 'base64'), E'\n', ''),
                           'filename', pFileName),
        pToParty, pToTag, false, pCode, pParent, pLabel, pPriority, pSendAt, pMaxAttempts)
$$;

-- {"msgtype": pMsgType, <pMsgType>: pMessage} to the profile's robot; no address.
CREATE FUNCTION api.send_wecombot(
    pProfile text, pMsgType text, pMessage jsonb,
    pCode text DEFAULT NULL, pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.send_message(
        pParent, 'wecombot.agent', pProfile, NULL, NULL,
        jsonb_build_object('msgtype', pMsgType, pMsgType, pMessage)::text,
        pLabel, NULL, pCode, pPriority, pSendAt, pMaxAttempts)
$$;

-- Robot text; pMentioned are userids ('@all' for everyone), pMentionedMobiles phone numbers.
CREATE FUNCTION api.send_wecombot_text(
    pProfile text, pText text, pMentioned text[] DEFAULT NULL, pMentionedMobiles text[] DEFAULT NULL,
    pCode text DEFAULT NULL, pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.send_wecombot(
        pProfile, 'text',
        jsonb_build_object('content', pText)
        || CASE WHEN pMentioned IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('mentioned_list', to_jsonb(pMentioned)) END
        || CASE WHEN pMentionedMobiles IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('mentioned_mobile_list', to_jsonb(pMentionedMobiles)) END,
        pCode, pParent, pLabel, pPriority, pSendAt, pMaxAttempts)
$$;

-- Robot image from its bytes (JPG or PNG, at most 2 MB per WeCom); the daemon adds the MD5.
CREATE FUNCTION api.send_wecombot_image(
    pProfile text, pImage bytea,
    pCode text DEFAULT NULL, pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS SETOF api.message
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT * FROM api.send_wecombot(
        pProfile, 'image',
        jsonb_build_object('base64', translate(encode(pImage, 'base64'), E'\n', '')),
        pCode, pParent, pLabel, pPriority, pSendAt, pMaxAttempts)
$$;

REVOKE ALL ON FUNCTION
    api.send_wechat(text, text, text, jsonb, text, jsonb, text, uuid, text, integer, timestamptz, integer),
    api.send_wecom(text, text, text, jsonb, text, text, boolean, text, uuid, text, integer, timestamptz, integer),
    api.send_wecom_text(text, text, text, text, text, boolean, text, uuid, text, integer, timestamptz, integer),
    api.send_wecom_file(text, text, text, bytea, text, text, text, text, uuid, text, integer, timestamptz, integer),
    api.send_wecombot(text, text, jsonb, text, uuid, text, integer, timestamptz, integer),
    api.send_wecombot_text(text, text, text[], text[], text, uuid, text, integer, timestamptz, integer),
    api.send_wecombot_image(text, bytea, text, uuid, text, integer, timestamptz, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    api.send_wechat(text, text, text, jsonb, text, jsonb, text, uuid, text, integer, timestamptz, integer),
    api.send_wecom(text, text, text, jsonb, text, text, boolean, text, uuid, text, integer, timestamptz, integer),
    api.send_wecom_text(text, text, text, text, text, boolean, text, uuid, text, integer, timestamptz, integer),
    api.send_wecom_file(text, text, text, bytea, text, text, text, text, uuid, text, integer, timestamptz, integer),
    api.send_wecombot(text, text, jsonb, text, uuid, text, integer, timestamptz, integer),
    api.send_wecombot_text(text, text, text[], text[], text, uuid, text, integer, timestamptz, integer),
    api.send_wecombot_image(text, bytea, text, uuid, text, integer, timestamptz, integer)
    TO outboxd_app, outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (9, 'wechat_wecom');

COMMIT;
