//! Job states and the one transition table that everything uses.

/// The lifecycle state of a job (PostgreSQL enum `job_status`; its SQL mapping is in
/// `crate::db::models`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    diesel::deserialize::FromSqlRow,
    diesel::expression::AsExpression,
)]
#[diesel(sql_type = crate::db::schema::sql_types::JobStatus)]
pub enum JobStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// What a requested move means for a job in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The move is allowed from the current state.
    Apply,
    /// The job already made this move: a client's retry, answered with the job unchanged.
    AlreadyDone,
    /// No such move exists from the current state.
    Forbidden,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The label used by PostgreSQL's `job_status` enum.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// The states from which a job may move to `self`: the whole transition table.
    pub fn allowed_from(self) -> &'static [JobStatus] {
        match self {
            JobStatus::Pending => &[],
            JobStatus::Running => &[JobStatus::Pending],
            JobStatus::Completed => &[JobStatus::Running],
            JobStatus::Failed | JobStatus::Cancelled => &[JobStatus::Pending, JobStatus::Running],
        }
    }
}

/// Decides a move from `current` to `target`.
pub fn transition(current: JobStatus, target: JobStatus) -> Transition {
    if target.allowed_from().contains(&current) {
        Transition::Apply
    } else if current == target && !target.allowed_from().is_empty() {
        Transition::AlreadyDone
    } else {
        Transition::Forbidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn status() -> impl Strategy<Value = JobStatus> {
        prop::sample::select(JobStatus::ALL.to_vec())
    }

    proptest! {
        /// Any walk through the table only moves forward: a terminal state is never left, and
        /// every applied move is one of the six the contract lists.
        #[test]
        fn walks_never_leave_terminal_states(moves in prop::collection::vec(status(), 0..20)) {
            let mut cur = JobStatus::Pending;
            for target in moves {
                match transition(cur, target) {
                    Transition::Apply => {
                        prop_assert!(!cur.is_terminal());
                        prop_assert!(matches!(
                            (cur, target),
                            (JobStatus::Pending, JobStatus::Running)
                                | (JobStatus::Running, JobStatus::Completed)
                                | (JobStatus::Pending | JobStatus::Running,
                                   JobStatus::Failed | JobStatus::Cancelled)
                        ));
                        cur = target;
                    }
                    Transition::AlreadyDone => prop_assert_eq!(cur, target),
                    Transition::Forbidden => prop_assert!(cur != target || cur == JobStatus::Pending),
                }
            }
        }

        /// Exactly one verdict per pair, and AlreadyDone only for the state itself.
        #[test]
        fn verdict_is_consistent(cur in status(), target in status()) {
            let t = transition(cur, target);
            prop_assert_eq!(t == Transition::AlreadyDone, cur == target && cur != JobStatus::Pending);
            prop_assert_eq!(t == Transition::Apply, target.allowed_from().contains(&cur));
        }
    }

    #[test]
    fn table_has_six_moves_and_four_retries() {
        let mut apply = 0;
        let mut retry = 0;
        for a in JobStatus::ALL {
            for b in JobStatus::ALL {
                match transition(a, b) {
                    Transition::Apply => apply += 1,
                    Transition::AlreadyDone => retry += 1,
                    Transition::Forbidden => {}
                }
            }
        }
        assert_eq!((apply, retry), (6, 4));
    }
}
