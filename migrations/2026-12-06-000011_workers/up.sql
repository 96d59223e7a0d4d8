-- Workers: jobs are handed out with ClaimJobs under a lease, kept with Heartbeat, retried
-- with backoff, and completed only by the lease that holds them.
--
-- New columns keep the origin's meaning of the old ones: a job created by plain SQL is
-- priority 0, ready at once, tried once (max_attempts 1: no retry, the origin's behaviour).
--
-- A heartbeat is not a change. It sets only lease_expires_at (and progress), so:
-- - jobs_touch fires only for updates of the other columns (UPDATE OF ...): a lease renewal
--   keeps version and updated_at, and since no indexed column changes, PostgreSQL can write
--   it as a HOT update (no index entries), which matters for the hottest write a worker makes;
-- - jobs_touch_progress bumps version when progress changes, at most once a second per job
--   (a progress report more often is stored, and shows with the next change);
-- - the history trigger records only rows whose version changed.
-- A column added to jobs later must be added to jobs_touch's column list.
--
-- diesel runs this file inside one transaction.

ALTER TABLE jobs
    ADD COLUMN priority integer NOT NULL DEFAULT 0
        CONSTRAINT jobs_priority_range CHECK (priority BETWEEN -1000 AND 1000),
    ADD COLUMN run_after timestamptz,
    ADD COLUMN attempt integer NOT NULL DEFAULT 0
        CONSTRAINT jobs_attempt_range CHECK (attempt >= 0),
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 1
        CONSTRAINT jobs_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 100),
    ADD COLUMN initial_backoff interval,
    ADD COLUMN lease_id uuid,
    ADD COLUMN lease_expires_at timestamptz,
    ADD COLUMN lease_duration interval,
    ADD COLUMN worker_id text
        CONSTRAINT jobs_worker_id_length CHECK (char_length(worker_id) <= 255),
    ADD COLUMN progress jsonb;
COMMENT ON COLUMN jobs.priority IS 'ClaimJobs takes higher priorities first (-1000..1000, default 0).';
COMMENT ON COLUMN jobs.run_after IS 'Not claimable before this time; NULL: at once. Set by a retry to now + backoff.';
COMMENT ON COLUMN jobs.attempt IS 'Claims so far (0 until the first); a released claim does not count.';
COMMENT ON COLUMN jobs.max_attempts IS 'Claims allowed in all (1..100; 1 = no retry): a failure or an expired lease on an earlier attempt goes back to pending.';
COMMENT ON COLUMN jobs.initial_backoff IS 'The first retry''s delay for this job; NULL: the server''s default. Doubles (the server''s multiplier) per attempt, capped, with +/-10% jitter.';
COMMENT ON COLUMN jobs.lease_id IS 'The lease of the current (or last) claim; completion and heartbeats must name it. Kept after the lease ends, so a retried completion is recognised.';
COMMENT ON COLUMN jobs.lease_expires_at IS 'While leased: when the lease ends unless a heartbeat extends it; NULL otherwise.';
COMMENT ON COLUMN jobs.lease_duration IS 'The lease duration of the current claim: what a heartbeat extends by when it names none.';
COMMENT ON COLUMN jobs.worker_id IS 'The label of the worker that claimed the job last; kept after the lease ends.';
COMMENT ON COLUMN jobs.progress IS 'The last progress a heartbeat reported (any JSON).';

-- ClaimJobs: pending jobs of one agent, ready ones first by priority then age. Partial, so
-- finished jobs cost it nothing.
CREATE INDEX jobs_claim ON jobs (agent_identifier, priority DESC, (coalesce(run_after, created_at)), id)
    WHERE status = 'pending';
COMMENT ON INDEX jobs_claim IS
    'ClaimJobs: WHERE status = ''pending'' AND agent_identifier = $1 AND coalesce(run_after, created_at) <= now() ORDER BY priority DESC, coalesce(run_after, created_at), id ... FOR UPDATE SKIP LOCKED.';

-- The lease sweeper: running jobs under a lease. lease_expires_at is deliberately not in any
-- index (nor a predicate), so a heartbeat changes no indexed column.
CREATE INDEX jobs_leased ON jobs (id) WHERE status = 'running' AND lease_id IS NOT NULL;
COMMENT ON INDEX jobs_leased IS
    'The lease sweeper''s scan of leased running jobs (jobs_expire_leases). Holds no column a heartbeat changes, so heartbeats stay HOT updates.';

