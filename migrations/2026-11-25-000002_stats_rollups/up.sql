-- Exact, cheap job statistics (GetStats) without scanning jobs.
--
-- What this migration adds:
--   * job_stats_rollup: job counts and processing-time sums per
--     (user_id, agent_identifier, status), kept current in the writing
--     transaction by three statement-level AFTER triggers on jobs (INSERT,
--     UPDATE, DELETE, with transition tables) plus one AFTER TRUNCATE trigger.
--     Plain SQL writes are counted too, whatever columns they change.
--   * Each writing backend adds its deltas to its own rows (shard =
--     pg_backend_pid(), unique among live backends), so concurrent writers
--     never wait for each other on a hot counter row and never deadlock on the
--     rollup. job_stats_fold() (called periodically by the service) merges
--     those rows into shard 0 without waiting for writers.
--   * job_oldest_pending(): the oldest pending job of a scope, a one-row
--     lookup in one of three new partial indexes (or the origin's
--     idx_jobs_status_created).
--   * job_stats_rebuild(): recomputes the rollup from jobs (used below as the
--     backfill; also the repair tool after writes made with triggers off).
--
-- Queries for the service (GetStats), as the caller's role with its
-- request.jwt.claims set, as for every other query. Run them as two
-- autocommit statements, or, inside one transaction, run (2) before (1)
-- (see the deadlock note at job_stats_rollup_truncate).
--
-- (1) Counts and mean processing time: one row, all figures 0 when no job.
--     Build the WHERE clause per case (four fixed statement texts) rather than
--     binding nullable parameters: "($1 IS NULL OR user_id = $1)" cannot use
--     an index in a cached generic plan.
--
--     SELECT coalesce(sum(jobs), 0)::int8                                     AS total,
--            coalesce(sum(jobs) FILTER (WHERE status = 'pending'), 0)::int8   AS pending,
--            coalesce(sum(jobs) FILTER (WHERE status = 'running'), 0)::int8   AS running,
--            coalesce(sum(jobs) FILTER (WHERE status = 'completed'), 0)::int8 AS completed,
--            coalesce(sum(jobs) FILTER (WHERE status = 'failed'), 0)::int8    AS failed,
--            coalesce(sum(jobs) FILTER (WHERE status = 'cancelled'), 0)::int8 AS cancelled,
--            coalesce(sum(processing_seconds) / nullif(sum(processing_count), 0), 0)::float8
--                                                                             AS avg_processing_seconds
--     FROM job_stats_rollup
--     -- all scope:        (no WHERE)                                  sequential scan
--     -- user scope:       WHERE user_id = $1                          job_stats_rollup_key
--     -- agent scope:      WHERE agent_identifier = $1                 job_stats_rollup_agent
--     -- user and agent:   WHERE user_id = $1 AND agent_identifier = $2  job_stats_rollup_key
--
--     sum(processing_seconds) / sum(processing_count) is the division
--     AVG(numeric) performs, on the same exact sum and count, so before the
--     float8 cast it equals the job_stats view's avg_processing_time digit for
--     digit. Row-level security applies (the user_id/agent_identifier
--     conditions are leakproof, so the indexes are used): an authenticated
--     caller sees only its own rows (its "all" is its own figures), the
--     service role all rows. The all scope reads every rollup row: one per
--     (user, agent, status) group, plus shard rows not folded yet.
--
-- (2) Oldest pending job (NULL when nothing is pending); nullable binds are
--     fine here, the function branches to four statically planned queries:
--
--     SELECT job_oldest_pending($1::uuid, $2::text)  -- $1 user or NULL, $2 agent or NULL
--
--     all: idx_jobs_status_created; user: idx_jobs_pending_user_created;
--     agent: idx_jobs_pending_agent_created; user and agent:
--     idx_jobs_pending_user_agent_created. Same visibility as row-level
--     security on jobs (see the function). A plain
--     "SELECT min(created_at) FROM jobs WHERE status = 'pending' ..." is
--     fine for the owner (no row-level security) but not for the API roles;
--     see the comment above the function.
--
-- Caveats (not statistics bugs, but ways to bypass the triggers): writes made
-- with session_replication_role = replica, with the triggers disabled, or
-- loading jobs rows with pg_restore --data-only into a database whose
-- rollup is also restored leave the rollup wrong; run
-- SELECT job_stats_rebuild(); afterwards.
--
-- diesel runs this file inside one transaction (READ COMMITTED).

