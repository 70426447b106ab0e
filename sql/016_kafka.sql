-- 016_kafka.sql — the Kafka trigger's committed offsets and dead letters.
--
-- Adds:
--   * outbox.kafka_offsets: per consumer group, topic and partition, the offset of the next
--     record to consume. The daemon's Kafka trigger (src/kafka) keeps its offsets here instead of
--     in Kafka's group coordinator, so that an offset moves in the same transaction as the
--     messages (or task runs) its records produced: a batch either enqueued everything and moved
--     the offset past it, or did neither. A record is never enqueued twice and never skipped,
--     whatever crashes where;
--   * outbox.kafka_dead_letters: the records the trigger refused (a body that is not JSON, an
--     unknown field, an unknown agent or task…), with the reason and the REST envelope's code for
--     it, kept so an operator can fix and replay them; the offset moves past them;
--   * outbox.kafka_take, outbox.kafka_dead_letter, outbox.kafka_advance (the daemon's batch
--     transaction), outbox.kafka_position (where a partition consumer starts), and
--     api.kafka_offsets / api.kafka_dead_letters, the views for operators.
--
-- One batch, one transaction (see README, "Kafka trigger"):
--   BEGIN; kafka_take (locks the partition's row, FOR UPDATE; creates it at the fetched offset);
--   per record: SAVEPOINT, api.send_message or api.run_task, or on a refusal ROLLBACK TO
--   SAVEPOINT and kafka_dead_letter; kafka_advance(next offset); COMMIT.
-- The row lock serializes two daemons consuming the same partition: the second one waits, then
-- sees the offset the first committed and skips what it already enqueued.
--
-- To replay from an earlier offset (after fixing a producer, say), stop the daemons and
--   UPDATE outbox.kafka_offsets SET next_offset = N WHERE consumer_group = … AND topic = … AND partition = …;
-- enqueue requests without a code carry the deterministic code kafka:<topic>:<partition>:<offset>,
-- so a replayed record that had been enqueued before is answered with the existing message.
--
-- Rights (see 004): the tables belong to the owner; the daemon reaches them only through the
-- SECURITY DEFINER functions below; operators (outboxd_app) read the api views.

BEGIN;

SET LOCAL ROLE outboxd_owner;
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE TABLE outbox.kafka_offsets (
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL CHECK (partition >= 0),
    -- The offset of the next record to consume: every record below it has been handled.
    next_offset    bigint NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
COMMENT ON TABLE outbox.kafka_offsets IS
    'Kafka trigger: committed offsets per consumer group, topic and partition (moved in the transaction that enqueued the records)';

CREATE TABLE outbox.kafka_dead_letters (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    "offset"       bigint NOT NULL,
    record_key     bytea,
    record_value   bytea,
    -- The REST envelope's code for the same refusal (40001 not JSON, 40002 invalid, 40003 unknown
    -- agent, 40401 unknown task), and what was wrong, as the REST answer's msg would say it.
    code           integer NOT NULL,
    reason         text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- A redelivered record is never dead-lettered twice (the offset row's lock makes that rare;
    -- this makes it impossible).
    UNIQUE (consumer_group, topic, partition, "offset")
);
COMMENT ON TABLE outbox.kafka_dead_letters IS
    'Kafka trigger: records refused (poison records), with the reason; the offset moved past them';

-- Locks the offset row of (group, topic, partition) for the batch's transaction and returns the
-- committed next offset; creates the row at p_fetched (where the consumer started) when there is
-- none. The caller skips every fetched record below the returned offset.
-- SECURITY DEFINER: locks and writes a table the daemon may not touch itself.
CREATE FUNCTION outbox.kafka_take(p_group text, p_topic text, p_partition integer, p_fetched bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
DECLARE
    v_next bigint;
BEGIN
    INSERT INTO outbox.kafka_offsets (consumer_group, topic, partition, next_offset)
    VALUES (p_group, p_topic, p_partition, p_fetched)
    ON CONFLICT (consumer_group, topic, partition) DO NOTHING;
    SELECT next_offset INTO v_next FROM outbox.kafka_offsets
     WHERE consumer_group = p_group AND topic = p_topic AND partition = p_partition
       FOR UPDATE;
    RETURN v_next;
END
$$;

-- Moves the committed offset forward to p_next (never back: a replay is an operator's UPDATE).
-- SECURITY DEFINER: as above.
CREATE FUNCTION outbox.kafka_advance(p_group text, p_topic text, p_partition integer, p_next bigint)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    UPDATE outbox.kafka_offsets
       SET next_offset = greatest(next_offset, p_next), updated_at = now()
     WHERE consumer_group = p_group AND topic = p_topic AND partition = p_partition;
$$;

-- Where a partition consumer starts: the committed next offset, or NULL for a partition this
-- group has never consumed (the daemon then starts at the earliest or latest offset, as
-- configured). Reads only; the row is created by the first batch's outbox.kafka_take.
-- SECURITY DEFINER: the daemon has no rights on the table.
CREATE FUNCTION outbox.kafka_position(p_group text, p_topic text, p_partition integer)
RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    SELECT next_offset FROM outbox.kafka_offsets
     WHERE consumer_group = p_group AND topic = p_topic AND partition = p_partition;
$$;

-- Records a refused record (in the batch's transaction, after its savepoint was rolled back).
-- SECURITY DEFINER: writes a table the daemon may not touch itself.
CREATE FUNCTION outbox.kafka_dead_letter(
    p_group text, p_topic text, p_partition integer, p_offset bigint,
    p_key bytea, p_value bytea, p_code integer, p_reason text
) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, outbox, pg_temp AS $$
    INSERT INTO outbox.kafka_dead_letters
        (consumer_group, topic, partition, "offset", record_key, record_value, code, reason)
    VALUES (p_group, p_topic, p_partition, p_offset, p_key, p_value, p_code, p_reason)
    ON CONFLICT (consumer_group, topic, partition, "offset") DO NOTHING;
$$;

-- A record's key or value as text when it is valid UTF-8, else NULL (the bytea column stays).
-- No SECURITY DEFINER: it touches no table.
CREATE FUNCTION outbox.kafka_text(p_bytes bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN convert_from(p_bytes, 'UTF8');
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
    RETURN NULL;
END
$$;

-- For operators: the offsets, and the dead letters with their key and value as text. Views run
-- with their owner's rights, so outboxd_app reads them without rights on the tables.
CREATE VIEW api.kafka_offsets AS
    SELECT consumer_group, topic, partition, next_offset, updated_at FROM outbox.kafka_offsets;

CREATE VIEW api.kafka_dead_letters AS
    SELECT id, consumer_group, topic, partition, "offset", code, reason,
           outbox.kafka_text(record_key) AS key_text, outbox.kafka_text(record_value) AS value_text,
           record_key, record_value, created_at
      FROM outbox.kafka_dead_letters;

--------------------------------------------------------------------------------------------------
-- Grants
--------------------------------------------------------------------------------------------------

REVOKE ALL ON outbox.kafka_offsets, outbox.kafka_dead_letters, api.kafka_offsets,
    api.kafka_dead_letters FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.kafka_take(text, text, integer, bigint),
    outbox.kafka_advance(text, text, integer, bigint),
    outbox.kafka_position(text, text, integer),
    outbox.kafka_dead_letter(text, text, integer, bigint, bytea, bytea, integer, text),
    outbox.kafka_text(bytea)
    FROM PUBLIC;

-- The daemon's batch transaction.
GRANT EXECUTE ON FUNCTION outbox.kafka_take(text, text, integer, bigint),
    outbox.kafka_advance(text, text, integer, bigint),
    outbox.kafka_position(text, text, integer),
    outbox.kafka_dead_letter(text, text, integer, bigint, bytea, bytea, integer, text)
    TO outboxd_daemon;

-- Operators and the CLI inspect.
GRANT SELECT ON api.kafka_offsets, api.kafka_dead_letters TO outboxd_app, outboxd_daemon;
GRANT EXECUTE ON FUNCTION outbox.kafka_text(bytea) TO outboxd_app, outboxd_daemon;

INSERT INTO outbox.schema_migrations (version, name) VALUES (16, 'kafka');

COMMIT;
