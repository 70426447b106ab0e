-- 012_aliyun_sms.sql — api.send_sms_aliyun: enqueue an Aliyun SMS with plain SQL (issue 10).
--
-- Why: in the spirit of Apostol's SendMail/SendFCM wrappers, an application sends a templated SMS
-- through Aliyun without writing the connector's JSON itself:
--
--   SELECT api.send_sms_aliyun('13800000000', '{"code": "1234"}', 'SMS_153055065', '阿里云');
--
-- builds the content the `aliyunsms` connector reads,
--   {"params": {"code": "1234"}, "template_code": "SMS_153055065", "sign_name": "阿里云"}
-- (template_code and sign_name left out when NULL: the profile's defaults apply) and calls
-- api.send_message for the agent `aliyunsms.agent` (seeded by 008). The address is
-- `PhoneNumbers` (one number, or several comma-separated); the message code is the SMS's `OutId`
-- and, as for every message, the idempotency key (a pCode that exists returns that message).
-- Returns the message id.
--
-- Errors raised here: ERR-400-042 when pParams is not a JSON object (as the template functions
-- of 007 answer a bad argument).
--
-- Rights: not SECURITY DEFINER. It only builds a text and calls api.send_message, which is
-- SECURITY DEFINER and executable by outboxd_app and outboxd_daemon (004, 006); the same roles
-- get this function.

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE FUNCTION api.send_sms_aliyun(
    pPhoneNumbers text, pParams jsonb DEFAULT NULL, pTemplateCode text DEFAULT NULL,
    pSignName text DEFAULT NULL, pProfile text DEFAULT 'default', pCode text DEFAULT NULL,
    pParent uuid DEFAULT NULL, pLabel text DEFAULT NULL, pDescription text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_content jsonb := '{}';
    v_id      uuid;
BEGIN
    IF pParams IS NOT NULL AND jsonb_typeof(pParams) <> 'object' THEN
        RAISE EXCEPTION 'ERR-400-042: SMS template parameters must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pParams IS NOT NULL THEN
        v_content := v_content || jsonb_build_object('params', pParams);
    END IF;
    IF pTemplateCode IS NOT NULL THEN
        v_content := v_content || jsonb_build_object('template_code', pTemplateCode);
    END IF;
    IF pSignName IS NOT NULL THEN
        v_content := v_content || jsonb_build_object('sign_name', pSignName);
    END IF;
    SELECT m.id INTO v_id
      FROM api.send_message(pParent, 'aliyunsms.agent', pProfile, pPhoneNumbers,
                            coalesce(pTemplateCode, 'SMS'), v_content::text, pLabel, pDescription,
                            pCode, pPriority, pSendAt, pMaxAttempts) m;
    RETURN v_id;
END
$$;

REVOKE ALL ON FUNCTION api.send_sms_aliyun(text, jsonb, text, text, text, text, uuid, text, text,
    integer, timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION api.send_sms_aliyun(text, jsonb, text, text, text, text, uuid, text, text,
    integer, timestamptz, integer) TO outboxd_app, outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (12, 'aliyun_sms');

COMMIT;