-- Take the strongest lock on jobs this file needs first, so that the CREATE
-- INDEX / CREATE TRIGGER statements below never upgrade a weaker lock (which
-- could deadlock against writers). SHARE ROW EXCLUSIVE lets readers run but
-- waits for, and then blocks, writers until this transaction commits: the
-- backfill at the end then sees every committed row, and every later write
-- fires the triggers.
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;

-------------------------------------------------------------------------------
-- The rollup table.
-------------------------------------------------------------------------------
CREATE TABLE job_stats_rollup (
    user_id            uuid,
    agent_identifier   text       NOT NULL,
    status             job_status NOT NULL,
    shard              integer    NOT NULL,
    jobs               bigint     NOT NULL,
    processing_count   bigint     NOT NULL,
    processing_seconds numeric    NOT NULL,
    CONSTRAINT job_stats_rollup_key
        UNIQUE NULLS NOT DISTINCT (user_id, agent_identifier, status, shard),
    CONSTRAINT job_stats_rollup_shard_check CHECK (shard >= 0),
    CONSTRAINT job_stats_rollup_processing_check
        CHECK (status = 'completed' OR (processing_count = 0 AND processing_seconds = 0))
)
-- Every job write updates one or two rows here: leave room on each page so
-- that those updates are HOT (no key column ever changes).
WITH (fillfactor = 50);

COMMENT ON TABLE job_stats_rollup IS
    'Exact job statistics per (user_id, agent_identifier, status): the sum of the rows of all shards of a group is the number of jobs in that group and their processing-time count and sum. Maintained by the jobs_stats_rollup_* triggers in the writing transaction; folded into shard 0 by job_stats_fold(). Row-level security: a user sees only its own rows; the service role sees all.';
COMMENT ON COLUMN job_stats_rollup.user_id IS
    'jobs.user_id of the counted jobs; NULL for jobs owned by no user (visible to the service role only, counted only in the all-users scope).';
COMMENT ON COLUMN job_stats_rollup.agent_identifier IS 'jobs.agent_identifier of the counted jobs.';
COMMENT ON COLUMN job_stats_rollup.status IS 'jobs.status of the counted jobs.';
COMMENT ON COLUMN job_stats_rollup.shard IS
    '0 for folded totals; otherwise the pg_backend_pid() of the backend whose writes added this delta (unique among live backends, so concurrent writers never update the same row). job_stats_fold() merges shards into 0.';
COMMENT ON COLUMN job_stats_rollup.jobs IS
    'Number of jobs (this shard''s delta; may be negative in a shard other than 0). Sum over shards = count of jobs in the group.';
COMMENT ON COLUMN job_stats_rollup.processing_count IS
    'Number of completed jobs with both started_at and completed_at set (the rows AVG(completed_at - started_at) counts); 0 for other statuses.';
COMMENT ON COLUMN job_stats_rollup.processing_seconds IS
    'Exact sum of extract(epoch from completed_at - started_at) over those jobs (numeric, no rounding); 0 for other statuses. Mean = sum(processing_seconds) / sum(processing_count).';
COMMENT ON CONSTRAINT job_stats_rollup_key ON job_stats_rollup IS
    'One row per group and shard, NULL user_id included (NULLS NOT DISTINCT). Arbiter of the triggers'' and job_stats_fold()''s INSERT ... ON CONFLICT; its index serves the user and user+agent scopes.';
COMMENT ON INDEX job_stats_rollup_key IS
    'Index of constraint job_stats_rollup_key: arbiter of the rollup upserts; serves WHERE user_id = $1 [AND agent_identifier = $2] (GetStats user and user+agent scopes).';
COMMENT ON CONSTRAINT job_stats_rollup_shard_check ON job_stats_rollup IS
    'shard is 0 (folded) or a backend process id.';
COMMENT ON CONSTRAINT job_stats_rollup_processing_check ON job_stats_rollup IS
    'Processing time is accumulated for completed jobs only.';

