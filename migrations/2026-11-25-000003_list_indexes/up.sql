-- Indexes for ListJobs (contract.md). The service's query is
--
--   SELECT * FROM jobs
--   WHERE TRUE
--     [AND user_id = $u]                                   -- always for a user
--     [AND status = ANY($statuses::job_status[])]
--     [AND agent_identifier = $agent]
--     [AND created_at > $after] [AND created_at < $before]
--     [AND job_data @> $contains::jsonb]
--     [AND status = 'running' AND started_at < now() - $older::interval]
--     [AND (created_at, id) < ($cursor_created_at, $cursor_id)]   -- next page
--   ORDER BY created_at DESC, id DESC
--   LIMIT $n
--
-- plus, for a user, the row-level-security filter (select auth.uid()) = user_id.
--
-- Every b-tree here that serves the ORDER BY ends in (created_at DESC, id DESC):
-- the id tie-break needs no sort, and the keyset cursor (created_at, id) < (..)
-- is an index condition, so a page starts at the cursor. With the origin's
-- (..., created_at DESC) indexes the cursor was only created_at <= $c plus an
-- incremental sort, which reads every job sharing the cursor's created_at on
-- every page: jobs inserted by one multi-row INSERT share now(), and a 20,000-job
-- batch cost 17,000 buffers / 90-170 ms per page instead of 54 buffers / 0.2 ms.
--
-- Measured on 1,000,000 jobs, 1,000 users, PostgreSQL 15 (every filter
-- combination, first and deep page):
--   * idx_jobs_agent_identifier: a rare agent's first page read 51 rows
--     instead of walking ~10,000 newer jobs of other agents.
--   * idx_jobs_running_created: running_longer_than read 51 rows instead of
--     ~30,000 (every running job, younger ones first); statuses = [RUNNING]
--     with created_before or a deep cursor read 2 buffers instead of walking
--     500,000-830,000 older jobs (running jobs are all recent, which the planner
--     cannot know).
--
-- Replaced in place (same name, same purpose, now ending in the id tie-break):
--   idx_jobs_user_created, idx_jobs_created_at, idx_jobs_agent_identifier,
--   idx_jobs_status_created; idx_jobs_data_gin becomes jsonb_path_ops.
-- Dropped: idx_jobs_user_id (user_id), a prefix of idx_jobs_user_created and of
--   idx_jobs_user_status, which serve every WHERE user_id = $1 it served
--   (plans only switched to idx_jobs_user_status, same size); one index fewer
--   to write on every insert and every (non-HOT) update.
-- Kept unchanged: idx_jobs_status (status). Although a prefix of
--   idx_jobs_status_created, it is the small (deduplicated) bitmap the planner
--   ANDs with a rare agent for status = ANY(...): without it such pages read
--   up to 4,000 buffers in 2-90 ms instead of at most ~150 in 1.5-6 ms.
-- New: idx_jobs_running_created (partial, running jobs only).
--
-- diesel runs this file inside one transaction. DROP INDEX needs an ACCESS
-- EXCLUSIVE lock on jobs, so take it first (no lock upgrade halfway, hence no
-- deadlock with sessions already using jobs): jobs can be neither read nor
-- written until the indexes are rebuilt and this transaction commits (about
-- 20-35 s per million jobs on a 2-core machine).

LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE;

DROP INDEX idx_jobs_user_id;

DROP INDEX idx_jobs_user_created;
CREATE INDEX idx_jobs_user_created ON jobs (user_id, created_at DESC, id DESC);
COMMENT ON INDEX idx_jobs_user_created IS
    'A user''s jobs newest first: ListJobs with user_id = $u (every user call; the keyset cursor (created_at, id) < ($1, $2) and created_after/before are index conditions) ORDER BY created_at DESC, id DESC. Also any WHERE user_id = $1 and the row-level-security filter (select auth.uid()) = user_id (replaces the origin''s idx_jobs_user_id).';

DROP INDEX idx_jobs_created_at;
CREATE INDEX idx_jobs_created_at ON jobs (created_at DESC, id DESC);
COMMENT ON INDEX idx_jobs_created_at IS
    'All jobs newest first: service-role ListJobs without a user or rare-agent filter (optionally created_after/before, status = ANY(...), a job_data_contains matching many jobs) ORDER BY created_at DESC, id DESC, the keyset cursor (created_at, id) < ($1, $2) as index condition.';

DROP INDEX idx_jobs_agent_identifier;
CREATE INDEX idx_jobs_agent_identifier ON jobs (agent_identifier, created_at DESC, id DESC);
COMMENT ON INDEX idx_jobs_agent_identifier IS
    'One agent''s jobs newest first: service-role ListJobs with agent_identifier = $1 ORDER BY created_at DESC, id DESC (keyset cursor and created_after/before as index conditions); also any WHERE agent_identifier = $1.';

DROP INDEX idx_jobs_status_created;
CREATE INDEX idx_jobs_status_created ON jobs (status, created_at DESC, id DESC);
COMMENT ON INDEX idx_jobs_status_created IS
    'Jobs in one status newest/oldest first: WHERE status = $1 ORDER BY created_at DESC, id DESC (ListJobs with a single status written as status = $1, keyset cursor as index condition) or ORDER BY created_at (oldest pending job, GetStats). status = ANY($1) cannot use its order (PostgreSQL 15): it is then a bitmap scan.';

DROP INDEX idx_jobs_data_gin;
CREATE INDEX idx_jobs_data_gin ON jobs USING GIN (job_data jsonb_path_ops);
COMMENT ON INDEX idx_jobs_data_gin IS
    'JSON containment on job_data: WHERE job_data @> $1 (ListJobs job_data_contains). jsonb_path_ops: serves @> only (all jobsvc needs) with one entry per leaf value instead of one per key and per value, so smaller and cheaper to write than the default jsonb_ops.';

CREATE INDEX idx_jobs_running_created ON jobs (created_at DESC, id DESC, started_at)
    WHERE status = 'running';
COMMENT ON INDEX idx_jobs_running_created IS
    'Running jobs newest first: ListJobs running_longer_than (status = ''running'' AND started_at < now() - $1: started_at is checked in the index, so younger running jobs cost no heap visit) and statuses = [RUNNING] with created_before or a keyset cursor (running jobs are all recent: walking idx_jobs_created_at would visit every older job). Partial: holds running jobs only, one entry written per job, when it starts.';
