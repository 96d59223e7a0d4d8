-- Reverts 2026-11-25-000002_stats_rollups.

DROP TRIGGER jobs_stats_rollup_insert ON jobs;
DROP TRIGGER jobs_stats_rollup_update ON jobs;
DROP TRIGGER jobs_stats_rollup_delete ON jobs;
DROP TRIGGER jobs_stats_rollup_truncate ON jobs;

DROP FUNCTION job_stats_rollup_insert();
DROP FUNCTION job_stats_rollup_update();
DROP FUNCTION job_stats_rollup_delete();
DROP FUNCTION job_stats_rollup_truncate();
DROP FUNCTION job_stats_fold();
DROP FUNCTION job_stats_rebuild();
DROP FUNCTION job_oldest_pending(uuid, text);

DROP INDEX idx_jobs_pending_user_created;
DROP INDEX idx_jobs_pending_agent_created;
DROP INDEX idx_jobs_pending_user_agent_created;

-- Also drops its indexes, constraints and policies.
DROP TABLE job_stats_rollup;
