ALTER POLICY "Service role full access" ON jobs TO public;
ALTER POLICY "Service role can view all job stats" ON job_stats_rollup TO public;
