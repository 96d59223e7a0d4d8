-- The origin (Supabase) jobs schema, ported to plain PostgreSQL 15 for jobsvc.
--
-- Kept from the origin: the job_status enum, the jobs table's columns and
-- defaults, its nine indexes, the job_stats view, get_job_stats(uuid) and the
-- five row-level-security policies, under the origin's names.
-- Added for jobsvc: the Supabase roles and auth.uid()/auth.role() (jobsvc is
-- not hosted on Supabase), jobs.version and jobs.request_id, length checks,
-- the idempotency index, and a trigger keeping updated_at/version current.
--
-- diesel runs this file inside one transaction.

-------------------------------------------------------------------------------
-- Roles (cluster-wide).
--
-- Several databases of one cluster may run this migration at the same time
-- (tests), so a role may be created by another transaction between our check
-- and our CREATE ROLE: duplicate_object / unique_violation mean "someone else
-- made it", which is what we want.
--
-- Right after making sure a role exists we grant it USAGE on schema public.
-- Recording that privilege takes a lock on the role until we commit, so a
-- concurrent down.sql in another database (which tries DROP ROLE) waits for
-- us and then sees that the role is still in use, instead of dropping it
-- under our feet. If it was dropped between our check and our grant, the
-- grant fails with undefined_object and we simply create the role again.
-------------------------------------------------------------------------------
DO $$
DECLARE
    r       text;
    attempt int;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        attempt := 0;
        LOOP
            attempt := attempt + 1;
            IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
                BEGIN
                    EXECUTE format('CREATE ROLE %I NOLOGIN', r);
                EXCEPTION WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- created concurrently by another database's migration
                END;
            END IF;
            BEGIN
                EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', r);
                EXIT;  -- role exists and is now locked against DROP ROLE
            EXCEPTION WHEN undefined_object THEN
                IF attempt >= 10 THEN
                    RAISE;
                END IF;    -- dropped concurrently: create it again
            END;
        END LOOP;
    END LOOP;

    -- The service logs in as its own user and switches with SET ROLE to the
    -- caller's role; a non-superuser needs membership for that.
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        BEGIN
            GRANT authenticated, service_role, anon TO current_user;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- granted concurrently by another database's migration
        END;
    END IF;
END
$$;

-------------------------------------------------------------------------------
-- auth schema: the two helpers Supabase's policies call.
-------------------------------------------------------------------------------
CREATE SCHEMA auth;
COMMENT ON SCHEMA auth IS
    'Supabase-compatible helpers reading the caller''s JWT claims from the request.jwt.claims setting (jobsvc sets it per transaction). jobsvc has no auth.users table: users are JWT subjects.';

-- As PostgREST/Supabase define them, except that the current
-- request.jwt.claims (JSON) setting is read first and the legacy
-- per-claim setting is the fallback. nullif(..., '') turns both "never set"
-- (current_setting(..., true) is NULL) and "reset at transaction end"
-- (the setting then reads '') into NULL.
CREATE FUNCTION auth.uid() RETURNS uuid
    LANGUAGE sql STABLE
AS $$
    SELECT nullif(
        coalesce(
            nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
            nullif(current_setting('request.jwt.claim.sub', true), '')
        ),
        ''
    )::uuid
$$;
COMMENT ON FUNCTION auth.uid() IS
    'The caller''s user id: the "sub" claim of request.jwt.claims (legacy fallback: request.jwt.claim.sub). NULL when unset or empty.';

CREATE FUNCTION auth.role() RETURNS text
    LANGUAGE sql STABLE
AS $$
    SELECT nullif(
        coalesce(
            nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role',
            nullif(current_setting('request.jwt.claim.role', true), '')
        ),
        ''
    )::text
$$;
COMMENT ON FUNCTION auth.role() IS
    'The caller''s role: the "role" claim of request.jwt.claims (legacy fallback: request.jwt.claim.role). NULL when unset or empty.';

-------------------------------------------------------------------------------
-- Job status.
-------------------------------------------------------------------------------
CREATE TYPE job_status AS ENUM (
    'pending',
    'running',
    'completed',
    'failed',
    'cancelled'
);
COMMENT ON TYPE job_status IS
    'Lifecycle of a job: pending -> running -> completed; pending/running -> failed or cancelled. completed, failed and cancelled are terminal.';

-------------------------------------------------------------------------------
-- jobs
-------------------------------------------------------------------------------
CREATE TABLE jobs (
    id               uuid        DEFAULT gen_random_uuid() PRIMARY KEY,
    -- No foreign key (the origin had REFERENCES auth.users(id) ON DELETE
    -- CASCADE): jobsvc has no auth.users table; users are JWT subjects.
    user_id          uuid,
    agent_identifier text        NOT NULL,
    status           job_status  NOT NULL DEFAULT 'pending',
    job_data         jsonb       DEFAULT '{}'::jsonb,
    result           jsonb,
    error_message    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz,
    version          bigint      NOT NULL DEFAULT 1,
    request_id       text,
    CONSTRAINT jobs_agent_identifier_length
        CHECK (char_length(agent_identifier) BETWEEN 1 AND 255),
    CONSTRAINT jobs_request_id_length
        CHECK (char_length(request_id) <= 128)
);

