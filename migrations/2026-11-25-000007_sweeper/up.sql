-- The long-running-job check of the origin, as an action: jobsvc marks RUNNING jobs that
-- started longer ago than the configured timeout as FAILED (off by default).

-- Running jobs by start time: the sweeper reads only the stale ones.
CREATE INDEX idx_jobs_running_started ON jobs (started_at) WHERE status = 'running';
COMMENT ON INDEX idx_jobs_running_started IS
    'Sweeper: WHERE status = ''running'' AND started_at < $1 ORDER BY started_at (jobs_fail_stale_running).';

-- One batch, as a compare-and-set: the stale rows are locked (rows a writer holds at that
-- moment are skipped, not waited for), and a row that a concurrent transaction completed,
-- failed or cancelled before the lock is re-read by FOR UPDATE and no longer matches
-- status = 'running', so a job that finished meanwhile is never overwritten. The jobs_touch
-- trigger bumps version; the change-feed and rollup triggers record the move like any other.
CREATE FUNCTION jobs_fail_stale_running(p_timeout interval, p_max_rows integer)
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
COMMENT ON FUNCTION jobs_fail_stale_running(interval, integer) IS
    'Sweeper batch: moves at most p_max_rows RUNNING jobs whose started_at is older than p_timeout to FAILED with an explanatory error_message, never touching a job that left RUNNING meanwhile; returns how many.';
REVOKE EXECUTE ON FUNCTION jobs_fail_stale_running(interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION jobs_fail_stale_running(interval, integer) TO service_role;
