-- Reverts up.sql.
DROP TRIGGER jobs_record_events_update ON jobs;
DROP TRIGGER jobs_record_events_insert ON jobs;
DROP FUNCTION job_events_reset();
DROP FUNCTION job_events_prune(interval, integer);
DROP FUNCTION jobs_record_events();
DROP TABLE job_events_pruned;
DROP TABLE job_events;
