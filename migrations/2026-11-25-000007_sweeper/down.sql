DROP FUNCTION jobs_fail_stale_running(interval, integer);
DROP INDEX idx_jobs_running_started;
