-- Reverts up.sql, in reverse order.

DROP VIEW job_stats;
DROP FUNCTION get_job_stats(uuid);
-- Also drops the table's policies, trigger, constraints and indexes, and every
-- privilege granted on it.
DROP TABLE jobs;
DROP FUNCTION jobs_touch();
DROP TYPE job_status;

DROP FUNCTION auth.role();
DROP FUNCTION auth.uid();
DROP SCHEMA auth;  -- RESTRICT: it must be empty again now

-- The only privilege of up.sql on an object that outlives this migration.
REVOKE USAGE ON SCHEMA public FROM anon, authenticated, service_role;

-- Roles are cluster-wide: other databases of the same cluster may still run
-- this schema and depend on them (PostgreSQL then refuses DROP ROLE with
-- dependent_objects_still_exist). So drop each role only if nothing in any
-- database uses it any more, and otherwise keep it, together with the
-- current user's membership in it (the service in those other databases
-- still needs SET ROLE). DROP ROLE also removes the membership that up.sql
-- granted to a non-superuser current_user. Each attempt is its own
-- subtransaction, so a failure leaves that role exactly as it was.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        BEGIN
            EXECUTE format('DROP ROLE IF EXISTS %I', r);
        EXCEPTION
            WHEN dependent_objects_still_exist  -- still used by another database
              OR object_in_use                  -- e.g. a session's current role
              OR insufficient_privilege THEN    -- not ours to drop
                RAISE NOTICE 'keeping role %: %', r, SQLERRM;
        END;
    END LOOP;
END
$$;
