-- The change feed: a durable history of every change to a job, written in the
-- changing transaction by a trigger (so plain SQL writes are recorded too).
-- It backs StreamJobUpdates (live delivery, resume after a disconnect, catch-up
-- of slow subscribers) and ListJobEvents.
--
-- Ordering that cannot skip. Sequence numbers (and transaction ids) are taken
-- in one order and committed in another, so a reader that advances a cursor
-- past number n while a transaction holding n-1 is still open skips that
-- event when it commits. Each event therefore carries feed_xid, at least the
-- id of its writing transaction (pg_current_xact_id()), and readers only read
-- events with feed_xid below the horizon pg_snapshot_xmin(pg_current_snapshot())
-- of their own statement: every transaction below the horizon has ended, so
-- nothing can ever appear below it again. Readers walk (feed_xid, seq) in
-- order; a cursor there is exact and never skips.
--
-- Version order per job. A transaction can take its id before it waits for a
-- job's row lock, so a later version of a job could carry a smaller xid than
-- the version before it. feed_xid is therefore greatest(own xid, feed_xid of
-- the job's previous event): still at least the writer's xid (so the horizon
-- rule holds), and never smaller than the job's previous event (so one job's
-- events are in version order in (feed_xid, seq)).
--
-- No NOTIFY here: a transaction that issued NOTIFY holds a database-wide lock
-- through its commit. The service wakes other replicas after its commits, and
-- readers also poll the history, which catches plain SQL writes.
--
-- diesel runs this file inside one transaction (READ COMMITTED).

-- As in the stats rollup migration: block writers until the backfill below has
-- seen every committed row and the trigger is in place.
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE job_events (
    feed_xid         xid8        NOT NULL,
    seq              bigint      GENERATED ALWAYS AS IDENTITY,
    writer_xid       xid8,
    job_id           uuid        NOT NULL,
    version          bigint      NOT NULL,
    user_id          uuid,
    agent_identifier text        NOT NULL,
    status           job_status  NOT NULL,
    job_data         jsonb,
    result           jsonb,
    error_message    text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    started_at       timestamptz,
    completed_at     timestamptz,
    occurred_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT job_events_pkey PRIMARY KEY (feed_xid, seq)
);
COMMENT ON TABLE job_events IS
    'History of every committed change to a job (insert or update, by jobsvc or plain SQL): the job as it was just after the change. Written by trigger jobs_record_events in the changing transaction; read in (feed_xid, seq) order below the horizon pg_snapshot_xmin(pg_current_snapshot()) by the change feed, and per job by ListJobEvents. Pruned past the retention window by job_events_prune(). Row-level security: a user sees only its own jobs'' events; the service role sees all.';
COMMENT ON COLUMN job_events.feed_xid IS
    'Feed order, major: greatest(the writing transaction''s pg_current_xact_id(), feed_xid of the job''s previous event). At least the writer''s xid, so no event can commit below a reader''s horizon; never below the job''s previous event, so a job''s events are in version order.';
COMMENT ON COLUMN job_events.writer_xid IS
    'The writing transaction''s xid when it differs from feed_xid (borrowed from the job''s previous event); NULL when feed_xid is the writer''s own. A stream that starts from a snapshot of the existing jobs skips the events whose writer that snapshot already sees.';