CREATE INDEX job_stats_rollup_agent ON job_stats_rollup (agent_identifier);
COMMENT ON INDEX job_stats_rollup_agent IS
    'Statistics of one agent over all users: WHERE agent_identifier = $1.';

-------------------------------------------------------------------------------
-- Triggers on jobs.
--
-- Each statement adds, per (user_id, agent_identifier, status), +1 per new
-- row and -1 per old row (and the same for the processing count and seconds)
-- to the rows of shard pg_backend_pid(), in the writing transaction: the
-- rollup commits or rolls back with the write. Groups whose deltas are all
-- zero (e.g. an UPDATE of job_data or result) are skipped.
--
-- INSERT ... ON CONFLICT upserts the delta atomically: under READ COMMITTED
-- it adds to the newest committed row version (never a stale one); under
-- REPEATABLE READ/SERIALIZABLE a concurrent change of the same row is a
-- serialization failure, never a lost update. As each backend has its own
-- shard, the only concurrent writer of a shard row is job_stats_fold(),
-- which holds it for the few milliseconds of its own transaction.
--
-- PostgreSQL allows transition tables only on single-event triggers without
-- column lists, hence one trigger per event. SECURITY DEFINER: a user's write
-- (role authenticated, which may only read the rollup) must update the
-- rollup; the functions read only the transition tables.
-------------------------------------------------------------------------------
CREATE FUNCTION job_stats_rollup_insert() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
BEGIN
    INSERT INTO public.job_stats_rollup AS r
        (user_id, agent_identifier, status, shard, jobs, processing_count, processing_seconds)
    SELECT n.user_id, n.agent_identifier, n.status, pg_backend_pid(),
           count(*),
           count(extract(epoch FROM n.completed_at - n.started_at)) FILTER (WHERE n.status = 'completed'),
           coalesce(sum(extract(epoch FROM n.completed_at - n.started_at)) FILTER (WHERE n.status = 'completed'), 0)
    FROM new_rows n
    GROUP BY n.user_id, n.agent_identifier, n.status
    ON CONFLICT (user_id, agent_identifier, status, shard) DO UPDATE
        SET jobs               = r.jobs + excluded.jobs,
            processing_count   = r.processing_count + excluded.processing_count,
            processing_seconds = r.processing_seconds + excluded.processing_seconds;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION job_stats_rollup_insert() IS
    'AFTER INSERT statement trigger function on jobs (transition table new_rows): adds the inserted rows to job_stats_rollup, shard pg_backend_pid(). SECURITY DEFINER so that users'' writes can maintain the rollup.';

CREATE FUNCTION job_stats_rollup_update() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
BEGIN
    INSERT INTO public.job_stats_rollup AS r
        (user_id, agent_identifier, status, shard, jobs, processing_count, processing_seconds)
    SELECT d.user_id, d.agent_identifier, d.status, pg_backend_pid(),
           sum(d.jobs), sum(d.processing_count), sum(d.processing_seconds)
    FROM (
        SELECT n.user_id, n.agent_identifier, n.status,
               count(*) AS jobs,
               count(extract(epoch FROM n.completed_at - n.started_at)) FILTER (WHERE n.status = 'completed') AS processing_count,
               coalesce(sum(extract(epoch FROM n.completed_at - n.started_at)) FILTER (WHERE n.status = 'completed'), 0) AS processing_seconds
        FROM new_rows n
        GROUP BY n.user_id, n.agent_identifier, n.status
        UNION ALL
        SELECT o.user_id, o.agent_identifier, o.status,
               -count(*),
               -count(extract(epoch FROM o.completed_at - o.started_at)) FILTER (WHERE o.status = 'completed'),
               -coalesce(sum(extract(epoch FROM o.completed_at - o.started_at)) FILTER (WHERE o.status = 'completed'), 0)
        FROM old_rows o
        GROUP BY o.user_id, o.agent_identifier, o.status
    ) d
    GROUP BY d.user_id, d.agent_identifier, d.status
    HAVING sum(d.jobs) <> 0 OR sum(d.processing_count) <> 0 OR sum(d.processing_seconds) <> 0
    ON CONFLICT (user_id, agent_identifier, status, shard) DO UPDATE
        SET jobs               = r.jobs + excluded.jobs,
            processing_count   = r.processing_count + excluded.processing_count,
            processing_seconds = r.processing_seconds + excluded.processing_seconds;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION job_stats_rollup_update() IS
    'AFTER UPDATE statement trigger function on jobs (transition tables old_rows, new_rows): adds new minus old per group to job_stats_rollup, shard pg_backend_pid(), skipping groups whose deltas are all zero. Covers changes of any column (status, user_id, agent_identifier, started_at, completed_at). SECURITY DEFINER so that users'' writes can maintain the rollup.';

