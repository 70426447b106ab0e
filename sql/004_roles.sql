-- 004_roles.sql — least privilege: three roles, their grants, pinned search paths; `send_at` on
-- direct inserts.
--
-- Why: until now everything ran as whoever migrated (usually a superuser), every function resolved
-- names and operators through the caller's search_path, and PUBLIC could execute every function.
-- A user able to create a function or an operator in a schema on the daemon's search path could run
-- code as the daemon (`integer * interval` has no exact built-in match, so an exact
-- `public.*(integer, interval)` would win), and an application could run the daemon's hot path or
-- mark a message done.
--
-- Roles (cluster-wide, NOLOGIN groups; created here when missing; grant them to login roles):
--   outboxd_owner   owns the schemas `outbox` and `api` and everything in them; migrations after
--                   this one run as it (each begins with `SET LOCAL ROLE outboxd_owner`, so what it
--                   creates belongs to the owner and is not executable by PUBLIC).
--   outboxd_daemon  the daemon: runs the hot path (`outbox.claim`, `extend_leases`,
--                   `record_outcomes`, `reclaim_expired`, `release`, `release_claim`), reads
--                   messages, attempts and history, may run every public action (`send`, `done`,
--                   `fail` included) and `api.add_inbox`. No table writes, no DDL.
--   outboxd_app     applications: enqueue and inspect through `api.*` only (`api.send_message`,
--                   `api.add_outbox`, `api.outbox`, `api.get_service_message`, the `api` views,
--                   `api.set_object_label`, and the actions `submit`, `cancel`, `repeat`, `delete`,
--                   `restore`). `send`, `done` and `fail` are the daemon's (ERR-403-033).
-- `outbox.purge` stays the owner's (run it from cron as a member of outboxd_owner).
--
-- Every function of `outbox` and `api` gets `SET search_path = pg_catalog, outbox, pg_temp`
-- (pg_temp last: a temporary object can never shadow ours); bodies qualify `api.` names, so `api`
-- need not be on it. The loop below pins whatever exists when this runs, including functions of
-- migrations numbered before this one.
--
-- Also here: a row inserted directly with `send_at` in the future is not due before `send_at`, and
-- `api.execute_object_action` touches only outbox messages (an inbox reply is never submitted).
--
-- Error codes added: ERR-403-033 action reserved for the daemon (SQLSTATE 42501).

BEGIN;

