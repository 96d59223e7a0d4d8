DROP FUNCTION job_events_tail(xid8);
