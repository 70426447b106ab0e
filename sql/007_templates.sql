-- 007_templates.sql — message templates with versions, and messages built from them.
--
-- Adds:
--   * outbox.templates: one row per template (name unique, kind, optional target agent/profile);
--   * outbox.template_versions: the subject and body sources, one row per edit — a version is
--     never changed (a trigger refuses UPDATE), editing adds the next version;
--   * outbox.message_templates: the side table of messages built from a template (message id →
--     the version it is rendered from + its variables). A side table, not new columns on
--     outbox.messages: the hot row stays as narrow as it was, and only templated messages pay.
--   * api.add_template, api.update_template, api.template, api.templates, api.preview_template,
--     api.send_template; outbox.message_templates_of (the daemon's batched read per claim).
--
-- Rendering is done in Rust (minijinja), never here: the daemon renders subject and content of a
-- claimed message from the version it records, before the connector sees it; `outboxd render`
-- previews from api.preview_template's source; `outboxd template add|update` checks the syntax
-- before calling api.add_template / api.update_template. A template saved with plain SQL is not
-- checked here: its messages fail at render time with `template-syntax` (see README, Templates).
--
-- Kinds: text, html, markdown, json (escaping fits the kind, see src/render/text.rs) and image
-- (picture cards, not built yet: accepted by the CHECK so that a later migration only adds its
-- columns, refused by api.add_template until then).
--
-- Rights (see 004): the tables belong to the owner. Applications use the api functions only (all
-- SECURITY DEFINER, since they read or write the tables); the daemon reads the tables.
--
-- Error codes raised here (in the message text, before the colon):
--   ERR-400-040  template not found        ERR-400-041  a template of that name exists
--   ERR-400-042  bad template argument (kind, name, empty body, vars not an object)

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE outbox.templates (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]*$'),
    -- Fixed for the template's life: a version is rendered with the escaping of its template's
    -- kind, so changing it would change messages already generated. A new kind is a new template.
    kind        text NOT NULL CHECK (kind IN ('text', 'html', 'markdown', 'json', 'image')),
    -- Defaults for api.send_template when it is not given an agent / a profile.
    agent_id    uuid REFERENCES outbox.agents (id),
    profile     text,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE outbox.template_versions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    template_id uuid NOT NULL REFERENCES outbox.templates (id),
    version     integer NOT NULL CHECK (version > 0),
    -- minijinja sources; the subject is optional (chat and http messages have none).
    subject     text,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL DEFAULT session_user,
    UNIQUE (template_id, version)
);

COMMENT ON TABLE outbox.template_versions IS 'Template sources, one row per edit; never updated';

CREATE TABLE outbox.message_templates (
    -- CASCADE: retention (outbox.purge_batch, outbox.purge) deletes messages without knowing
    -- this table.
    message_id          uuid PRIMARY KEY REFERENCES outbox.messages (id) ON DELETE CASCADE,
    template_version_id bigint NOT NULL REFERENCES outbox.template_versions (id),
    vars                jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(vars) = 'object')
);
CREATE INDEX message_templates_version_idx ON outbox.message_templates (template_version_id);

-- A version is history: editing adds one, nothing rewrites one.
CREATE FUNCTION outbox.on_template_versions_update() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, outbox, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'ERR-400-042: template versions are never changed; use api.update_template'
        USING ERRCODE = 'check_violation';
END
$$;

CREATE TRIGGER template_versions_update BEFORE UPDATE ON outbox.template_versions
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.on_template_versions_update();

--------------------------------------------------------------------------------------------------
-- Reading
--------------------------------------------------------------------------------------------------