-- What this migration creates (a column default, a trigger's WHEN clause) is resolved now, with
-- only the catalog on the path.
SET LOCAL search_path = pg_catalog, pg_temp;

--------------------------------------------------------------------------------------------------
-- Roles
--------------------------------------------------------------------------------------------------

-- Roles belong to the cluster, not to the database: another database on the same server may be
-- migrating at this very moment and create them first. Its CREATE ROLE then either is visible
-- (duplicate_object) or still uncommitted, and ours waits for it and fails on the catalog's unique
-- index (unique_violation); both mean the role exists.
DO $$
DECLARE
    v_role    text;
    v_comment text;
BEGIN
    FOR v_role, v_comment IN VALUES
        ('outboxd_owner',  'outboxd: owns the outbox and api schemas; migrations run as it'),
        ('outboxd_daemon', 'outboxd: the delivery daemon (hot path, reads)'),
        ('outboxd_app',    'outboxd: applications (enqueue and inspect through api.*)')
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
                EXECUTE format('COMMENT ON ROLE %I IS %L', v_role, v_comment);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
    -- A migrating user that is not a superuser (a managed server's CREATEROLE admin) must be a
    -- member of the owner to hand it the objects below and to run later migrations as it.
    IF NOT pg_catalog.pg_has_role(current_user, 'outboxd_owner', 'MEMBER') THEN
        EXECUTE format('GRANT outboxd_owner TO %I', current_user);
    END IF;
END
$$;

--------------------------------------------------------------------------------------------------
-- send_at on direct inserts
--------------------------------------------------------------------------------------------------

-- `INSERT … (state, send_at) VALUES ('prepared', <later>)` used to be due at once, since
-- next_attempt_at defaults to now(). A row trigger whose WHEN clause is false for rows without a
-- future send_at: bulk inserts without one pay nothing. UPDATE OF send_at postpones the same way
-- (the trigger never brings a message forward).
CREATE FUNCTION outbox.on_messages_send_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.next_attempt_at := NEW.send_at;
    RETURN NEW;
END
$$;

CREATE TRIGGER messages_send_at BEFORE INSERT OR UPDATE OF send_at ON outbox.messages
    FOR EACH ROW WHEN (NEW.send_at > NEW.next_attempt_at)
    EXECUTE FUNCTION outbox.on_messages_send_at();

--------------------------------------------------------------------------------------------------
-- Per-row costs of a pinned search_path
--------------------------------------------------------------------------------------------------

-- A function with a SET clause is no longer inlined: every call pays a GUC save and restore (a few
-- microseconds). Two were called per row of a bulk insert; no longer:
-- the default of `code` becomes outbox.random_code()'s own expression (a default is stored parsed,
-- its functions fixed now, so it needs no pinning)…
ALTER TABLE outbox.messages ALTER COLUMN code
    SET DEFAULT replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');

-- …and the insert trigger asks outbox.actor() once per statement (001's body otherwise).
CREATE OR REPLACE FUNCTION outbox.on_messages_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
    v_first uuid;
    v_actor text := outbox.actor();
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE class = 'outbox' AND state NOT IN ('created', 'prepared')) THEN
        RAISE EXCEPTION 'ERR-400-032: an outbox message can only be created in state "created" or "prepared"'
            USING ERRCODE = 'check_violation';
    END IF;

    INSERT INTO outbox.history (message_id, old_state, new_state, action, changed_by)
    SELECT id, NULL, state, 'create', v_actor FROM new_rows WHERE class = 'outbox';

    SELECT count(*), (array_agg(id))[1] INTO v_count, v_first
      FROM new_rows WHERE class = 'outbox' AND state = 'prepared';
    PERFORM outbox.notify_prepared(v_count, v_first,
        ARRAY(SELECT id FROM new_rows WHERE class = 'outbox' AND state = 'prepared' LIMIT 16));
    RETURN NULL;
END
$$;

--------------------------------------------------------------------------------------------------
-- Actions: who may run which
--------------------------------------------------------------------------------------------------

ALTER TABLE outbox.actions ADD COLUMN daemon_only boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN outbox.actions.daemon_only IS
    'Only the daemon (outboxd_daemon) may run it through api.execute_object_action';
UPDATE outbox.actions SET daemon_only = true WHERE code IN ('send', 'done', 'fail');

-- Who made a change: the daemon sets `outbox.actor` to its worker id; otherwise the login.
-- session_user, not current_user: inside the SECURITY DEFINER functions below current_user is
-- outboxd_owner, which would say nothing.
CREATE OR REPLACE FUNCTION outbox.actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('outbox.actor', true), ''), session_user::text)
$$;

-- The body of api.execute_object_action (see 002 for the return shape), called only from the two
-- SECURITY DEFINER functions below, so it runs as the owner; nobody else may execute it.
-- pDaemon: whether daemon-only actions are allowed. Only outbox messages are touched: an inbox
-- reply is "not found" here.
CREATE FUNCTION outbox.run_action(pObject uuid, pAction text, pParams jsonb, pDaemon boolean)
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
    IF v_action.daemon_only AND NOT pDaemon THEN
        RAISE EXCEPTION 'ERR-403-033: action "%" is reserved for the daemon (role outboxd_daemon)', v_action.code
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    SELECT state INTO v_state FROM outbox.messages WHERE id = pObject AND class = 'outbox' FOR UPDATE;
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
           -- double precision: make_interval's own type, so no cast is needed to pick the
           -- function (002 passed numeric, which an exact make_interval(secs numeric) would win).
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