-- The history carries the new columns a job shows.
ALTER TABLE job_events
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN run_after timestamptz,
    ADD COLUMN attempt integer NOT NULL DEFAULT 0,
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 1,
    ADD COLUMN lease_expires_at timestamptz,
    ADD COLUMN worker_id text,
    ADD COLUMN progress jsonb;

-- version and updated_at: bumped by every update except a heartbeat's (see the top).
DROP TRIGGER jobs_touch ON jobs;
CREATE TRIGGER jobs_touch
    BEFORE UPDATE OF id, user_id, agent_identifier, status, job_data, result, error_message,
        created_at, updated_at, started_at, completed_at, version, request_id, job_data_bytes,
        priority, run_after, attempt, max_attempts, initial_backoff, lease_id, lease_duration,
        worker_id
    ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_touch();
COMMENT ON TRIGGER jobs_touch ON jobs IS
    'Keeps jobs.updated_at and jobs.version current on every UPDATE of any column but lease_expires_at and progress (a heartbeat is not a change; see jobs_touch_progress). A column added to jobs must be added to this list.';

CREATE FUNCTION jobs_touch_progress() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.version = OLD.version AND OLD.updated_at <= now() - interval '1 second' THEN
        NEW.updated_at := now();
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION jobs_touch_progress() IS
    'BEFORE UPDATE OF progress trigger function: a progress change is a change (version + 1, a history event), at most once a second per job; one sooner is stored and shows with the next change.';
-- Named to run after jobs_touch (triggers of one kind fire in name order).
CREATE TRIGGER jobs_touch_progress
    BEFORE UPDATE OF progress ON jobs
    FOR EACH ROW WHEN (NEW.progress IS DISTINCT FROM OLD.progress)
    EXECUTE FUNCTION jobs_touch_progress();

-- The history: the new columns, and only rows whose version changed (a heartbeat's lease
-- renewal is no event).
CREATE OR REPLACE FUNCTION jobs_record_events() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_events (feed_xid, job_id, version, user_id, agent_identifier, status,
                                job_data, result, error_message, created_at, updated_at,
                                started_at, completed_at, priority, run_after, attempt,
                                max_attempts, lease_expires_at, worker_id, progress)
        SELECT pg_current_xact_id(), n.id, n.version, n.user_id, n.agent_identifier, n.status,
               n.job_data, n.result, n.error_message, n.created_at, n.updated_at,
               n.started_at, n.completed_at, n.priority, n.run_after, n.attempt,
               n.max_attempts, n.lease_expires_at, n.worker_id, n.progress
        FROM new_rows n;
    ELSE
        -- LATERAL ... LIMIT 1 keeps the previous-event lookup an index probe per
        -- row whatever the planner guesses about the transition table.
        INSERT INTO job_events (feed_xid, writer_xid, job_id, version, user_id,
                                agent_identifier, status, job_data, result, error_message,
                                created_at, updated_at, started_at, completed_at, priority,
                                run_after, attempt, max_attempts, lease_expires_at, worker_id,
                                progress)
        SELECT greatest(pg_current_xact_id(), p.feed_xid),
               CASE WHEN p.feed_xid > pg_current_xact_id() THEN pg_current_xact_id() END,
               n.id, n.version, n.user_id,
               n.agent_identifier, n.status, n.job_data, n.result, n.error_message,
               n.created_at, n.updated_at, n.started_at, n.completed_at, n.priority,
               n.run_after, n.attempt, n.max_attempts, n.lease_expires_at, n.worker_id,
               n.progress
        FROM new_rows n
        JOIN old_rows o ON o.id = n.id AND o.version IS DISTINCT FROM n.version
        LEFT JOIN LATERAL (
            SELECT e.feed_xid FROM job_events e
            WHERE e.job_id = n.id AND e.version < n.version
            ORDER BY e.version DESC LIMIT 1
        ) p ON true;
    END IF;
    RETURN NULL;
