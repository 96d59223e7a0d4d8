DROP FUNCTION jobs_prune_finished(job_status, interval, integer);
DROP INDEX idx_jobs_finished;
