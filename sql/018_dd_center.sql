-- 018_dd_center.sql — the DingTalk message center's endpoints (issue 12, HTTP server section).
--
-- Adds:
--   * outbox.dingtalk_calls: one row per direct DingTalk call the HTTP server makes for the
--     center's clients (`POST /v1/dd/chat/create`, `POST /v1/dd/media/upload`; the sends go
--     through the outbox and are recorded there). What was asked (a summary without secrets or
--     file bytes: names, user ids, the file's name, size and SHA-256), what DingTalk answered
--     (the chatid or media_id) or the error (stable code and text), and when;
--   * outbox.dingtalk_record_call: the daemon's way to write a row (SECURITY DEFINER: the daemon
--     has no table writes, see 004);
--   * api.dingtalk_calls(): the rows, newest first, for an operator or an application.
--
-- The table is an append-only log with no foreign keys; retention does not purge it (a few rows
-- per chat or file created: an operator deletes old rows by hand if ever needed).

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE outbox.dingtalk_calls (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    profile     text NOT NULL,
    -- The DingTalk API called: chat/create | media/upload.
    kind        text NOT NULL CHECK (kind IN ('chat/create', 'media/upload')),
    -- What was asked, without secrets or file bytes.
    request     jsonb NOT NULL,
    -- What DingTalk gave: the chatid or the media_id (NULL when the call failed).
    result      text,
    -- The stable error code (`dingtalk-<errcode>`, `token-fetch`, `timeout`…) and its text.
    error_code  text,
    error_text  text,
    called_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((result IS NULL) <> (error_code IS NULL))
);

CREATE INDEX dingtalk_calls_called_idx ON outbox.dingtalk_calls (called_at);

-- Records one call; returns its id. SECURITY DEFINER: writes the table, which the daemon may not.
CREATE FUNCTION outbox.dingtalk_record_call(
    p_profile text, p_kind text, p_request jsonb, p_result text, p_error_code text,
    p_error_text text
) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    INSERT INTO outbox.dingtalk_calls (profile, kind, request, result, error_code, error_text)
    VALUES (p_profile, p_kind, coalesce(p_request, '{}'), p_result, p_error_code, p_error_text)
    RETURNING id
$$;

-- The calls, newest first (pLimit rows). SECURITY DEFINER: applications may not read the table.
CREATE FUNCTION api.dingtalk_calls(pLimit integer DEFAULT 100)
RETURNS TABLE (id bigint, profile text, kind text, request jsonb, result text, error_code text,
               error_text text, called timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT c.id, c.profile, c.kind, c.request, c.result, c.error_code, c.error_text, c.called_at
      FROM outbox.dingtalk_calls c
     ORDER BY c.id DESC
     LIMIT pLimit
$$;

REVOKE ALL ON outbox.dingtalk_calls FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.dingtalk_record_call(text, text, jsonb, text, text, text),
    api.dingtalk_calls(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.dingtalk_record_call(text, text, jsonb, text, text, text)
    TO outboxd_daemon;
GRANT EXECUTE ON FUNCTION api.dingtalk_calls(integer) TO outboxd_app, outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (18, 'dd_center');

COMMIT;