COMMENT ON TABLE jobs IS
    'Jobs submitted by users (or by the service role for no user) and processed by agents. Row-level security: a user sees only its own jobs; the service role sees all.';
COMMENT ON COLUMN jobs.id IS 'Primary key, generated by the database.';
COMMENT ON COLUMN jobs.user_id IS
    'Owner: the JWT subject (sub) of the user who created the job; NULL for a job owned by no user. No foreign key: jobsvc has no auth.users table.';
COMMENT ON COLUMN jobs.agent_identifier IS 'Identifier of the agent processing the job (1 to 255 characters).';
COMMENT ON COLUMN jobs.status IS 'Current status of the job.';
COMMENT ON COLUMN jobs.job_data IS 'Input data and parameters for the job (JSON object).';
COMMENT ON COLUMN jobs.result IS 'Job execution result or output; NULL when none.';
COMMENT ON COLUMN jobs.error_message IS 'Error message if the job failed; NULL otherwise.';
COMMENT ON COLUMN jobs.created_at IS 'When the job was created (database clock).';
COMMENT ON COLUMN jobs.updated_at IS 'When the job was last updated; set by trigger jobs_touch on every UPDATE.';
COMMENT ON COLUMN jobs.started_at IS 'When job processing began (move to running); NULL before.';
COMMENT ON COLUMN jobs.completed_at IS 'When the job reached a terminal status; NULL before.';
COMMENT ON COLUMN jobs.version IS
    '1 at creation, +1 on every UPDATE (trigger jobs_touch): orders one job''s changes and serves optimistic concurrency (expected_version).';
COMMENT ON COLUMN jobs.request_id IS
    'Client idempotency key of CreateJob (at most 128 characters), unique per owner; NULL when none.';
COMMENT ON CONSTRAINT jobs_agent_identifier_length ON jobs IS 'agent_identifier is 1 to 255 characters.';
COMMENT ON CONSTRAINT jobs_request_id_length ON jobs IS 'request_id is at most 128 characters.';

-- Idempotency key: one job per (owner, request_id). NULLS NOT DISTINCT so that
-- jobs owned by no user (user_id NULL) are also unique per request_id.
-- Arbiter of: INSERT ... ON CONFLICT (user_id, request_id) WHERE request_id IS NOT NULL
CREATE UNIQUE INDEX jobs_owner_request_id_key ON jobs (user_id, request_id)
    NULLS NOT DISTINCT WHERE request_id IS NOT NULL;
COMMENT ON INDEX jobs_owner_request_id_key IS
    'Idempotent CreateJob: unique (user_id, request_id), NULL user_id included (NULLS NOT DISTINCT); arbiter of INSERT ... ON CONFLICT (user_id, request_id) WHERE request_id IS NOT NULL, and the lookup of an existing job by request id.';

-- The origin's indexes, unchanged.
CREATE INDEX idx_jobs_user_id ON jobs(user_id);
CREATE INDEX idx_jobs_status ON jobs(status);
CREATE INDEX idx_jobs_created_at ON jobs(created_at DESC);
CREATE INDEX idx_jobs_agent_identifier ON jobs(agent_identifier);
CREATE INDEX idx_jobs_updated_at ON jobs(updated_at DESC);

CREATE INDEX idx_jobs_user_status ON jobs(user_id, status);
CREATE INDEX idx_jobs_user_created ON jobs(user_id, created_at DESC);
CREATE INDEX idx_jobs_status_created ON jobs(status, created_at DESC);

CREATE INDEX idx_jobs_data_gin ON jobs USING GIN (job_data);

COMMENT ON INDEX idx_jobs_user_id IS '(origin) A user''s jobs: WHERE user_id = $1; also the RLS filter (select auth.uid()) = user_id.';
COMMENT ON INDEX idx_jobs_status IS '(origin) Jobs in a status: WHERE status = $1 (e.g. the long-running-job check on running jobs).';
COMMENT ON INDEX idx_jobs_created_at IS '(origin) Newest first across all jobs: ORDER BY created_at DESC (service-role ListJobs).';
COMMENT ON INDEX idx_jobs_agent_identifier IS '(origin) Jobs of one agent: WHERE agent_identifier = $1.';
COMMENT ON INDEX idx_jobs_updated_at IS '(origin) Recently changed jobs: ORDER BY updated_at DESC.';
COMMENT ON INDEX idx_jobs_user_status IS '(origin) A user''s jobs in a status and per-user counts: WHERE user_id = $1 AND status = $2 (get_job_stats).';
COMMENT ON INDEX idx_jobs_user_created IS '(origin) A user''s jobs newest first: WHERE user_id = $1 ORDER BY created_at DESC (ListJobs pages).';
COMMENT ON INDEX idx_jobs_status_created IS '(origin) Jobs in a status newest/oldest first: WHERE status = $1 ORDER BY created_at (oldest pending job, status-filtered ListJobs).';
COMMENT ON INDEX idx_jobs_data_gin IS '(origin) JSON queries on job_data: WHERE job_data @> $1 (ListJobs job_data_contains).';

