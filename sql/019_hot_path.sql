-- Migration 19: the hot path's recording step keeps a linear plan (issue 9).
--
-- outbox.record_outcomes (the thirteen-array form of 013, which the daemon calls and 003's form
-- wraps) is PL/pgSQL: its statements are planned once per connection and, after five calls, run
-- on a generic plan that cannot see the arrays. That plan guessed 10 rows for unnest(p_ids, …)
-- and 1 message in "sending" (the statistics of a table whose in-flight rows come and go), so it
-- joined as a nested loop over the messages in "sending", rescanning the whole input for each
-- one: O(batch × in flight) per call — 507 ms instead of 29 ms for a batch of 500 with 500 in
-- flight (auto_explain), most of the PostgreSQL CPU of the burn-down and of bench/floor.sql.
--
-- force_custom_plan plans each call with the arrays' real lengths (hash joins for a batch,
-- index lookups for a few rows). Planning a call costs well under a millisecond, a few µs per
-- message of a batch. The function's other settings (search_path, SECURITY DEFINER) are kept.
-- outbox.claim was measured the same way and gains nothing from it; it is left as it was.

BEGIN;

ALTER FUNCTION outbox.record_outcomes(text, uuid[], uuid[], integer[], text[], text[], text[],
                                      integer[], text[], integer[], integer[], text[], text[])
    SET plan_cache_mode = force_custom_plan;

INSERT INTO outbox.schema_migrations (version, name) VALUES (19, 'hot_path');

COMMIT;
