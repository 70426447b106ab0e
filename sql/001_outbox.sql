-- 001_outbox.sql — the outbox itself.
--
-- Adds the internal schema `outbox` (agents, states, the state machine as data, messages, delivery
-- attempts, state history) and the public schema `api` with the functions and the view that the
-- Apostol platform's message module uses, so DBAs and applications enqueue and inspect with plain
-- SQL. Run it with `psql -f sql/001_outbox.sql` or `outboxd migrate`; it is idempotent only through
-- `outbox.schema_migrations` (the runner skips it once recorded).
--
-- Design notes:
--   * Every state change of a message goes through an UPDATE of `outbox.messages.state`. One
--     statement-level trigger validates every change against `outbox.transitions`, writes the
--     history rows and sends `NOTIFY outbox` — set-based, so the daemon's batch statements pay one
--     trigger call per statement, not per row.
--   * The daemon's hot path (`outbox.claim`, `outbox.extend_leases`, `outbox.record_outcomes`,
--     `outbox.reclaim_expired`, `outbox.release`) is set-based: one round trip per batch.
--     Claiming uses FOR UPDATE SKIP LOCKED on a partial index of prepared messages
--     (https://www.postgresql.org/docs/15/sql-select.html#SQL-FOR-UPDATE-SHARE).

BEGIN;

CREATE SCHEMA IF NOT EXISTS outbox;
CREATE SCHEMA IF NOT EXISTS api;

CREATE TABLE outbox.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- Agents: who delivers a message. Routing in the daemon is by (type_code, code).
-- New agents are added by INSERT.
CREATE TABLE outbox.agents (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    type_code   text NOT NULL,
    code        text NOT NULL UNIQUE,
    name        text,
    description text
);

INSERT INTO outbox.agents (type_code, code, name, description) VALUES
    ('system.agent', 'system.agent', 'System',       'The platform itself'),
    ('system.agent', 'notice.agent', 'Notice',       'System notices'),
    ('system.agent', 'file.agent',   'File',         'Local spool file (no credentials needed)'),
    ('email.agent',  'smtp.agent',   'SMTP',         'E-mail over SMTP'),
    ('email.agent',  'pop3.agent',   'POP3',         'E-mail retrieval over POP3'),
    ('email.agent',  'imap.agent',   'IMAP',         'E-mail retrieval over IMAP'),
    ('api.agent',    'fcm.agent',    'Google FCM',   'Firebase Cloud Messaging HTTP v1'),
    ('api.agent',    'm2m.agent',    'MTS M2M',      'MTS Communicator M2M SMS'),
    ('api.agent',    'sba.agent',    'Sberbank',     'Sberbank internet acquiring'),
    ('api.agent',    'http.agent',   'HTTP API',     'Generic HTTP API');

-- States of an outbox message, with Apostol's state types.
CREATE TABLE outbox.states (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    code        text NOT NULL UNIQUE,
    label       text NOT NULL,
    type_code   text NOT NULL,
    type_label  text NOT NULL
);

INSERT INTO outbox.states (code, label, type_code, type_label) VALUES
    ('created',   'Created',   'created',  'Created'),
    ('prepared',  'Prepared',  'enabled',  'Enabled'),
    ('sending',   'Sending',   'enabled',  'Enabled'),
    ('submitted', 'Submitted', 'disabled', 'Disabled'),
    ('failed',    'Failed',    'disabled', 'Disabled'),
    ('deleted',   'Deleted',   'deleted',  'Deleted');

-- Actions. `internal` actions are used only by the daemon's hot path (they move a claimed message
-- back to prepared); api.execute_object_action refuses them.
CREATE TABLE outbox.actions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    code        text NOT NULL UNIQUE,
    label       text NOT NULL,
    internal    boolean NOT NULL DEFAULT false
);

INSERT INTO outbox.actions (code, label, internal) VALUES
    ('create',  'Create',  false),
    ('submit',  'Submit',  false),
    ('send',    'Send',    false),
    ('done',    'Done',    false),
    ('fail',    'Fail',    false),
    ('cancel',  'Cancel',  false),
    ('repeat',  'Repeat',  false),
    ('delete',  'Delete',  false),
    ('restore', 'Restore', false),
    ('retry',   'Retry after a transient failure', true),
    ('reclaim', 'Reclaim after an expired lease',  true),
    ('release', 'Hand back on shutdown',           true);

-- The state machine, as data. Anything not listed here raises ERR-400-032.
CREATE TABLE outbox.transitions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    from_state  text NOT NULL REFERENCES outbox.states (code),
    action      text NOT NULL REFERENCES outbox.actions (code),
    to_state    text NOT NULL REFERENCES outbox.states (code),
    notify      boolean NOT NULL DEFAULT false,
    UNIQUE (from_state, action)
);

