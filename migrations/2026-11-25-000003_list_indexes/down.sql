-- Reverts 2026-11-25-000003_list_indexes: the origin's indexes exactly as
-- 2026-11-25-000001_origin_schema created them, with their comments.
-- (idx_jobs_status was left unchanged by up.sql.)

LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE;

DROP INDEX idx_jobs_running_created;

DROP INDEX idx_jobs_data_gin;
CREATE INDEX idx_jobs_data_gin ON jobs USING GIN (job_data);

DROP INDEX idx_jobs_status_created;
CREATE INDEX idx_jobs_status_created ON jobs(status, created_at DESC);

DROP INDEX idx_jobs_agent_identifier;
CREATE INDEX idx_jobs_agent_identifier ON jobs(agent_identifier);

DROP INDEX idx_jobs_created_at;
CREATE INDEX idx_jobs_created_at ON jobs(created_at DESC);

DROP INDEX idx_jobs_user_created;
CREATE INDEX idx_jobs_user_created ON jobs(user_id, created_at DESC);

CREATE INDEX idx_jobs_user_id ON jobs(user_id);

COMMENT ON INDEX idx_jobs_user_id IS '(origin) A user''s jobs: WHERE user_id = $1; also the RLS filter (select auth.uid()) = user_id.';
COMMENT ON INDEX idx_jobs_created_at IS '(origin) Newest first across all jobs: ORDER BY created_at DESC (service-role ListJobs).';
COMMENT ON INDEX idx_jobs_agent_identifier IS '(origin) Jobs of one agent: WHERE agent_identifier = $1.';
COMMENT ON INDEX idx_jobs_user_created IS '(origin) A user''s jobs newest first: WHERE user_id = $1 ORDER BY created_at DESC (ListJobs pages).';
COMMENT ON INDEX idx_jobs_status_created IS '(origin) Jobs in a status newest/oldest first: WHERE status = $1 ORDER BY created_at (oldest pending job, status-filtered ListJobs).';
COMMENT ON INDEX idx_jobs_data_gin IS '(origin) JSON queries on job_data: WHERE job_data @> $1 (ListJobs job_data_contains).';