COMMENT ON COLUMN job_events.seq IS 'Feed order, minor: insertion order (identity). Not commit order.';
COMMENT ON COLUMN job_events.job_id IS 'jobs.id of the changed job (no foreign key: history outlives a deleted job until pruned).';
COMMENT ON COLUMN job_events.version IS 'jobs.version after the change: 1 for the creation, +1 per update.';
COMMENT ON COLUMN job_events.user_id IS 'jobs.user_id after the change (NULL: owned by no user); the row-level security key.';
COMMENT ON COLUMN job_events.agent_identifier IS 'jobs.agent_identifier after the change.';
COMMENT ON COLUMN job_events.status IS 'jobs.status after the change.';
COMMENT ON COLUMN job_events.job_data IS 'jobs.job_data after the change.';
COMMENT ON COLUMN job_events.result IS 'jobs.result after the change.';
COMMENT ON COLUMN job_events.error_message IS 'jobs.error_message after the change.';
COMMENT ON COLUMN job_events.created_at IS 'jobs.created_at.';
COMMENT ON COLUMN job_events.updated_at IS 'jobs.updated_at after the change.';
COMMENT ON COLUMN job_events.started_at IS 'jobs.started_at after the change.';
COMMENT ON COLUMN job_events.completed_at IS 'jobs.completed_at after the change.';
COMMENT ON COLUMN job_events.occurred_at IS 'When the change was made: the writing transaction''s now().';
COMMENT ON INDEX job_events_pkey IS
    'Feed order: the change feed reads WHERE (feed_xid, seq) > cursor AND feed_xid < horizon ORDER BY feed_xid, seq; pruning deletes a prefix of it.';

CREATE INDEX job_events_job_version ON job_events (job_id, version);
COMMENT ON INDEX job_events_job_version IS
    'ListJobEvents: WHERE job_id = $1 AND version > $2 ORDER BY version; and the trigger''s lookup of a job''s previous event.';

-- The pruning watermark: every event at or below this position may have been
-- deleted, so a resume token below it is out of range.
CREATE TABLE job_events_pruned (
    singleton bool   PRIMARY KEY DEFAULT true CHECK (singleton),
    feed_xid  xid8   NOT NULL,
    seq       bigint NOT NULL
);
COMMENT ON TABLE job_events_pruned IS
    'One row: the (feed_xid, seq) of the last event deleted by job_events_prune(). Every deleted event is at or below it, every event above it is kept: a resume point below it cannot be served (OUT_OF_RANGE).';
INSERT INTO job_events_pruned VALUES (true, '0'::xid8, 0);

-------------------------------------------------------------------------------
-- The recording trigger.
-------------------------------------------------------------------------------
-- One statement per writing statement (transition table), not one per row.
-- SECURITY DEFINER: a user's write (role authenticated) records its events
-- without any privilege on job_events.
CREATE FUNCTION jobs_record_events() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_events (feed_xid, job_id, version, user_id, agent_identifier, status,
                                job_data, result, error_message, created_at, updated_at,
                                started_at, completed_at)
        SELECT pg_current_xact_id(), n.id, n.version, n.user_id, n.agent_identifier, n.status,
               n.job_data, n.result, n.error_message, n.created_at, n.updated_at,
               n.started_at, n.completed_at
        FROM new_rows n;
    ELSE
        -- LATERAL ... LIMIT 1 keeps the previous-event lookup an index probe per
        -- row whatever the planner guesses about the transition table.
        INSERT INTO job_events (feed_xid, writer_xid, job_id, version, user_id,
                                agent_identifier, status, job_data, result, error_message,
                                created_at, updated_at, started_at, completed_at)
        SELECT greatest(pg_current_xact_id(), p.feed_xid),
               CASE WHEN p.feed_xid > pg_current_xact_id() THEN pg_current_xact_id() END,
               n.id, n.version, n.user_id,
               n.agent_identifier, n.status, n.job_data, n.result, n.error_message,
               n.created_at, n.updated_at, n.started_at, n.completed_at
        FROM new_rows n
        LEFT JOIN LATERAL (
            SELECT e.feed_xid FROM job_events e
            WHERE e.job_id = n.id AND e.version < n.version
            ORDER BY e.version DESC LIMIT 1
        ) p ON true;
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION jobs_record_events() IS
    'AFTER INSERT / AFTER UPDATE statement trigger function on jobs (transition table new_rows): appends each changed row, as it is after the change, to job_events. SECURITY DEFINER so that users'' writes are recorded.';

CREATE TRIGGER jobs_record_events_insert
    AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_record_events();
COMMENT ON TRIGGER jobs_record_events_insert ON jobs IS
    'Records every created job in job_events (the change feed).';

CREATE TRIGGER jobs_record_events_update
    AFTER UPDATE ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_record_events();
COMMENT ON TRIGGER jobs_record_events_update ON jobs IS
    'Records every change to a job in job_events (the change feed).';

