CREATE OR REPLACE FUNCTION jobs_fail_stale_running(p_timeout interval, p_max_rows integer)
    RETURNS bigint
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
    WITH stale AS (
        SELECT id FROM jobs
        WHERE status = 'running' AND started_at < now() - p_timeout
        ORDER BY started_at
        LIMIT p_max_rows
        FOR UPDATE SKIP LOCKED
    ), failed AS (
        UPDATE jobs
        SET status = 'failed',
            completed_at = now(),
            error_message = format('timed out: still running after %s (jobsvc sweeper)', p_timeout)
        WHERE id IN (SELECT id FROM stale) AND status = 'running'
        RETURNING 1
    )
    SELECT count(*) FROM failed;
$$;
DROP FUNCTION jobs_expire_leases(interval, float8, interval, integer);
DROP FUNCTION jobs_retry_delay(integer, interval, float8, interval);

DROP TRIGGER jobs_record_events_update ON jobs;
CREATE OR REPLACE FUNCTION jobs_record_events() RETURNS trigger
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
CREATE TRIGGER jobs_record_events_update
    AFTER UPDATE ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_record_events();
COMMENT ON TRIGGER jobs_record_events_update ON jobs IS
    'Records every change to a job in job_events (the change feed).';

DROP TRIGGER jobs_touch_progress ON jobs;
DROP FUNCTION jobs_touch_progress();
DROP TRIGGER jobs_touch ON jobs;
CREATE TRIGGER jobs_touch
    BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_touch();
COMMENT ON TRIGGER jobs_touch ON jobs IS
    'Keeps jobs.updated_at and jobs.version current on every UPDATE.';

ALTER TABLE job_events
    DROP COLUMN priority,
    DROP COLUMN run_after,
    DROP COLUMN attempt,
    DROP COLUMN max_attempts,
    DROP COLUMN lease_expires_at,
    DROP COLUMN worker_id,
    DROP COLUMN progress;

DROP INDEX jobs_leased;
DROP INDEX jobs_claim;
ALTER TABLE jobs
    DROP COLUMN priority,
    DROP COLUMN run_after,
    DROP COLUMN attempt,
    DROP COLUMN max_attempts,
    DROP COLUMN initial_backoff,
    DROP COLUMN lease_id,
    DROP COLUMN lease_expires_at,
    DROP COLUMN lease_duration,
    DROP COLUMN worker_id,
    DROP COLUMN progress;