CREATE FUNCTION job_stats_rollup_delete() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
BEGIN
    INSERT INTO public.job_stats_rollup AS r
        (user_id, agent_identifier, status, shard, jobs, processing_count, processing_seconds)
    SELECT o.user_id, o.agent_identifier, o.status, pg_backend_pid(),
           -count(*),
           -count(extract(epoch FROM o.completed_at - o.started_at)) FILTER (WHERE o.status = 'completed'),
           -coalesce(sum(extract(epoch FROM o.completed_at - o.started_at)) FILTER (WHERE o.status = 'completed'), 0)
    FROM old_rows o
    GROUP BY o.user_id, o.agent_identifier, o.status
    ON CONFLICT (user_id, agent_identifier, status, shard) DO UPDATE
        SET jobs               = r.jobs + excluded.jobs,
            processing_count   = r.processing_count + excluded.processing_count,
            processing_seconds = r.processing_seconds + excluded.processing_seconds;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION job_stats_rollup_delete() IS
    'AFTER DELETE statement trigger function on jobs (transition table old_rows): subtracts the deleted rows from job_stats_rollup, shard pg_backend_pid(). SECURITY DEFINER so that users'' writes can maintain the rollup.';

-- TRUNCATE, not DELETE: TRUNCATE removes every row whatever the snapshot of
-- the truncating transaction (a REPEATABLE READ DELETE would miss rollup rows
-- committed after its snapshot), and its ACCESS EXCLUSIVE lock waits for a
-- running job_stats_fold(). Note: a transaction that reads job_stats_rollup
-- and then jobs can deadlock with a concurrent TRUNCATE jobs (one of the two
-- is cancelled); read jobs first, or use separate statements.
CREATE FUNCTION job_stats_rollup_truncate() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
BEGIN
    TRUNCATE public.job_stats_rollup;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION job_stats_rollup_truncate() IS
    'AFTER TRUNCATE statement trigger function on jobs: empties job_stats_rollup in the same transaction. SECURITY DEFINER (the truncating role need not own the rollup).';

CREATE TRIGGER jobs_stats_rollup_insert
    AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION job_stats_rollup_insert();
COMMENT ON TRIGGER jobs_stats_rollup_insert ON jobs IS
    'Keeps job_stats_rollup exact on INSERT (including COPY and the insert arm of INSERT ... ON CONFLICT).';

CREATE TRIGGER jobs_stats_rollup_update
    AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION job_stats_rollup_update();
COMMENT ON TRIGGER jobs_stats_rollup_update ON jobs IS
    'Keeps job_stats_rollup exact on UPDATE of any column (including the update arm of INSERT ... ON CONFLICT DO UPDATE).';

CREATE TRIGGER jobs_stats_rollup_delete
    AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION job_stats_rollup_delete();
COMMENT ON TRIGGER jobs_stats_rollup_delete ON jobs IS
    'Keeps job_stats_rollup exact on DELETE.';

CREATE TRIGGER jobs_stats_rollup_truncate
    AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION job_stats_rollup_truncate();
COMMENT ON TRIGGER jobs_stats_rollup_truncate ON jobs IS
    'Empties job_stats_rollup when jobs is truncated.';

