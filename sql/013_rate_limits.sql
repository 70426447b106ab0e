-- 013_rate_limits.sql — rate limits shared by every daemon, and the profile of each attempt
-- (issue 10: rate limits and provider fallback).
--
-- Why: a platform limits a robot or a bot (DingTalk: 20 messages a minute per robot, then blocked
-- for ten minutes), not a process. Four daemons that each kept their own limiter would send four
-- times the rate. The limiter's state therefore lives here, one row per rate window, and every
-- daemon takes its turn in one short transaction (`outbox.rate_take`, one round trip per message
-- of a limited profile, just before the provider call).
--
-- Adds:
--   * `outbox.rate_windows`: one row per (profile, window, key) — the bucket name says all three,
--     e.g. `dingbot/ops 20/60000ms` or `slack/alerts 1/1000ms #general`. `slots` holds the send
--     times granted in the window, ascending (the last `max_count` only; older ones no longer
--     matter). A window allows a send at t when fewer than `max_count` slots lie in (t - window, t]
--     — an exact sliding window: no `window` long interval ever holds more than `max_count` sends.
--     `blocked_until`: the platform said "too fast"; nothing before that time.
--   * `outbox.messages.rate_slot_at`, `rate_bucket`: the slot a deferred message reserved, and in
--     which window. A message over the limit is not failed and not charged: `rate_take` puts it back
--     to prepared (action `defer`, its attempt not counted, no attempt row), due at the slot it
--     reserved, so it holds no delivery slot while it waits and other profiles keep flowing. When it
--     is claimed again at that time, the reservation is its turn (unless it comes back late or the
--     window was blocked meanwhile: then it takes a new turn).
--   * `outbox.rate_block`: pushes windows back by the platform's block time (Retry-After, 130101…).
--   * `outbox.attempts.profile`: `<kind>/<profile>` of the connector that made the attempt — the
--     message's own profile, or the fallback profile that delivered it. `api.message_attempt` shows
--     it as its last column; `outbox.record_outcomes` takes it as a 13th array.
--
-- Times: `rate_take` and `rate_block` take the current time as a parameter (NULL: the database's
-- `now()`). The daemon passes NULL, so the fleet shares one clock whatever its hosts' clocks say;
-- tests pass their own, to drive the windows deterministically.
--
-- Rights (see 004): the functions write tables, so they are SECURITY DEFINER, executable by
-- outboxd_daemon only; the daemon may read the windows (status, tests).

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE outbox.rate_windows (
    bucket        text PRIMARY KEY,
    window_ms     integer NOT NULL CHECK (window_ms > 0),
    max_count     integer NOT NULL CHECK (max_count > 0),
    slots         timestamptz[] NOT NULL DEFAULT '{}',
    blocked_until timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE outbox.rate_windows IS
    'Fleet-wide rate windows: at most max_count sends in any window_ms long interval per bucket';
COMMENT ON COLUMN outbox.rate_windows.bucket IS '<kind>/<profile> <count>/<window_ms>ms [<recipient key>]';
COMMENT ON COLUMN outbox.rate_windows.slots IS 'Send times granted (ascending, the last max_count), reservations included';
COMMENT ON COLUMN outbox.rate_windows.blocked_until IS 'The platform answered "too fast": no send before this';

ALTER TABLE outbox.messages ADD COLUMN rate_slot_at timestamptz, ADD COLUMN rate_bucket text;
COMMENT ON COLUMN outbox.messages.rate_slot_at IS 'The send slot this message reserved when it was deferred by a rate limit';
COMMENT ON COLUMN outbox.messages.rate_bucket IS 'The rate window (outbox.rate_windows.bucket) of rate_slot_at';

ALTER TABLE outbox.attempts ADD COLUMN profile text;
COMMENT ON COLUMN outbox.attempts.profile IS
    '<kind>/<profile> that made the attempt (a fallback profile when it delivered); NULL before migration 13';

-- Appended at the end: readers of the view keep their columns.
CREATE OR REPLACE VIEW api.message_attempt AS
SELECT t.message_id, t.attempt, t.outcome, t.error_code, t.error_text, t.remote_status,
       t.provider_message_id, t.duration_ms, t.worker, t.finished_at, t.profile
  FROM outbox.attempts t;

-- A deferral: a claimed message goes back to the queue, uncharged.
INSERT INTO outbox.actions (code, label, internal) VALUES ('defer', 'Defer: over a rate limit', true);
INSERT INTO outbox.transitions (from_state, action, to_state, notify) VALUES ('sending', 'defer', 'prepared', false);

--------------------------------------------------------------------------------------------------
-- Taking a turn
--------------------------------------------------------------------------------------------------

-- Asks the windows p_buckets[i] (at most p_counts[i] sends per p_window_ms[i]) for a turn for
-- message p_id, which p_worker holds under claim p_claim_id. All windows of the message are locked
-- in bucket order (no deadlock between daemons) for the length of this one statement's transaction.
--
-- Each window's earliest turn is the first time t >= now with fewer than max_count slots in
-- (t - window, t], not before its last slot (slots stay ascending, so a reservation already granted
-- is never crowded by an earlier one) nor before blocked_until. When every window allows now, the
-- send time is appended to each and the result is `send`. Otherwise only the window that waits
-- longest gets a reservation, at its earliest turn, and the message is deferred to it: back to
-- prepared, its attempt not counted, no attempt row. Reserving only there keeps one busy recipient
-- (a per-chat window) from holding back the profile-wide window for everyone else.
-- A message claimed again with a reservation (rate_slot_at) that is due — not more than p_late_ms
-- late, and its window not blocked since — sends on it; a late or blocked one takes a new turn.
-- Returns one row (result `send` or `deferred`, the reserved slot, the wait in ms), or no row when
-- the claim is no longer held (the lease was lost: the daemon drops the delivery).
CREATE FUNCTION outbox.rate_take(p_worker text, p_id uuid, p_claim_id uuid, p_buckets text[],
                                 p_window_ms integer[], p_counts integer[], p_late_ms integer,
                                 p_now timestamptz DEFAULT NULL)
RETURNS TABLE (result text, slot_at timestamptz, wait_ms integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_now      timestamptz := coalesce(p_now, now());
    v_held_at  timestamptz;
    v_held_in  text;
    v_w        record;
    v_slots    timestamptz[];
    v_n        integer;
    v_earliest timestamptz;
    v_worst    timestamptz := NULL;
    v_worst_in text;
    v_wait     integer;
BEGIN
    SELECT m.rate_slot_at, m.rate_bucket INTO v_held_at, v_held_in
      FROM outbox.messages m
     WHERE m.id = p_id AND m.claim_id = p_claim_id AND m.state = 'sending' AND m.lease_owner = p_worker;
    IF NOT FOUND THEN
        RETURN;
    END IF;

    -- Windows seen for the first time (rarely: only then is the insert tried); sorted so that
    -- concurrent first inserts cannot deadlock.
    IF (SELECT count(*) FROM outbox.rate_windows w WHERE w.bucket = ANY (p_buckets))
       < cardinality(p_buckets) THEN
        INSERT INTO outbox.rate_windows (bucket, window_ms, max_count)
        SELECT b.bucket, b.window_ms, b.max_count
          FROM unnest(p_buckets, p_window_ms, p_counts) AS b(bucket, window_ms, max_count)
         ORDER BY b.bucket
        ON CONFLICT (bucket) DO NOTHING;
    END IF;

    -- A reservation is honoured only if it is due now, not too late, and its window is not blocked.
    IF v_held_at IS NOT NULL AND (v_held_in <> ALL (p_buckets)
         OR v_now - v_held_at > make_interval(secs => p_late_ms::double precision / 1000::double precision)) THEN
        v_held_at := NULL;
    END IF;

    FOR v_w IN
        SELECT w.bucket, w.window_ms, w.max_count, w.slots, w.blocked_until
          FROM outbox.rate_windows w
         WHERE w.bucket = ANY (p_buckets)
         ORDER BY w.bucket
           FOR UPDATE
    LOOP
        IF v_held_at IS NOT NULL AND v_w.bucket = v_held_in THEN
            IF v_w.blocked_until > v_held_at THEN
                v_held_at := NULL;  -- blocked after it was granted: take a new turn
            ELSE
                v_earliest := v_held_at;
                IF v_worst IS NULL OR v_earliest > v_worst THEN
                    v_worst := v_earliest;
                    v_worst_in := v_w.bucket;
                END IF;
                CONTINUE;
            END IF;
        END IF;
        -- Slots older than a window before now can never count again.
        v_slots := ARRAY(SELECT s FROM unnest(v_w.slots) AS s
                          WHERE s > v_now - make_interval(secs => v_w.window_ms::double precision / 1000::double precision)
                          ORDER BY s);
        v_n := cardinality(v_slots);
        v_earliest := v_now;
        IF v_n >= v_w.max_count THEN
            v_earliest := greatest(v_earliest, v_slots[v_n - v_w.max_count + 1]
                                   + make_interval(secs => v_w.window_ms::double precision / 1000::double precision));
        END IF;
        IF v_n > 0 THEN
            v_earliest := greatest(v_earliest, v_slots[v_n]);
        END IF;
        IF v_w.blocked_until IS NOT NULL THEN
            v_earliest := greatest(v_earliest, v_w.blocked_until);
        END IF;
        IF v_worst IS NULL OR v_earliest > v_worst THEN
            v_worst := v_earliest;
            v_worst_in := v_w.bucket;
        END IF;
    END LOOP;

    IF v_worst IS NULL OR v_worst <= v_now THEN
        -- Every window allows now: one slot in each (the honoured reservation is already there).
        UPDATE outbox.rate_windows w
           SET slots = (SELECT array_agg(s ORDER BY s) FROM (
                            SELECT s FROM unnest(w.slots || v_now) AS s
                             WHERE s > v_now - make_interval(secs => w.window_ms::double precision / 1000::double precision)
                             ORDER BY s DESC LIMIT w.max_count) AS kept),
               updated_at = now()
         WHERE w.bucket = ANY (p_buckets) AND w.bucket IS DISTINCT FROM
               (CASE WHEN v_held_at IS NOT NULL THEN v_held_in END);
        IF v_held_at IS NOT NULL OR (SELECT m.rate_slot_at FROM outbox.messages m WHERE m.id = p_id) IS NOT NULL THEN
            UPDATE outbox.messages m SET rate_slot_at = NULL, rate_bucket = NULL WHERE m.id = p_id;
        END IF;
        RETURN QUERY SELECT 'send'::text, v_now, 0;
        RETURN;
    END IF;

    -- Over the limit: reserve the worst window's turn (unless that is the reservation held) and
    -- defer the message to it.
    IF v_held_at IS NULL OR v_worst_in <> v_held_in THEN
        UPDATE outbox.rate_windows w
           SET slots = (SELECT array_agg(s ORDER BY s) FROM (
                            SELECT s FROM unnest(w.slots || v_worst) AS s
                             WHERE s > v_now - make_interval(secs => w.window_ms::double precision / 1000::double precision)
                             ORDER BY s DESC LIMIT w.max_count) AS kept),
               updated_at = now()
         WHERE w.bucket = v_worst_in;
    END IF;
    v_wait := ceil(extract(epoch FROM v_worst - v_now) * 1000)::integer;
    PERFORM set_config('outbox.action', 'defer', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    UPDATE outbox.messages m
       SET state = 'prepared',
           next_attempt_at = now() + make_interval(secs => v_wait::double precision / 1000::double precision),
           attempts = greatest(m.attempts - 1, 0),
           rate_slot_at = v_worst, rate_bucket = v_worst_in,
           lease_owner = NULL, lease_expires_at = NULL, claim_id = NULL, updated_at = now()
     WHERE m.id = p_id;
    RETURN QUERY SELECT 'deferred'::text, v_worst, v_wait;
END
$$;

-- The platform answered "too fast" (DingTalk 130101, HTTP 429 with Retry-After…): no window of
-- p_buckets grants a turn before now + p_block_ms (reservations made before are taken anew).
-- Returns the time the windows are blocked until.
CREATE FUNCTION outbox.rate_block(p_buckets text[], p_window_ms integer[], p_counts integer[],
                                  p_block_ms integer, p_now timestamptz DEFAULT NULL)
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_until timestamptz := coalesce(p_now, now())
                           + make_interval(secs => greatest(p_block_ms, 0)::double precision / 1000::double precision);
BEGIN
    INSERT INTO outbox.rate_windows AS w (bucket, window_ms, max_count, blocked_until)
    SELECT b.bucket, b.window_ms, b.max_count, v_until
      FROM unnest(p_buckets, p_window_ms, p_counts) AS b(bucket, window_ms, max_count)
     ORDER BY b.bucket
    ON CONFLICT (bucket) DO UPDATE
       SET blocked_until = greatest(w.blocked_until, EXCLUDED.blocked_until), updated_at = now();
    RETURN v_until;
END
$$;

--------------------------------------------------------------------------------------------------
-- Outcomes name the profile that made the attempt
--------------------------------------------------------------------------------------------------

-- As in 003, plus p_profiles[i]: `<kind>/<profile>` of the connector that made the attempt,
-- stored in outbox.attempts.profile. A new overload: 003's twelve-array form stays (below, it
-- calls this one without profiles) for scripts that call it. SECURITY DEFINER as in 004: the
-- daemon may not write tables.
CREATE FUNCTION outbox.record_outcomes(
    p_worker text, p_ids uuid[], p_claim_ids uuid[], p_attempts integer[], p_outcomes text[],
    p_error_codes text[], p_error_texts text[], p_remote_status integer[], p_provider_ids text[],
    p_duration_ms integer[], p_retry_delay_ms integer[], p_replies text[], p_profiles text[]
) RETURNS TABLE (id uuid, claim_id uuid, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_ids    uuid[];
    v_claims uuid[];
BEGIN
    PERFORM set_config('outbox.action', 'retry', true);
    PERFORM set_config('outbox.actor', p_worker, true);
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_claim_ids, p_outcomes, p_error_codes, p_error_texts,
                             p_remote_status, p_provider_ids, p_duration_ms, p_retry_delay_ms,
                             p_replies, p_profiles)
               AS u(id, claim_id, outcome, error_code, error_text, remote_status, provider_id,
                    duration_ms, retry_delay_ms, reply, profile)
    ), updated AS (
        UPDATE outbox.messages m
           SET state = CASE i.outcome WHEN 'done' THEN 'submitted' WHEN 'retry' THEN 'prepared' ELSE 'failed' END,
               next_attempt_at = CASE WHEN i.outcome = 'retry'
                                      THEN now() + make_interval(secs => coalesce(i.retry_delay_ms, 0)::double precision / 1000::double precision)
                                      ELSE m.next_attempt_at END,
               last_error_code = CASE WHEN i.outcome = 'done' THEN NULL ELSE i.error_code END,
               provider_message_id = coalesce(i.provider_id, m.provider_message_id),
               label = CASE WHEN i.outcome = 'done' AND m.label IS NULL THEN i.provider_id ELSE m.label END,
               lease_owner = NULL,
               lease_expires_at = NULL,
               updated_at = now()
          FROM input i
         WHERE m.id = i.id AND m.claim_id = i.claim_id AND m.state = 'sending'
           AND m.lease_owner = p_worker
        RETURNING m.id, m.claim_id, m.attempts, m.agent_id, m.profile, m.address, m.subject,
                  i.outcome, i.error_code, i.error_text, i.remote_status, i.provider_id,
                  i.duration_ms, i.reply, i.profile AS attempt_profile
    ), attempts AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, remote_status, provider_message_id, duration_ms,
                                     profile)
        SELECT u.id, u.attempts, u.claim_id, p_worker, u.outcome, u.error_code, u.error_text,
               u.remote_status, u.provider_id, u.duration_ms, u.attempt_profile
          FROM updated u
    ), replies AS (
        INSERT INTO outbox.messages (class, parent, agent_id, profile, address, subject, content)
        SELECT 'inbox', u.id, u.agent_id, u.profile, u.address, u.subject, u.reply
          FROM updated u
         WHERE u.reply IS NOT NULL AND u.outcome = 'done'
    )
    SELECT array_agg(u.id), array_agg(u.claim_id) INTO v_ids, v_claims FROM updated u;

    RETURN QUERY SELECT a.id, a.claim_id, 'recorded'::text FROM unnest(v_ids, v_claims) AS a(id, claim_id);
    IF coalesce(cardinality(v_ids), 0) = cardinality(p_ids) THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_claim_ids, p_attempts, p_outcomes, p_error_codes,
                             p_error_texts, p_remote_status, p_provider_ids, p_duration_ms,
                             p_profiles)
               AS u(id, claim_id, attempt, outcome, error_code, error_text, remote_status,
                    provider_id, duration_ms, profile)
    ), rest AS (
        SELECT i.* FROM input i
         WHERE NOT EXISTS (SELECT 1 FROM unnest(v_ids, v_claims) AS a(id, claim_id)
                            WHERE a.id = i.id AND a.claim_id = i.claim_id)
    ), judged AS (
        SELECT r.*,
               EXISTS (SELECT 1 FROM outbox.attempts t
                        WHERE t.message_id = r.id AND t.claim_id = r.claim_id) AS logged,
               EXISTS (SELECT 1 FROM outbox.attempts t
                        WHERE t.message_id = r.id AND t.claim_id = r.claim_id AND t.worker = p_worker
                          AND t.outcome = r.outcome
                          AND t.error_code IS NOT DISTINCT FROM r.error_code
                          AND coalesce(t.error_text, '') NOT LIKE 'stale:%')
               AND EXISTS (SELECT 1 FROM outbox.messages m
                            WHERE m.id = r.id AND m.claim_id = r.claim_id AND m.state <> 'sending')
               AS duplicate
          FROM rest r
    ), logged AS (
        INSERT INTO outbox.attempts (message_id, attempt, claim_id, worker, outcome, error_code,
                                     error_text, remote_status, provider_message_id, duration_ms,
                                     profile)
        SELECT j.id, j.attempt, j.claim_id, p_worker, j.outcome, j.error_code,
               'stale: the claim had lost its lease when this outcome arrived; the message was not changed'
                   || coalesce(' (' || j.error_text || ')', ''),
               j.remote_status, j.provider_id, j.duration_ms, j.profile
          FROM judged j
         WHERE NOT j.logged
    )
    SELECT j.id, j.claim_id, CASE WHEN j.duplicate THEN 'duplicate' ELSE 'stale' END
      FROM judged j;