-------------------------------------------------------------------------------
-- updated_at / version, whoever writes the row (plain SQL included).
-------------------------------------------------------------------------------
CREATE FUNCTION jobs_touch() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    NEW.version := OLD.version + 1;
    RETURN NEW;
END;
$$;
COMMENT ON FUNCTION jobs_touch() IS
    'BEFORE UPDATE trigger function on jobs: sets updated_at = now() and version = OLD.version + 1 on every update, whoever writes the row.';

CREATE TRIGGER jobs_touch
    BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_touch();
COMMENT ON TRIGGER jobs_touch ON jobs IS
    'Keeps jobs.updated_at and jobs.version current on every UPDATE.';

-------------------------------------------------------------------------------
-- Statistics.
-------------------------------------------------------------------------------
-- The origin's view; security_invoker so that row-level security applies to
-- whoever queries it (a user gets its own figures, the service role all).
CREATE VIEW job_stats WITH (security_invoker = true) AS
SELECT
    COUNT(*) as total_jobs,
    COUNT(*) FILTER (WHERE status = 'pending') as pending_jobs,
    COUNT(*) FILTER (WHERE status = 'running') as running_jobs,
    COUNT(*) FILTER (WHERE status = 'completed') as completed_jobs,
    COUNT(*) FILTER (WHERE status = 'failed') as failed_jobs,
    COUNT(*) FILTER (WHERE status = 'cancelled') as cancelled_jobs,
    AVG(EXTRACT(EPOCH FROM (completed_at - started_at))) FILTER (WHERE status = 'completed') as avg_processing_time
FROM jobs;
COMMENT ON VIEW job_stats IS
    'Job counts per status and mean processing time (seconds, completed jobs only; NULL when none) over the jobs the querying role may see (security_invoker: row-level security applies).';

-- The origin's function, plus cancelled and avg_processing_time so that it
-- matches the view. SECURITY DEFINER (it bypasses row-level security), so it
-- refuses an authenticated caller asking about another user.
CREATE FUNCTION get_job_stats(p_user_id uuid) RETURNS json
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
BEGIN
    IF auth.role() = 'authenticated' AND auth.uid() IS DISTINCT FROM p_user_id THEN
        RAISE EXCEPTION 'get_job_stats: a user may only read its own statistics'
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    RETURN (
        SELECT json_build_object(
            'total', COUNT(*),
            'pending', COUNT(*) FILTER (WHERE status = 'pending'),
            'running', COUNT(*) FILTER (WHERE status = 'running'),
            'completed', COUNT(*) FILTER (WHERE status = 'completed'),
            'failed', COUNT(*) FILTER (WHERE status = 'failed'),
            'cancelled', COUNT(*) FILTER (WHERE status = 'cancelled'),
            'avg_processing_time',
                AVG(EXTRACT(EPOCH FROM (completed_at - started_at))) FILTER (WHERE status = 'completed')
        )
        FROM public.jobs
        WHERE user_id = p_user_id
    );
END;
$$;
COMMENT ON FUNCTION get_job_stats(uuid) IS
    'Statistics of one user''s jobs as JSON {total, pending, running, completed, failed, cancelled, avg_processing_time (seconds, NULL when no completed job)}; same figures as job_stats. SECURITY DEFINER; an authenticated caller may only ask for its own user id (else insufficient_privilege).';

-------------------------------------------------------------------------------
-- Row-level security: the origin's policies, with auth.*() wrapped in a
-- sub-select so they are evaluated once per statement, not once per row.
-------------------------------------------------------------------------------
ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;

CREATE POLICY "Users can view own jobs" ON jobs
    FOR SELECT USING ((select auth.uid()) = user_id);

CREATE POLICY "Users can insert own jobs" ON jobs
    FOR INSERT WITH CHECK ((select auth.uid()) = user_id);

CREATE POLICY "Users can update own jobs" ON jobs
    FOR UPDATE USING ((select auth.uid()) = user_id)
    WITH CHECK ((select auth.uid()) = user_id);

CREATE POLICY "Users can delete own jobs" ON jobs
    FOR DELETE USING ((select auth.uid()) = user_id);

CREATE POLICY "Service role full access" ON jobs
    FOR ALL USING ((select auth.role()) = 'service_role');

-------------------------------------------------------------------------------
-- Privileges. (USAGE on schema public was granted above, with the roles.)
-------------------------------------------------------------------------------
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;

GRANT SELECT, INSERT, UPDATE, DELETE ON jobs TO authenticated, service_role;
GRANT SELECT ON job_stats TO authenticated, service_role;

-- Functions are executable by PUBLIC by default; get_job_stats is SECURITY
-- DEFINER, so restrict all three to the roles that need them.
REVOKE EXECUTE ON FUNCTION auth.uid(), auth.role(), get_job_stats(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth.uid(), auth.role(), get_job_stats(uuid) TO authenticated, service_role;
