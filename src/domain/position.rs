//! Positions: where a reader stands in the change history, the database snapshot whose
//! changes a stream already showed, and where the next page of a listing starts.
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A point in the feed order: every event at or below it has been handled.
/// `(xid, 0)` means "everything below transaction `xid`" (sequence numbers start at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub xid: i64,
    pub seq: i64,
}

impl Position {
    /// Beyond every event (reads after it return only the horizon).
    pub const MAX: Position = Position {
        xid: i64::MAX,
        seq: i64::MAX,
    };

    /// Everything below `horizon` (an xid no running transaction is below).
    pub fn below(horizon: i64) -> Self {
        Position {
            xid: horizon,
            seq: 0,
        }
    }
}

/// The transaction's snapshot (`pg_current_snapshot()`), for skipping events that the
/// snapshot of existing jobs already reflects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: i64,
    pub xmax: i64,
    pub in_progress: Vec<i64>,
}

impl Snapshot {
    /// Parses the text form `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<i64>>>()?,
        };
        Some(Snapshot {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Whether the changes of transaction `xid` are visible in this snapshot (it committed
    /// before the snapshot was taken), as `pg_visible_in_snapshot` answers for a committed
    /// transaction.
    pub fn sees(&self, xid: i64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }
}

/// Where the next page starts: after this (created_at, id) in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_parse_and_answer_visibility() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        assert_eq!(s.in_progress, vec![101, 103]);
        assert!(s.sees(99));
        assert!(s.sees(100) && s.sees(102) && s.sees(104));
        assert!(!s.sees(101) && !s.sees(103));
        assert!(!s.sees(105) && !s.sees(200));
        let empty = Snapshot::parse("7:7:").unwrap();
        assert!(empty.sees(6) && !empty.sees(7));
        assert!(Snapshot::parse("x:1:").is_none());
        assert!(Snapshot::parse("1:2").is_none());
    }
}
