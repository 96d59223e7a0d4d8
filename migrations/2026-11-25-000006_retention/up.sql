-- Retention of finished jobs: jobsvc deletes completed, failed or cancelled jobs older than
-- the configured age (per status; none by default) in small batches in the background.
--
-- The index holds finished jobs only, by status and the time they finished, so each batch
-- reads just the rows it deletes. A job enters it once, when it reaches a terminal status.
-- (Built inside diesel's migration transaction, so not CONCURRENTLY: on a very large existing
-- table create it by hand with CREATE INDEX CONCURRENTLY first; this statement then finds it.)
CREATE INDEX IF NOT EXISTS idx_jobs_finished ON jobs (status, (coalesce(completed_at, updated_at)))
    WHERE status IN ('completed', 'failed', 'cancelled');
COMMENT ON INDEX idx_jobs_finished IS
    'Retention: WHERE status = $1 AND coalesce(completed_at, updated_at) < $2 (jobs_prune_finished).';

-- One batch: deletes at most p_max_rows jobs in status p_status that finished more than
-- p_keep ago (completed_at, or updated_at for a row a plain SQL write finished without one).
-- Rows locked by a concurrent writer are skipped, not waited for; each call is one short
-- transaction. Returns the number deleted. The delete triggers keep the stats rollup exact;
-- the jobs' history in job_events is pruned by its own retention.
CREATE FUNCTION jobs_prune_finished(p_status job_status, p_keep interval, p_max_rows integer)
    RETURNS bigint
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
    WITH doomed AS (
        SELECT id FROM jobs
        -- The column, not the parameter, in the terminal-status test: only then can the
        -- planner prove idx_jobs_finished's predicate (a generic plan knows no p_status).
        WHERE status = p_status
          AND status IN ('completed', 'failed', 'cancelled')
          AND coalesce(completed_at, updated_at) < now() - p_keep
        ORDER BY coalesce(completed_at, updated_at)
        LIMIT p_max_rows
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM jobs WHERE id IN (SELECT id FROM doomed) RETURNING 1
    )
    SELECT count(*) FROM deleted;
$$;
COMMENT ON FUNCTION jobs_prune_finished(job_status, interval, integer) IS
    'Retention batch: deletes at most p_max_rows finished jobs of status p_status older than p_keep (skipping locked rows); returns how many. Only terminal statuses are ever deleted.';
REVOKE EXECUTE ON FUNCTION jobs_prune_finished(job_status, interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION jobs_prune_finished(job_status, interval, integer) TO service_role;