INSERT INTO outbox.transitions (from_state, action, to_state, notify) VALUES
    ('created',   'submit',  'prepared',  true),
    ('created',   'delete',  'deleted',   false),
    ('prepared',  'send',    'sending',   false),
    ('prepared',  'done',    'submitted', false),
    ('prepared',  'fail',    'failed',    false),
    ('prepared',  'cancel',  'created',   false),
    ('sending',   'done',    'submitted', false),
    ('sending',   'fail',    'failed',    false),
    ('sending',   'delete',  'deleted',   false),
    ('submitted', 'repeat',  'prepared',  true),
    ('submitted', 'delete',  'deleted',   false),
    ('failed',    'repeat',  'prepared',  true),
    ('failed',    'delete',  'deleted',   false),
    ('deleted',   'restore', 'created',   false),
    -- daemon-internal: a claimed message goes back to the queue
    ('sending',   'retry',   'prepared',  false),
    ('sending',   'reclaim', 'prepared',  false),
    ('sending',   'release', 'prepared',  false);

-- A random 64-hex-digit code, as Apostol gives messages without an explicit one.
CREATE FUNCTION outbox.random_code() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '')
$$;

CREATE TABLE outbox.messages (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    class               text NOT NULL DEFAULT 'outbox' CHECK (class IN ('outbox', 'inbox')),
    parent              uuid REFERENCES outbox.messages (id) ON DELETE SET NULL,
    agent_id            uuid NOT NULL REFERENCES outbox.agents (id),
    -- idempotency key: unique per agent among outbox messages
    code                text NOT NULL DEFAULT outbox.random_code(),
    profile             text NOT NULL DEFAULT 'default',
    address             text,
    subject             text,
    content             text,
    label               text,
    description         text,
    -- A CHECK, not a foreign key to outbox.states: a key check per state change would be a row
    -- lock on the states table in every hot-path update.
    state               text NOT NULL DEFAULT 'created'
                        CHECK (state IN ('created', 'prepared', 'sending', 'submitted', 'failed', 'deleted')),
    priority            integer NOT NULL DEFAULT 0,
    send_at             timestamptz,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer CHECK (max_attempts IS NULL OR max_attempts > 0),
    lease_owner         text,
    lease_expires_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    last_error_code     text,
    provider_message_id text
);

COMMENT ON COLUMN outbox.messages.code IS 'Idempotency key, unique per agent among outbox messages; sent to providers that accept one';
COMMENT ON COLUMN outbox.messages.send_at IS 'Do not deliver before this time';
COMMENT ON COLUMN outbox.messages.next_attempt_at IS 'A prepared message is due when this time has passed';
COMMENT ON COLUMN outbox.messages.max_attempts IS 'NULL: the profile''s retry schedule decides';

CREATE UNIQUE INDEX messages_agent_code_key ON outbox.messages (agent_id, code) WHERE class = 'outbox';
-- The claim query walks this index only.
CREATE INDEX messages_due_idx ON outbox.messages (priority DESC, next_attempt_at) WHERE state = 'prepared';
CREATE INDEX messages_lease_idx ON outbox.messages (lease_expires_at) WHERE state = 'sending';
-- For api.outbox('created' | 'failed' | 'deleted'); prepared and sending have their own indexes
-- above, and leaving submitted out keeps the hot path's two updates from writing here.
CREATE INDEX messages_state_idx ON outbox.messages (state, created_at)
    WHERE state IN ('created', 'failed', 'deleted');
CREATE INDEX messages_parent_idx ON outbox.messages (parent) WHERE parent IS NOT NULL;

CREATE TABLE outbox.attempts (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- No foreign key, here and in outbox.history: both are append-only logs written by the same
    -- statements that change the message, and a per-row key check (a row lock on the message)
    -- would cost the hot path as much as the log itself. outbox.purge deletes them with their
    -- messages.
    message_id          uuid NOT NULL,
    attempt             integer NOT NULL,
    worker              text,
    -- done | retry | failed | interrupted
    outcome             text NOT NULL CHECK (outcome IN ('done', 'retry', 'failed', 'interrupted')),
    error_code          text,
    error_text          text,
    remote_status       integer,
    provider_message_id text,
    duration_ms         integer,
    finished_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX attempts_message_idx ON outbox.attempts (message_id, attempt);

CREATE TABLE outbox.history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  uuid NOT NULL,
    old_state   text,
    new_state   text NOT NULL,
    action      text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    changed_by  text NOT NULL
);
CREATE INDEX history_message_idx ON outbox.history (message_id, id);

--------------------------------------------------------------------------------------------------
-- The state machine trigger
--------------------------------------------------------------------------------------------------

-- Who made a change: the daemon sets `outbox.actor` to its worker id; otherwise the SQL user.
CREATE FUNCTION outbox.actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('outbox.actor', true), ''), current_user::text)
$$;

