DROP INDEX job_events_user_position;
