-- 014_cards.sql — picture cards: templates of kind `image`, their background images, and the
-- picture rendered for each message.
--
-- Adds:
--   * outbox.card_backgrounds: background images (PNG or JPEG bytes) that a card spec names as
--     `"image": "db:NAME"`. A background is never changed (a trigger refuses UPDATE): a new
--     picture is a new name, so a message already built keeps the picture it was rendered with,
--     as it keeps its template version;
--   * outbox.message_images: the picture the daemon rendered for a message (one per message),
--     written when the message is first rendered and handed to the connector with it;
--   * api.add_template and api.send_template accept kind `image` (007 refused it "until then");
--   * api.add_card_background, api.card_backgrounds, api.message_image.
--
-- Rendering is Rust's (src/render/card.rs): the card spec is the template body, a JSON object
-- (README, "Picture cards"); api.add_template only checks that it is one.
--
-- Retention: outbox.clear_content (005, 007) empties a templated message's variables; a trigger
-- here then deletes its picture too (it shows the same text). Deleting a message deletes its
-- picture (ON DELETE CASCADE).
--
-- Rights (see 004): the tables belong to the owner. Applications use the api functions (SECURITY
-- DEFINER); the daemon reads backgrounds and writes pictures.
--
-- Error codes raised here: ERR-400-041 (a background of that name exists with other bytes),
-- ERR-400-042 (bad argument: not PNG/JPEG, bad name, a card body that is not a JSON object).

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE outbox.card_backgrounds (
    name       text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]*$'),
    mime       text NOT NULL CHECK (mime IN ('image/png', 'image/jpeg')),
    bytes      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL DEFAULT session_user
);

COMMENT ON TABLE outbox.card_backgrounds IS 'Background images of picture cards (db:NAME); never updated';

