-- A user's stream that resumes catches up from the history of its own jobs only: this index
-- serves `WHERE user_id = $u AND (feed_xid, seq) > ($x, $s) ORDER BY feed_xid, seq`, so the
-- read costs what the user's own events cost, not a walk through every tenant's history in
-- the window (up to the retention, 7 days by default).
CREATE INDEX job_events_user_position ON job_events (user_id, feed_xid, seq);
COMMENT ON INDEX job_events_user_position IS
    'A user''s catch-up read of the change feed (db::events::read with a user): the user''s events in feed order after a position.';