END
$$;

-- 003's form, kept for callers that name no profile.
CREATE OR REPLACE FUNCTION outbox.record_outcomes(
    p_worker text, p_ids uuid[], p_claim_ids uuid[], p_attempts integer[], p_outcomes text[],
    p_error_codes text[], p_error_texts text[], p_remote_status integer[], p_provider_ids text[],
    p_duration_ms integer[], p_retry_delay_ms integer[], p_replies text[]
) RETURNS TABLE (id uuid, claim_id uuid, result text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT r.id, r.claim_id, r.result
      FROM outbox.record_outcomes(p_worker, p_ids, p_claim_ids, p_attempts, p_outcomes,
                                  p_error_codes, p_error_texts, p_remote_status, p_provider_ids,
                                  p_duration_ms, p_retry_delay_ms, p_replies,
                                  NULL::text[]) AS r
$$;

GRANT SELECT ON outbox.rate_windows TO outboxd_daemon;
GRANT EXECUTE ON FUNCTION
    outbox.rate_take(text, uuid, uuid, text[], integer[], integer[], integer, timestamptz),
    outbox.rate_block(text[], integer[], integer[], integer, timestamptz),
    outbox.record_outcomes(text, uuid[], uuid[], integer[], text[], text[], text[], integer[],
                           text[], integer[], integer[], text[], text[])
    TO outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (13, 'rate_limits');

COMMIT;