-- After INSERT: record creation; a message may be inserted as created or (bulk enqueue) prepared.
CREATE FUNCTION outbox.on_messages_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
    v_first uuid;
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE class = 'outbox' AND state NOT IN ('created', 'prepared')) THEN
        RAISE EXCEPTION 'ERR-400-032: an outbox message can only be created in state "created" or "prepared"'
            USING ERRCODE = 'check_violation';
    END IF;

    INSERT INTO outbox.history (message_id, old_state, new_state, action, changed_by)
    SELECT id, NULL, state, 'create', outbox.actor() FROM new_rows WHERE class = 'outbox';

    SELECT count(*), (array_agg(id))[1] INTO v_count, v_first
      FROM new_rows WHERE class = 'outbox' AND state = 'prepared';
    PERFORM outbox.notify_prepared(v_count, v_first,
        ARRAY(SELECT id FROM new_rows WHERE class = 'outbox' AND state = 'prepared' LIMIT 16));
    RETURN NULL;
END
$$;

-- NOTIFY outbox with the bare message id (as Apostol does). A bulk statement that prepares more than
-- 16 messages sends one notification (the first id) instead of a storm: a notification is only a
-- wake-up, and the daemon's claim query finds the rest.
CREATE FUNCTION outbox.notify_prepared(p_count integer, p_first uuid, p_ids uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    IF p_count IS NULL OR p_count = 0 THEN
        RETURN;
    ELSIF p_count > 16 THEN
        PERFORM pg_notify('outbox', p_first::text);
    ELSE
        FOREACH v_id IN ARRAY p_ids LOOP
            PERFORM pg_notify('outbox', v_id::text);
        END LOOP;
    END IF;
END
$$;

-- After UPDATE: validate every state change against outbox.transitions, write history, notify.
-- The action is taken from `outbox.action` (set by the functions below) when it matches the
-- change, otherwise from the unique public transition between the two states.
-- enable_nestloop = off: the plans of this function are cached per connection, and the transition
-- tables' row counts are those of the first call (often a batch of one), so the joins below were
-- planned as nested loops, O(rows²) per statement (about 250 ms for a batch of 500 in the daemon);
-- as hash joins they are linear.
CREATE FUNCTION outbox.on_messages_update() RETURNS trigger
LANGUAGE plpgsql SET enable_nestloop = off AS $$
DECLARE
    v_action text := nullif(current_setting('outbox.action', true), '');
    v_actor  text := outbox.actor();
    v_bad    uuid;
    v_old    text;
    v_new    text;
    v_count  bigint;
    v_ids    uuid[];
BEGIN
    -- One pass: pair the old and new rows, give each state change its action (the one the caller
    -- named in outbox.action when it fits, else the public one, else an internal one), log it.
    -- A change no transition allows gets no action; it is reported below, which aborts the
    -- statement and with it the history rows just written.
    WITH changed AS (
        SELECT n.id, o.state AS old_state, n.state AS new_state
          FROM new_rows n JOIN old_rows o USING (id)
         WHERE n.state IS DISTINCT FROM o.state
    ), resolved AS (
        SELECT DISTINCT ON (c.id) c.id, c.old_state, c.new_state, t.action, t.notify
          FROM changed c
          LEFT JOIN (outbox.transitions t JOIN outbox.actions a ON a.code = t.action)
                 ON t.from_state = c.old_state AND t.to_state = c.new_state
         ORDER BY c.id, (t.action = v_action) DESC NULLS LAST, a.internal, t.action
    ), logged AS (
        INSERT INTO outbox.history (message_id, old_state, new_state, action, changed_by)
        SELECT r.id, r.old_state, r.new_state, r.action, v_actor FROM resolved r
         WHERE r.action IS NOT NULL
    )
    SELECT (SELECT r.id FROM resolved r WHERE r.action IS NULL LIMIT 1),
           (SELECT count(*) FROM resolved r WHERE r.notify),
           ARRAY(SELECT r.id FROM resolved r WHERE r.notify LIMIT 16)
      INTO v_bad, v_count, v_ids;

    IF v_bad IS NOT NULL THEN
        SELECT o.state, n.state INTO v_old, v_new
          FROM old_rows o JOIN new_rows n USING (id) WHERE o.id = v_bad;
        RAISE EXCEPTION 'ERR-400-032: message % cannot go from state "%" to state "%"',
            v_bad, v_old, v_new
            USING ERRCODE = 'check_violation';
    END IF;
    IF v_count > 0 THEN
        PERFORM outbox.notify_prepared(v_count::integer, v_ids[1], v_ids);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_insert AFTER INSERT ON outbox.messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.on_messages_insert();

CREATE TRIGGER messages_update AFTER UPDATE ON outbox.messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.on_messages_update();

INSERT INTO outbox.schema_migrations (version, name) VALUES (1, 'outbox');

COMMIT;