END;
$$;
DROP TRIGGER jobs_record_events_update ON jobs;
CREATE TRIGGER jobs_record_events_update
    AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_record_events();
COMMENT ON TRIGGER jobs_record_events_update ON jobs IS
    'Records every change to a job in job_events (the change feed); an update that keeps the version (a heartbeat''s lease renewal) is no change.';

-- A retry's delay: initial * multiplier^(attempt - 1), at most p_max, +/-10% jitter.
-- Computed in seconds (float) so that no attempt count can overflow an interval.
CREATE FUNCTION jobs_retry_delay(p_attempt integer, p_initial interval, p_multiplier float8,
                                 p_max interval) RETURNS interval
    LANGUAGE sql
    VOLATILE
AS $$
    SELECT make_interval(secs => least(
               extract(epoch FROM p_max)::float8,
               extract(epoch FROM p_initial)::float8
                   * power(p_multiplier, least(greatest(p_attempt - 1, 0), 200)))
           * (0.9 + 0.2 * random()));
$$;
COMMENT ON FUNCTION jobs_retry_delay(integer, interval, float8, interval) IS
    'The delay before retry number p_attempt: p_initial * p_multiplier^(p_attempt - 1), at most p_max, with +/-10% jitter.';

-- The lease sweeper: leased running jobs whose lease ended without a heartbeat go back to
-- pending (attempts left: run_after = now + backoff) or to failed, with an error message.
-- A compare-and-set: rows locked by another transaction (a heartbeat, a completion) are
-- skipped, and the condition is checked again on the row as it is when locked, so a lease
-- renewed or a job completed meanwhile is never touched.
CREATE FUNCTION jobs_expire_leases(p_initial interval, p_multiplier float8, p_max interval,
                                   p_max_rows integer,
                                   OUT retried bigint, OUT failed bigint)
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
    WITH expired AS (
        SELECT id FROM jobs
        WHERE status = 'running' AND lease_id IS NOT NULL AND lease_expires_at < now()
        LIMIT p_max_rows
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE jobs SET
            status = CASE WHEN attempt < max_attempts THEN 'pending' ELSE 'failed' END::job_status,
            run_after = CASE WHEN attempt < max_attempts
                             THEN now() + jobs_retry_delay(attempt, coalesce(initial_backoff, p_initial), p_multiplier, p_max)
                             ELSE run_after END,
            completed_at = CASE WHEN attempt < max_attempts THEN NULL ELSE now() END,
            error_message = format('lease expired on attempt %s of %s (worker %s did not heartbeat)',
                                   attempt, max_attempts, coalesce(worker_id, 'unnamed')),
            lease_expires_at = NULL
        WHERE id IN (SELECT id FROM expired)
          AND status = 'running' AND lease_id IS NOT NULL AND lease_expires_at < now()
        RETURNING status
    )
    SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'failed')
    FROM moved;
$$;
COMMENT ON FUNCTION jobs_expire_leases(interval, float8, interval, integer) IS
    'Lease sweeper batch: at most p_max_rows leased RUNNING jobs whose lease expired go back to PENDING with a backoff (attempts left) or to FAILED, never touching a job whose lease was renewed or that left RUNNING meanwhile; returns how many of each.';
REVOKE EXECUTE ON FUNCTION jobs_expire_leases(interval, float8, interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION jobs_expire_leases(interval, float8, interval, integer) TO service_role;

-- The running-timeout sweeper handles only jobs that were never leased: a leased job has its
-- lease for that.
CREATE OR REPLACE FUNCTION jobs_fail_stale_running(p_timeout interval, p_max_rows integer)
    RETURNS bigint
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
    WITH stale AS (
        SELECT id FROM jobs
        WHERE status = 'running' AND started_at < now() - p_timeout AND lease_id IS NULL
        ORDER BY started_at
        LIMIT p_max_rows
        FOR UPDATE SKIP LOCKED
    ), failed AS (
        UPDATE jobs
        SET status = 'failed',
            completed_at = now(),
            error_message = format('timed out: still running after %s (jobsvc sweeper)', p_timeout)
        WHERE id IN (SELECT id FROM stale) AND status = 'running' AND lease_id IS NULL
        RETURNING 1
    )
    SELECT count(*) FROM failed;
$$;
