-- Where a reader of the change feed stands once it has read everything below a horizon: the
-- position of the last event below it, or the pruning watermark if that is later, or (0, 0).
--
-- Readers stand at such tails, never at the horizon itself: PostgreSQL may hand out a
-- transaction id again after a crash when its first holder wrote nothing durable (an
-- asynchronously committed NOTIFY, a rolled-back write), and a position at that horizon would
-- skip the new holder's events. An event below the horizon was committed durably, so its id
-- survives crash recovery, and every later event gets a larger feed_xid.
--
-- SECURITY DEFINER: positions are global, whoever asks (a user's stream reads under row-level
-- security, which would otherwise hide other users' events and the watermark).
CREATE FUNCTION job_events_tail(below xid8, OUT feed_xid bigint, OUT seq bigint)
    LANGUAGE sql STABLE
    SECURITY DEFINER
    SET search_path = public, pg_temp
AS $$
    SELECT COALESCE(t.feed_xid, 0), COALESCE(t.seq, 0)
    FROM (SELECT) one
    LEFT JOIN (
        SELECT c.feed_xid, c.seq FROM (
            (SELECT e.feed_xid::text::int8 AS feed_xid, e.seq FROM job_events e
             WHERE e.feed_xid < below ORDER BY e.feed_xid DESC, e.seq DESC LIMIT 1)
            UNION ALL
            (SELECT p.feed_xid::text::int8, p.seq FROM job_events_pruned p)
        ) c
        ORDER BY c.feed_xid DESC, c.seq DESC LIMIT 1
    ) t ON true
$$;
COMMENT ON FUNCTION job_events_tail(xid8) IS
    'The change feed position of the last event below transaction id `below`, or the pruning watermark if later, or (0, 0): where a reader stands after reading everything below that horizon. Positions are never the horizon itself, whose ids crash recovery may hand out again. SECURITY DEFINER: the same answer for every caller.';
REVOKE ALL ON FUNCTION job_events_tail(xid8) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION job_events_tail(xid8) TO authenticated, service_role;