-- SECURITY DEFINER: updates outbox.messages, which applications may not write. Executable by
-- outboxd_app and outboxd_daemon; refuses the daemon-only actions.
CREATE FUNCTION outbox.object_action(pObject uuid, pAction text, pParams jsonb) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER AS $$
    SELECT outbox.run_action(pObject, pAction, pParams, false)
$$;

-- SECURITY DEFINER: as above; executable by outboxd_daemon only, so it allows every public action.
CREATE FUNCTION outbox.daemon_action(pObject uuid, pAction text, pParams jsonb) RETURNS jsonb
LANGUAGE sql SECURITY DEFINER AS $$
    SELECT outbox.run_action(pObject, pAction, pParams, true)
$$;

-- Runs one action of the state machine (Apostol's name and shape). Not SECURITY DEFINER on
-- purpose: it runs as the caller, so the caller's own EXECUTE right on outbox.daemon_action
-- (membership of outboxd_daemon, or the owner) decides whether send/done/fail are allowed.
CREATE OR REPLACE FUNCTION api.execute_object_action(pObject uuid, pAction text, pParams jsonb DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    IF has_function_privilege('outbox.daemon_action(uuid, text, jsonb)', 'EXECUTE') THEN
        RETURN outbox.daemon_action(pObject, pAction, pParams);
    END IF;
    RETURN outbox.object_action(pObject, pAction, pParams);
END
$$;

--------------------------------------------------------------------------------------------------
-- Ownership: everything in outbox and api belongs to outboxd_owner
--------------------------------------------------------------------------------------------------

ALTER SCHEMA outbox OWNER TO outboxd_owner;
ALTER SCHEMA api OWNER TO outboxd_owner;

DO $$
DECLARE
    r record;
BEGIN
    -- Tables, views and free-standing sequences (an identity sequence follows its table).
    FOR r IN
        SELECT c.oid::regclass AS name,
               CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                              WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                              ELSE 'TABLE' END AS kind
          FROM pg_catalog.pg_class c
         WHERE c.relnamespace IN ('outbox'::regnamespace, 'api'::regnamespace)
           AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                            WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                              AND d.deptype IN ('a', 'i') AND c.relkind = 'S')
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO outboxd_owner', r.kind, r.name);
    END LOOP;

    FOR r IN
        SELECT p.oid::regprocedure AS name, CASE p.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END AS kind
          FROM pg_catalog.pg_proc p
         WHERE p.pronamespace IN ('outbox'::regnamespace, 'api'::regnamespace) AND p.prokind IN ('f', 'p')
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO outboxd_owner', r.kind, r.name);
    END LOOP;

    -- Free-standing types (enums, domains, composite types; not tables' row types or arrays).
    FOR r IN
        SELECT t.oid::regtype AS name
          FROM pg_catalog.pg_type t
          LEFT JOIN pg_catalog.pg_class c ON c.oid = t.typrelid
         WHERE t.typnamespace IN ('outbox'::regnamespace, 'api'::regnamespace)
           AND t.typelem = 0 AND (t.typrelid = 0 OR c.relkind = 'c')
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO outboxd_owner', r.name);
    END LOOP;
END
$$;

--------------------------------------------------------------------------------------------------
-- SECURITY DEFINER where a function needs table rights its callers do not have
--------------------------------------------------------------------------------------------------

-- The hot path writes outbox.messages, outbox.attempts and outbox.history; the daemon may only
-- read them, so these run as the owner. By name, every overload: the signatures may change
-- (fencing tokens) in other migrations.
-- api.add_outbox, api.send_message: insert (and submit) an outbox message for applications.
-- api.add_inbox: inserts an inbox reply (daemon only).
-- api.set_object_label: updates a message's label.
-- (The uuid overloads only call the text ones; definer too, which changes nothing.)
-- Not definer: api.outbox and api.get_service_message (they read the api.service_message view,
-- which its callers may read), api.execute_object_action (see above), outbox.purge (the owner's).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT p.oid::regprocedure AS name
          FROM pg_catalog.pg_proc p
         WHERE (p.pronamespace = 'outbox'::regnamespace
                AND p.proname IN ('claim', 'extend_leases', 'record_outcomes', 'reclaim_expired',
                                  'release', 'release_claim'))
            OR (p.pronamespace = 'api'::regnamespace
                AND p.proname IN ('add_outbox', 'send_message', 'add_inbox', 'set_object_label'))
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', r.name);
    END LOOP;
END
$$;

--------------------------------------------------------------------------------------------------
-- Pinned search_path on every function of outbox and api
--------------------------------------------------------------------------------------------------

-- Functions that already pin one (a later migration's own choice) keep it; the test suite checks
-- that every function pins one made of pg_catalog, outbox, api and pg_temp only.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT p.oid::regprocedure AS name, CASE p.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END AS kind
          FROM pg_catalog.pg_proc p
         WHERE p.pronamespace IN ('outbox'::regnamespace, 'api'::regnamespace) AND p.prokind IN ('f', 'p')
           AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) s WHERE s LIKE 'search\_path=%')
    LOOP
        EXECUTE format('ALTER %s %s SET search_path = pg_catalog, outbox, pg_temp', r.kind, r.name);
    END LOOP;
END
$$;

--------------------------------------------------------------------------------------------------
-- Grants
--------------------------------------------------------------------------------------------------

REVOKE ALL ON SCHEMA outbox, api FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox, api FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox, api FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox, api FROM PUBLIC;
-- What the owner creates later is not executable by PUBLIC either (PostgreSQL's default is that
-- it is).
ALTER DEFAULT PRIVILEGES FOR ROLE outboxd_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- USAGE on outbox for applications only lets api.execute_object_action (running as the caller)
-- call outbox.object_action; every other object there is closed to them.
GRANT USAGE ON SCHEMA api, outbox TO outboxd_app, outboxd_daemon;

GRANT SELECT ON api.service_message, api.message_attempt, api.message_history
    TO outboxd_app, outboxd_daemon;
-- The daemon reads the outbox itself (`outboxd status` reads messages and attempts), and the
-- migration list (`migrate_on_start` on an up-to-date database is then a no-op).
GRANT SELECT ON outbox.messages, outbox.attempts, outbox.history, outbox.agents, outbox.states,
    outbox.actions, outbox.transitions, outbox.schema_migrations TO outboxd_daemon;

-- EXECUTE by name, every overload (GRANT … ON FUNCTION without an argument list refuses
-- overloaded names, and other migrations may change the hot path's signatures).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT p.oid::regprocedure AS name, g.grantees
          FROM (VALUES
                -- Enqueue and inspect.
                ('api',    'add_outbox',            'outboxd_app, outboxd_daemon'),
                ('api',    'send_message',          'outboxd_app, outboxd_daemon'),
                ('api',    'outbox',                'outboxd_app, outboxd_daemon'),
                ('api',    'get_service_message',   'outboxd_app, outboxd_daemon'),
                ('api',    'set_object_label',      'outboxd_app, outboxd_daemon'),
                ('api',    'execute_object_action', 'outboxd_app, outboxd_daemon'),
                ('outbox', 'object_action',         'outboxd_app, outboxd_daemon'),
                -- The daemon's: replies, send/done/fail, the hot path.
                ('api',    'add_inbox',             'outboxd_daemon'),
                ('outbox', 'daemon_action',         'outboxd_daemon'),
                ('outbox', 'claim',                 'outboxd_daemon'),
                ('outbox', 'extend_leases',         'outboxd_daemon'),
                ('outbox', 'record_outcomes',       'outboxd_daemon'),
                ('outbox', 'reclaim_expired',       'outboxd_daemon'),
                ('outbox', 'release',               'outboxd_daemon'),
                ('outbox', 'release_claim',         'outboxd_daemon')
               ) AS g (schema_name, function_name, grantees)
          JOIN pg_catalog.pg_proc p
            ON p.pronamespace = g.schema_name::regnamespace AND p.proname = g.function_name
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', r.name, r.grantees);
    END LOOP;
END
$$;

INSERT INTO outbox.schema_migrations (version, name) VALUES (4, 'roles');

COMMIT;
