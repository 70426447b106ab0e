-- The outbox floor: the bare SQL work per message of the daemon's hot path, no HTTP, no Rust.
-- One pgbench transaction = claim a batch with outbox.claim (FOR UPDATE SKIP LOCKED, prepared →
-- sending, leases, one claim id for the batch) in one statement, then mark the whole batch done with outbox.record_outcomes
-- (sending → submitted, one attempt row each, history by the statement trigger) in a second —
-- the same two round trips, in separate transactions, that outboxd makes per batch.
-- messages/s = tps × :batch. Run by outboxd-bench:  pgbench -n -f bench/floor.sql -D batch=500 …
SELECT array_agg(c.id)::text AS ids, count(*) AS n,
       array_fill((array_agg(k.claim_id))[1], ARRAY[count(*)::int])::text AS claims,
       array_fill('done'::text, ARRAY[count(*)::int])::text AS outcomes,
       array_fill(NULL::text, ARRAY[count(*)::int])::text AS nulls_t,
       array_fill(NULL::int, ARRAY[count(*)::int])::text AS nulls_i,
       array_fill(200, ARRAY[count(*)::int])::text AS statuses,
       array_fill(1, ARRAY[count(*)::int])::text AS ones
  FROM (SELECT gen_random_uuid() AS claim_id) k
 CROSS JOIN LATERAL outbox.claim('floor-' || :client_id, :batch, 60000, k.claim_id) c \gset
SELECT count(*) FROM outbox.record_outcomes('floor-' || :client_id, :ids, :claims, :ones, :outcomes, :nulls_t, :nulls_t, :statuses, :nulls_t, :ones, :nulls_i, :nulls_t);