-------------------------------------------------------------------------------
-- Folding shards into shard 0.
--
-- One statement deletes the shard rows (shard <> 0) that no transaction holds
-- locked (FOR UPDATE SKIP LOCKED: a writer's uncommitted delta is left for a
-- later fold, and the fold never waits for a writer) and adds their values to
-- shard 0 of the same group. Deletion and addition commit together, so every
-- reader sees each delta exactly once, before or after the fold. A writer
-- that wants a row the fold has deleted waits for the fold to commit, then
-- inserts a fresh row. Only job_stats_fold() writes shard 0 (besides TRUNCATE
-- and job_stats_rebuild(), which lock the whole table), and an advisory lock
-- keeps folds from running concurrently, so shard-0 rows that end at zero can
-- then be deleted safely.
-------------------------------------------------------------------------------
CREATE FUNCTION job_stats_fold() RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
DECLARE
    n_moved bigint;
    z_user  uuid[];
    z_agent text[];
    z_stat  job_status[];
BEGIN
    -- One fold at a time; a concurrent call returns at once.
    IF NOT pg_try_advisory_xact_lock(hashtext('public.job_stats_fold')) THEN
        RETURN 0;
    END IF;

    WITH moved AS (
        DELETE FROM public.job_stats_rollup AS s
        WHERE s.ctid = ANY (ARRAY(
                  SELECT l.ctid FROM public.job_stats_rollup AS l
                  WHERE l.shard <> 0
                  FOR UPDATE SKIP LOCKED))
        RETURNING s.user_id, s.agent_identifier, s.status,
                  s.jobs, s.processing_count, s.processing_seconds
    ), merged AS (
        INSERT INTO public.job_stats_rollup AS r
            (user_id, agent_identifier, status, shard, jobs, processing_count, processing_seconds)
        SELECT m.user_id, m.agent_identifier, m.status, 0,
               sum(m.jobs), sum(m.processing_count), sum(m.processing_seconds)
        FROM moved m
        GROUP BY m.user_id, m.agent_identifier, m.status
        HAVING sum(m.jobs) <> 0 OR sum(m.processing_count) <> 0 OR sum(m.processing_seconds) <> 0
        ON CONFLICT (user_id, agent_identifier, status, shard) DO UPDATE
            SET jobs               = r.jobs + excluded.jobs,
                processing_count   = r.processing_count + excluded.processing_count,
                processing_seconds = r.processing_seconds + excluded.processing_seconds
        RETURNING r.user_id, r.agent_identifier, r.status,
                  r.jobs, r.processing_count, r.processing_seconds
    )
    SELECT (SELECT count(*) FROM moved),
           array_agg(g.user_id)          FILTER (WHERE g.jobs = 0 AND g.processing_count = 0 AND g.processing_seconds = 0),
           array_agg(g.agent_identifier) FILTER (WHERE g.jobs = 0 AND g.processing_count = 0 AND g.processing_seconds = 0),
           array_agg(g.status)           FILTER (WHERE g.jobs = 0 AND g.processing_count = 0 AND g.processing_seconds = 0)
    INTO n_moved, z_user, z_agent, z_stat
    FROM merged g;

    -- Groups that are now empty: drop their shard-0 row (separate
    -- statements, as a statement cannot delete a row it has itself updated;
    -- two of them so that each can use job_stats_rollup_key).
    IF z_agent IS NOT NULL THEN
        DELETE FROM public.job_stats_rollup AS r
        USING unnest(z_user, z_agent, z_stat) AS z(user_id, agent_identifier, status)
        WHERE r.user_id = z.user_id AND r.agent_identifier = z.agent_identifier
          AND r.status = z.status AND r.shard = 0
          AND r.jobs = 0 AND r.processing_count = 0 AND r.processing_seconds = 0;
        DELETE FROM public.job_stats_rollup AS r
        USING unnest(z_user, z_agent, z_stat) AS z(user_id, agent_identifier, status)
        WHERE r.user_id IS NULL AND z.user_id IS NULL AND r.agent_identifier = z.agent_identifier
          AND r.status = z.status AND r.shard = 0
          AND r.jobs = 0 AND r.processing_count = 0 AND r.processing_seconds = 0;
    END IF;

    RETURN n_moved;
END;
$$;
COMMENT ON FUNCTION job_stats_fold() IS
    'Merges the per-backend shard rows of job_stats_rollup into shard 0 and drops groups that are now empty; returns the number of shard rows merged (0 if another fold is running). Never waits for writers (rows of uncommitted writes are skipped until a later call), holds merged rows only for its own short transaction, and leaves every sum unchanged. Call it periodically (e.g. every few seconds) in its own READ COMMITTED transaction; at REPEATABLE READ or above it may fail with a serialization error (retryable, never wrong).';