CREATE TABLE outbox.message_images (
    -- CASCADE: retention deletes messages without knowing this table.
    message_id uuid PRIMARY KEY REFERENCES outbox.messages (id) ON DELETE CASCADE,
    file_name  text NOT NULL,
    mime       text NOT NULL,
    width      integer NOT NULL CHECK (width > 0),
    height     integer NOT NULL CHECK (height > 0),
    bytes      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox.message_images IS 'The picture rendered for a message built from an image template';

-- A background is history, as a template version is.
CREATE FUNCTION outbox.on_card_backgrounds_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'ERR-400-042: card backgrounds are never changed; add one under a new name'
        USING ERRCODE = 'check_violation';
END
$$;

CREATE TRIGGER card_backgrounds_update BEFORE UPDATE ON outbox.card_backgrounds
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.on_card_backgrounds_update();

-- Retention's content step empties the variables; the picture goes with them.
CREATE FUNCTION outbox.on_message_vars_cleared() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
BEGIN
    DELETE FROM outbox.message_images i WHERE i.message_id = NEW.message_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER message_vars_cleared AFTER UPDATE OF vars ON outbox.message_templates
    FOR EACH ROW WHEN (NEW.vars = '{}'::jsonb) EXECUTE FUNCTION outbox.on_message_vars_cleared();

--------------------------------------------------------------------------------------------------
-- Backgrounds
--------------------------------------------------------------------------------------------------

-- Stores a background image under pName (the type is read from the bytes: PNG or JPEG). Adding
-- the same bytes again is a no-op; other bytes under an existing name are refused.
-- SECURITY DEFINER: writes the table, which applications may not.
CREATE FUNCTION api.add_card_background(pName text, pBytes bytea)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_mime text;
    v_old  bytea;
BEGIN
    IF pName IS NULL OR pName !~ '^[A-Za-z0-9][A-Za-z0-9._-]*$' THEN
        RAISE EXCEPTION 'ERR-400-042: background name "%" must be letters, digits, ".", "_" or "-"', pName
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_mime := CASE
        WHEN substring(pBytes FROM 1 FOR 8) = '\x89504e470d0a1a0a'::bytea THEN 'image/png'
        WHEN substring(pBytes FROM 1 FOR 3) = '\xffd8ff'::bytea THEN 'image/jpeg'
    END;
    IF v_mime IS NULL THEN
        RAISE EXCEPTION 'ERR-400-042: background "%" is neither PNG nor JPEG', pName
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO outbox.card_backgrounds (name, mime, bytes) VALUES (pName, v_mime, pBytes)
    ON CONFLICT (name) DO NOTHING;
    IF NOT FOUND THEN
        SELECT b.bytes INTO v_old FROM outbox.card_backgrounds b WHERE b.name = pName;
        IF v_old IS DISTINCT FROM pBytes THEN
            RAISE EXCEPTION 'ERR-400-041: background "%" exists with other bytes; use a new name', pName
                USING ERRCODE = 'unique_violation';
        END IF;
    END IF;
    RETURN pName;
END
$$;

-- Every background: name, type, size. SECURITY DEFINER: applications may not read the table.
CREATE FUNCTION api.card_backgrounds()
RETURNS TABLE (name text, mime text, size_bytes integer, created timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT b.name, b.mime, octet_length(b.bytes), b.created_at
      FROM outbox.card_backgrounds b ORDER BY b.name
$$;

-- The picture rendered for a message (no row before the daemon has rendered it).
-- SECURITY DEFINER: as api.card_backgrounds.
CREATE FUNCTION api.message_image(pId uuid)
RETURNS TABLE (file_name text, mime text, width integer, height integer, bytes bytea,
               created timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT i.file_name, i.mime, i.width, i.height, i.bytes, i.created_at
      FROM outbox.message_images i WHERE i.message_id = pId
$$;

--------------------------------------------------------------------------------------------------
-- api.add_template and api.send_template accept kind image
--------------------------------------------------------------------------------------------------

-- As in 007, plus kind image, whose body must be a JSON object (the card spec; the rest of it is
-- checked by `outboxd template add` and at render time). Same signature, so grants stay.
CREATE OR REPLACE FUNCTION api.add_template(
    pName text, pKind text, pBody text, pSubject text DEFAULT NULL,
    pAgent text DEFAULT NULL, pProfile text DEFAULT NULL, pDescription text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_id uuid;
BEGIN
    IF pKind IS NULL OR pKind NOT IN ('text', 'html', 'markdown', 'json', 'image') THEN
        RAISE EXCEPTION 'ERR-400-042: template kind "%" is not supported (text, html, markdown, json, image)', pKind
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pName IS NULL OR pName !~ '^[A-Za-z0-9][A-Za-z0-9._-]*$' THEN
        RAISE EXCEPTION 'ERR-400-042: template name "%" must be letters, digits, ".", "_" or "-"', pName
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(pBody, '') = '' THEN
        RAISE EXCEPTION 'ERR-400-042: template "%" has an empty body', pName
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pKind = 'image' AND NOT outbox.is_json_object(pBody) THEN
        RAISE EXCEPTION 'ERR-400-042: the body of image template "%" must be a JSON object (the card spec)', pName
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO outbox.templates (name, kind, agent_id, profile, description)
    VALUES (pName, pKind, CASE WHEN pAgent IS NOT NULL THEN outbox.agent_id(pAgent) END,
            nullif(pProfile, ''), pDescription)
    ON CONFLICT (name) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'ERR-400-041: template "%" exists; use api.update_template', pName
            USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO outbox.template_versions (template_id, version, subject, body)
    VALUES (v_id, 1, nullif(pSubject, ''), pBody);
    RETURN v_id;
END
$$;

-- Whether p is a JSON object (false, not an error, for text that is not JSON).
CREATE FUNCTION outbox.is_json_object(p text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN jsonb_typeof(p::jsonb) = 'object';
EXCEPTION WHEN invalid_text_representation THEN
    RETURN false;
END
$$;

-- As in 007, without the refusal of kind image. Same signature, so grants stay.
CREATE OR REPLACE FUNCTION api.send_template(
    pParent uuid, pAgent text, pProfile text, pAddress text, pTemplate text, pVars jsonb,
    pCode text DEFAULT NULL, pLabel text DEFAULT NULL, pDescription text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_template outbox.templates%ROWTYPE;
    v_version  bigint;
    v_agent    text;
    v_msg      record;
BEGIN
    SELECT * INTO v_template FROM outbox.templates t WHERE t.name = pTemplate;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ERR-400-040: template "%" not found', pTemplate USING ERRCODE = 'no_data_found';
    END IF;
    IF jsonb_typeof(coalesce(pVars, '{}')) <> 'object' THEN
        RAISE EXCEPTION 'ERR-400-042: template variables must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT v.id INTO v_version FROM outbox.template_versions v
     WHERE v.template_id = v_template.id ORDER BY v.version DESC LIMIT 1;
    v_agent := coalesce(pAgent, (SELECT a.id::text FROM outbox.agents a WHERE a.id = v_template.agent_id));
    IF v_agent IS NULL THEN
        RAISE EXCEPTION 'ERR-400-042: template "%" names no agent; give one', pTemplate
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_msg FROM outbox.insert_outbox(pParent, v_agent, pCode, coalesce(pProfile, v_template.profile),
                                              pAddress, NULL, NULL, pLabel, pDescription, pPriority,
                                              pSendAt, pMaxAttempts);
    IF v_msg.created THEN
        INSERT INTO outbox.message_templates (message_id, template_version_id, vars)
        VALUES (v_msg.id, v_version, coalesce(pVars, '{}'));
        PERFORM outbox.run_action(v_msg.id, 'submit', NULL, false);
    END IF;
    RETURN v_msg.id;
END
$$;

--------------------------------------------------------------------------------------------------
-- Grants
--------------------------------------------------------------------------------------------------

REVOKE ALL ON outbox.card_backgrounds, outbox.message_images FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.on_card_backgrounds_update(), outbox.on_message_vars_cleared(),
    outbox.is_json_object(text), api.add_card_background(text, bytea), api.card_backgrounds(),
    api.message_image(uuid)
    FROM PUBLIC;

-- The daemon reads backgrounds and stores the pictures it renders (INSERT only: a picture, once
-- stored, is what every retry sends).
GRANT SELECT ON outbox.card_backgrounds TO outboxd_daemon;
GRANT SELECT, INSERT ON outbox.message_images TO outboxd_daemon;
GRANT EXECUTE ON FUNCTION api.add_card_background(text, bytea), api.card_backgrounds(),
    api.message_image(uuid)
    TO outboxd_app, outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (14, 'cards');

COMMIT;