-- Every template with its newest version. SECURITY DEFINER: applications may not read the tables.
CREATE FUNCTION api.templates()
RETURNS TABLE (id uuid, name text, kind text, agent text, profile text, description text,
               version integer, created timestamptz, updated timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT t.id, t.name, t.kind, a.code, t.profile, t.description,
           (SELECT max(v.version) FROM outbox.template_versions v WHERE v.template_id = t.id),
           t.created_at, t.updated_at
      FROM outbox.templates t
      LEFT JOIN outbox.agents a ON a.id = t.agent_id
     ORDER BY t.name
$$;

-- One template with the sources of one version (default: the newest). No row when there is none.
-- SECURITY DEFINER: as api.templates.
CREATE FUNCTION api.template(pName text, pVersion integer DEFAULT NULL)
RETURNS TABLE (id uuid, name text, kind text, agent text, profile text, description text,
               version integer, subject text, body text, created timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT t.id, t.name, t.kind, a.code, t.profile, t.description,
           v.version, v.subject, v.body, v.created_at
      FROM outbox.templates t
      JOIN outbox.template_versions v ON v.template_id = t.id
      LEFT JOIN outbox.agents a ON a.id = t.agent_id
     WHERE t.name = pName AND (pVersion IS NULL OR v.version = pVersion)
     ORDER BY v.version DESC
     LIMIT 1
$$;

-- What a preview renders: the newest version's sources and the variables, checked (the template
-- exists, vars is an object). Rendering is Rust's: `outboxd render --template NAME --vars F`
-- calls this and renders the result exactly as the daemon would. SECURITY DEFINER: as above.
CREATE FUNCTION api.preview_template(pName text, pVars jsonb DEFAULT '{}')
RETURNS TABLE (name text, kind text, version integer, subject text, body text, vars jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
BEGIN
    IF jsonb_typeof(coalesce(pVars, '{}')) <> 'object' THEN
        RAISE EXCEPTION 'ERR-400-042: template variables must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT t.name, t.kind, t.version, t.subject, t.body, coalesce(pVars, '{}')
      FROM api.template(pName) t;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ERR-400-040: template "%" not found', pName USING ERRCODE = 'no_data_found';
    END IF;
END
$$;

-- The daemon's read, once per claim batch: the version and variables of those of p_ids that were
-- built from a template. Not SECURITY DEFINER: the daemon reads the tables itself.
CREATE FUNCTION outbox.message_templates_of(p_ids uuid[])
RETURNS TABLE (message_id uuid, name text, kind text, version integer, subject text, body text,
               vars jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT mt.message_id, t.name, t.kind, v.version, v.subject, v.body, mt.vars
      FROM outbox.message_templates mt
      JOIN outbox.template_versions v ON v.id = mt.template_version_id
      JOIN outbox.templates t ON t.id = v.template_id
     WHERE mt.message_id = ANY (p_ids)
$$;

--------------------------------------------------------------------------------------------------
-- Saving
--------------------------------------------------------------------------------------------------

-- Creates a template with its version 1; returns its id. pAgent (id or code) and pProfile are the
-- defaults of api.send_template. The syntax is not checked here (see the header).
-- SECURITY DEFINER: writes the tables, which applications may not.
CREATE FUNCTION api.add_template(
    pName text, pKind text, pBody text, pSubject text DEFAULT NULL,
    pAgent text DEFAULT NULL, pProfile text DEFAULT NULL, pDescription text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_id uuid;
BEGIN
    IF pKind IS NULL OR pKind NOT IN ('text', 'html', 'markdown', 'json') THEN
        RAISE EXCEPTION 'ERR-400-042: template kind "%" is not supported (text, html, markdown, json)', pKind
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

-- Adds the next version of a template; returns its number. pSubject NULL keeps the subject of the
-- newest version, '' removes it. Messages already built keep the version they record.
-- SECURITY DEFINER: as api.add_template.
CREATE FUNCTION api.update_template(pName text, pBody text, pSubject text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_id      uuid;
    v_version integer;
    v_subject text;
BEGIN
    -- FOR UPDATE: two concurrent edits get versions n+1 and n+2, not a unique violation.
    SELECT t.id INTO v_id FROM outbox.templates t WHERE t.name = pName FOR UPDATE;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'ERR-400-040: template "%" not found', pName USING ERRCODE = 'no_data_found';
    END IF;
    IF coalesce(pBody, '') = '' THEN
        RAISE EXCEPTION 'ERR-400-042: template "%" has an empty body', pName
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT v.version, v.subject INTO v_version, v_subject
      FROM outbox.template_versions v WHERE v.template_id = v_id
     ORDER BY v.version DESC LIMIT 1;
    INSERT INTO outbox.template_versions (template_id, version, subject, body)
    VALUES (v_id, v_version + 1, CASE WHEN pSubject IS NULL THEN v_subject ELSE nullif(pSubject, '') END,
            pBody);
    UPDATE outbox.templates SET updated_at = now() WHERE id = v_id;
    RETURN v_version + 1;
END
$$;

--------------------------------------------------------------------------------------------------
-- Messages built from a template
--------------------------------------------------------------------------------------------------

-- Creates and submits (as api.send_message) a message whose subject and content the daemon
-- renders from the template's newest version and pVars; the message records that version, so a
-- later edit never changes it. pAgent / pProfile NULL take the template's defaults. A pCode that
-- exists for the agent returns the existing message untouched (the idempotency key).
-- SECURITY DEFINER: inserts into outbox.messages and outbox.message_templates and submits, which
-- applications may not do on the tables.
CREATE FUNCTION api.send_template(
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
    IF v_template.kind = 'image' THEN
        RAISE EXCEPTION 'ERR-400-042: template kind "image" is not supported yet'
            USING ERRCODE = 'invalid_parameter_value';
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

CREATE FUNCTION api.send_template(
    pParent uuid, pAgent uuid, pProfile text, pAddress text, pTemplate text, pVars jsonb,
    pCode text DEFAULT NULL, pLabel text DEFAULT NULL, pDescription text DEFAULT NULL,
    pPriority integer DEFAULT 0, pSendAt timestamptz DEFAULT NULL, pMaxAttempts integer DEFAULT NULL
) RETURNS uuid
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT api.send_template(pParent, pAgent::text, pProfile, pAddress, pTemplate, pVars, pCode,
                             pLabel, pDescription, pPriority, pSendAt, pMaxAttempts)
$$;

--------------------------------------------------------------------------------------------------
-- Grants
--------------------------------------------------------------------------------------------------

-- The default privileges of 004 already keep PUBLIC out of what the owner creates; said again
-- here so that this file reads on its own.
REVOKE ALL ON outbox.templates, outbox.template_versions, outbox.message_templates FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.on_template_versions_update(), api.templates(),
    api.template(text, integer), api.preview_template(text, jsonb),
    outbox.message_templates_of(uuid[]),
    api.add_template(text, text, text, text, text, text, text),
    api.update_template(text, text, text),
    api.send_template(uuid, text, text, text, text, jsonb, text, text, text, integer, timestamptz, integer),
    api.send_template(uuid, uuid, text, text, text, jsonb, text, text, text, integer, timestamptz, integer)
    FROM PUBLIC;

-- The daemon renders (reads versions and variables); `outboxd template add` and `render` may run
-- as the daemon's role too, so it gets the api functions as well.
GRANT SELECT ON outbox.templates, outbox.template_versions, outbox.message_templates TO outboxd_daemon;
GRANT EXECUTE ON FUNCTION outbox.message_templates_of(uuid[]) TO outboxd_daemon;
GRANT EXECUTE ON FUNCTION api.templates(), api.template(text, integer),
    api.preview_template(text, jsonb),
    api.add_template(text, text, text, text, text, text, text),
    api.update_template(text, text, text),
    api.send_template(uuid, text, text, text, text, jsonb, text, text, text, integer, timestamptz, integer),
    api.send_template(uuid, uuid, text, text, text, jsonb, text, text, text, integer, timestamptz, integer)
    TO outboxd_app, outboxd_daemon;

--------------------------------------------------------------------------------------------------
-- Retention of template variables
--------------------------------------------------------------------------------------------------

-- A templated message has no content of its own: what it says (a reset link, a one-time code)
-- lives in its variables. Retention's content step (005) therefore also empties them, on the
-- same schedule and in the same batches. Same rights and lock as in 005.
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
         WHERE (d.content IS NOT NULL
                OR EXISTS (SELECT 1 FROM outbox.message_templates t
                            WHERE t.message_id = d.id AND t.vars <> '{}'::jsonb))
           AND ((d.class = 'outbox' AND d.state IN ('submitted', 'failed', 'deleted')
                 AND d.updated_at < now() - p_older_than)
                OR (d.class = 'inbox' AND d.created_at < now() - p_older_than))
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    ), cleared AS (
        UPDATE outbox.messages m SET content = NULL
          FROM doomed WHERE m.id = doomed.id
        RETURNING 1
    ), vars AS (
        UPDATE outbox.message_templates t SET vars = '{}'::jsonb
          FROM doomed WHERE t.message_id = doomed.id
    )
    SELECT count(*) INTO v_count FROM cleared;
    RETURN v_count;
END
$$;

INSERT INTO outbox.schema_migrations (version, name) VALUES (7, 'templates');

COMMIT;