-------------------------------------------------------------------------------
-- Rebuild (backfill and repair).
-------------------------------------------------------------------------------
CREATE FUNCTION job_stats_rebuild() RETURNS bigint
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    -- Each statement below must see every write committed before the lock
    -- was granted, which only READ COMMITTED guarantees.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'job_stats_rebuild() must run at READ COMMITTED isolation'
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    -- Waits for running writers and blocks new ones (readers go on) until
    -- the end of the transaction.
    LOCK TABLE public.jobs IN SHARE ROW EXCLUSIVE MODE;
    TRUNCATE public.job_stats_rollup;
    INSERT INTO public.job_stats_rollup
        (user_id, agent_identifier, status, shard, jobs, processing_count, processing_seconds)
    SELECT j.user_id, j.agent_identifier, j.status, 0,
           count(*),
           count(extract(epoch FROM j.completed_at - j.started_at)) FILTER (WHERE j.status = 'completed'),
           coalesce(sum(extract(epoch FROM j.completed_at - j.started_at)) FILTER (WHERE j.status = 'completed'), 0)
    FROM public.jobs j
    GROUP BY j.user_id, j.agent_identifier, j.status;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;
COMMENT ON FUNCTION job_stats_rebuild() IS
    'Recomputes job_stats_rollup from jobs (one scan of jobs, writers blocked meanwhile) and returns the number of groups. The migration''s backfill; also the repair after writes that bypassed the triggers (session_replication_role = replica, disabled triggers). Must run at READ COMMITTED. Owner only.';

-------------------------------------------------------------------------------
-- Oldest pending job.
--
-- Why a function rather than a plain query under row-level security: the
-- jobs policies add "(select auth.uid()) = user_id OR (select auth.role()) =
-- 'service_role'" to every query of a non-owner role, and enum equality
-- (enum_eq) is not leakproof, so "status = 'pending'" may not be evaluated
-- before that filter: it can never be an index condition, and the planner
-- (which also believes the policy filter keeps 0.6% of the rows) then reads
-- idx_jobs_created_at from the oldest job onwards. Measured on 1,000,000 jobs
-- whose pending jobs are the newest: 300 ms for the all and agent scopes,
-- instead of 0.1 ms. This function applies the same visibility rule as the
-- policies itself and runs as the owner, where each case below is a one-row
-- index lookup.
-------------------------------------------------------------------------------
CREATE INDEX idx_jobs_pending_user_created
    ON jobs (user_id, created_at) WHERE status = 'pending';
CREATE INDEX idx_jobs_pending_agent_created
    ON jobs (agent_identifier, created_at) WHERE status = 'pending';
CREATE INDEX idx_jobs_pending_user_agent_created
    ON jobs (user_id, agent_identifier, created_at) WHERE status = 'pending';
COMMENT ON INDEX idx_jobs_pending_user_created IS
    'Oldest pending job of a user: min(created_at) WHERE status = ''pending'' AND user_id = $1 (job_oldest_pending).';
COMMENT ON INDEX idx_jobs_pending_agent_created IS
    'Oldest pending job of an agent: min(created_at) WHERE status = ''pending'' AND agent_identifier = $1 (job_oldest_pending).';
COMMENT ON INDEX idx_jobs_pending_user_agent_created IS
    'Oldest pending job of a user at an agent: min(created_at) WHERE status = ''pending'' AND user_id = $1 AND agent_identifier = $2 (job_oldest_pending).';

CREATE FUNCTION job_oldest_pending(p_user_id uuid, p_agent_identifier text)
    RETURNS timestamptz
    LANGUAGE plpgsql
    STABLE
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
DECLARE
    v_uid uuid;
    -- The caller's effective role: SET ROLE's target, else the login role
    -- (inside SECURITY DEFINER current_user is the definer, not the caller).
    v_role name := CASE WHEN current_setting('role') = 'none' THEN session_user
                        ELSE current_setting('role')::name END;