-------------------------------------------------------------------------------
-- Pruning.
-------------------------------------------------------------------------------
-- Deletes a prefix of the feed order: the events older than p_retention, up to
-- the first one that is younger (occurred_at is nearly but not exactly
-- monotonic in feed order; stopping there keeps the watermark exact), at most
-- p_max_rows per call. Returns the number of events deleted.
CREATE FUNCTION job_events_prune(p_retention interval, p_max_rows integer)
    RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
DECLARE
    v_last record;
    v_count bigint;
BEGIN
    SELECT feed_xid, seq INTO v_last
    FROM (
        SELECT feed_xid, seq, occurred_at,
               bool_and(occurred_at < now() - p_retention)
                   OVER (ORDER BY feed_xid, seq) AS all_old
        FROM (SELECT feed_xid, seq, occurred_at FROM job_events
              -- Never past the horizon: readers may not have seen what is above it.
              WHERE feed_xid < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY feed_xid, seq LIMIT p_max_rows) head
    ) s
    WHERE all_old
    ORDER BY feed_xid DESC, seq DESC
    LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- The watermark first: it only ever moves forward, and a concurrent
    -- pruner waits here for this one.
    UPDATE job_events_pruned
    SET feed_xid = v_last.feed_xid, seq = v_last.seq
    WHERE (feed_xid, seq) < (v_last.feed_xid, v_last.seq);
    DELETE FROM job_events WHERE (feed_xid, seq) <= (v_last.feed_xid, v_last.seq);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;
COMMENT ON FUNCTION job_events_prune(interval, integer) IS
    'Deletes job_events older than p_retention, oldest first in feed order and at most p_max_rows per call, and moves the watermark job_events_pruned to the last deleted event. Returns the number deleted; call until 0.';

-- After restoring a dump into another cluster: the restored feed_xid values belong to the
-- old cluster's transaction ids and would hold new events of those jobs above the new
-- cluster's horizon. This empties the history and moves the watermark to now, so every
-- earlier resume token is OUT_OF_RANGE (clients re-list).
CREATE FUNCTION job_events_reset() RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
BEGIN
    TRUNCATE job_events;
    UPDATE job_events_pruned SET feed_xid = pg_current_xact_id(), seq = 0;
END;
$$;
COMMENT ON FUNCTION job_events_reset() IS
    'Empties job_events and moves the pruning watermark to the current transaction: run once after restoring a dump into a different cluster (its transaction ids differ). Earlier resume tokens become OUT_OF_RANGE.';

-------------------------------------------------------------------------------
-- The history of the jobs that exist now: their current version.
-------------------------------------------------------------------------------
INSERT INTO job_events (feed_xid, job_id, version, user_id, agent_identifier, status,
                        job_data, result, error_message, created_at, updated_at,
                        started_at, completed_at, occurred_at)
SELECT pg_current_xact_id(), id, version, user_id, agent_identifier, status, job_data, result,
       error_message, created_at, updated_at, started_at, completed_at, updated_at
FROM jobs
ORDER BY created_at, id;

-------------------------------------------------------------------------------
-- Row-level security and privileges, as on jobs.
-------------------------------------------------------------------------------
ALTER TABLE job_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Users can view own job events" ON job_events
    FOR SELECT TO authenticated USING ((select auth.uid()) = user_id);
CREATE POLICY "Service role can view all job events" ON job_events
    FOR SELECT TO service_role USING (true);
COMMENT ON POLICY "Users can view own job events" ON job_events IS
    'A user reads the history of its own jobs only.';
COMMENT ON POLICY "Service role can view all job events" ON job_events IS
    'The service role reads every job''s history.';

REVOKE ALL ON job_events, job_events_pruned FROM PUBLIC;
GRANT SELECT ON job_events TO authenticated, service_role;
GRANT SELECT ON job_events_pruned TO service_role;
REVOKE EXECUTE ON FUNCTION jobs_record_events(), job_events_prune(interval, integer),
    job_events_reset() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION job_events_prune(interval, integer) TO service_role;
