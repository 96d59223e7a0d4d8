//! One committed change, as the feed carries it: a domain row, not a message.
use crate::db::events::EventRow;
use crate::domain::{Job, Position};

/// One committed change, as every subscriber it matches receives it.
#[derive(Debug)]
pub struct Event {
    pub position: Position,
    /// The transaction that made the change (for skipping what a snapshot already shows).
    pub writer_xid: i64,
    /// Its JSON and message in bytes of text: what it weighs in a subscriber's queue.
    pub bytes: usize,
    /// The whole job just after the change.
    pub job: Job,
}

impl From<EventRow> for Event {
    fn from(row: EventRow) -> Self {
        Event {
            position: row.position(),
            writer_xid: row.writer_xid,
            bytes: row.bytes,
            job: row.job,
        }
    }
}