BEGIN
    -- The visibility of jobs for the caller: row-level security does not apply
    -- to superusers, BYPASSRLS roles and the table's owner (the service itself,
    -- or plain SQL by an administrator); under it, the service role sees every
    -- job and anyone else only the jobs whose user_id is its auth.uid().
    IF (SELECT auth.role()) IS DISTINCT FROM 'service_role'
       AND NOT EXISTS (SELECT 1 FROM pg_roles r
                       WHERE r.rolname = v_role
                         AND (r.rolsuper OR r.rolbypassrls
                              OR r.oid = (SELECT c.relowner FROM pg_class c
                                          WHERE c.oid = 'public.jobs'::regclass))) THEN
        v_uid := auth.uid();
        IF v_uid IS NULL OR p_user_id <> v_uid THEN
            RETURN NULL;         -- nothing visible
        END IF;
        p_user_id := v_uid;      -- "all" is the caller's own jobs
    END IF;

    IF p_user_id IS NULL THEN
        IF p_agent_identifier IS NULL THEN
            -- idx_jobs_status_created (status, created_at DESC), backwards
            RETURN (SELECT min(j.created_at) FROM public.jobs j
                    WHERE j.status = 'pending');
        END IF;
        -- idx_jobs_pending_agent_created
        RETURN (SELECT min(j.created_at) FROM public.jobs j
                WHERE j.status = 'pending' AND j.agent_identifier = p_agent_identifier);
    END IF;
    IF p_agent_identifier IS NULL THEN
        -- idx_jobs_pending_user_created
        RETURN (SELECT min(j.created_at) FROM public.jobs j
                WHERE j.status = 'pending' AND j.user_id = p_user_id);
    END IF;
    -- idx_jobs_pending_user_agent_created
    RETURN (SELECT min(j.created_at) FROM public.jobs j
            WHERE j.status = 'pending' AND j.user_id = p_user_id
              AND j.agent_identifier = p_agent_identifier);
END;
$$;
COMMENT ON FUNCTION job_oldest_pending(uuid, text) IS
    'GetStats oldest_pending_created_at: min(created_at) of the pending jobs of one user (p_user_id; NULL = all users) optionally at one agent (p_agent_identifier; NULL = all agents); NULL when none. Visibility as the jobs policies: the service_role claim sees all jobs; any other caller only its own (auth.uid()), its "all" being its own jobs, another user''s giving NULL. SECURITY DEFINER so that each case is a one-row index lookup (under row-level security the planner cannot use status = ''pending'' as an index condition, enum equality not being leakproof).';

-------------------------------------------------------------------------------
-- Row-level security and privileges: read-only for the API roles, like jobs.
-------------------------------------------------------------------------------
ALTER TABLE job_stats_rollup ENABLE ROW LEVEL SECURITY;

CREATE POLICY "Users can view own job stats" ON job_stats_rollup
    FOR SELECT USING ((select auth.uid()) = user_id);
CREATE POLICY "Service role can view all job stats" ON job_stats_rollup
    FOR SELECT USING ((select auth.role()) = 'service_role');
COMMENT ON POLICY "Users can view own job stats" ON job_stats_rollup IS
    'A user reads only the rollup rows of its own jobs (as on jobs).';
COMMENT ON POLICY "Service role can view all job stats" ON job_stats_rollup IS
    'The service role reads every rollup row, including jobs owned by no user (as on jobs).';

REVOKE ALL ON job_stats_rollup FROM PUBLIC;
GRANT SELECT ON job_stats_rollup TO authenticated, service_role;

REVOKE EXECUTE ON FUNCTION
    job_stats_rollup_insert(), job_stats_rollup_update(), job_stats_rollup_delete(),
    job_stats_rollup_truncate(), job_stats_fold(), job_stats_rebuild(),
    job_oldest_pending(uuid, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION job_oldest_pending(uuid, text) TO authenticated, service_role;
-- The fold only reorganizes rows (no figure changes): the service may call it
-- as the service role as well as its login user.
GRANT EXECUTE ON FUNCTION job_stats_fold() TO service_role;

-------------------------------------------------------------------------------
-- Backfill from the existing rows (jobs is locked since the top of the file).
-------------------------------------------------------------------------------
SELECT job_stats_rebuild();
