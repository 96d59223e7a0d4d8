//! CPU time per call of each part of a run, read from `/proc`: PostgreSQL (all its processes),
//! the server under test, and the caller (this load generator, or pgbench). A ratio says how
//! far apart jobsvc and pgbench are; this says where the difference goes. Linux only. A part
//! not on this machine (a server given by `--server`, a remote database) reads as absent or 0.
use std::collections::HashMap;
use std::sync::OnceLock;

/// The pid of the server under test, when the bench started it.
pub static SERVER_PID: OnceLock<u32> = OnceLock::new();

/// Linux gives CPU times in USER_HZ, which is 100 on every architecture it supports.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (or, scaled, microseconds per call) by part.
#[derive(Clone, Copy, Debug, Default)]
pub struct Split {
    pub postgres: f64,
    /// `None` when the server is not a process the bench started.
    pub server: Option<f64>,
    pub caller: f64,
}

impl Split {
    /// Microseconds per call, for `calls` calls.
    pub fn per_call_us(self, calls: f64) -> Option<Split> {
        (calls > 0.0).then(|| {
            let us = |s: f64| s * 1e6 / calls;
            Split {
                postgres: us(self.postgres),
                server: self.server.map(us),
                caller: us(self.caller),
            }
        })
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "postgres": self.postgres.round(),
            "server": self.server.map(f64::round),
            "caller": self.caller.round(),
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Part {
    Postgres,
    Server,
    Caller,
}

/// CPU ticks used so far by every process of interest.
pub struct Snapshot(HashMap<u32, (Part, u64)>);

/// Reads `/proc` now; `caller` is the pid of whoever makes the calls.
pub fn snapshot(caller: u32) -> Snapshot {
    let server = SERVER_PID.get().copied();
    let mut seen = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Snapshot(seen);
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ...`: comm may hold spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let part = if Some(pid) == server {
            Part::Server
        } else if pid == caller {
            Part::Caller
        } else if comm == "postgres" {
            Part::Postgres
        } else {
            continue;
        };
        // After the comm: state is field 3, utime field 14 and stime field 15.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        seen.insert(pid, (part, ticks(11) + ticks(12)));
    }
    Snapshot(seen)
}

impl Snapshot {
    /// CPU seconds by part between `earlier` and this one (a process that started in between
    /// counts from zero; one that ended in between is not counted).
    pub fn since(&self, earlier: &Snapshot) -> Split {
        let mut split = Split {
            server: SERVER_PID.get().map(|_| 0.0),
            ..Split::default()
        };
        for (pid, (part, ticks)) in &self.0 {
            let before = earlier.0.get(pid).map_or(0, |(_, t)| *t);
            let seconds = ticks.saturating_sub(before) as f64 / TICKS_PER_SECOND;
            match part {
                Part::Postgres => split.postgres += seconds,
                Part::Server => *split.server.get_or_insert(0.0) += seconds,
                Part::Caller => split.caller += seconds,
            }
        }
        split
    }
}

/// CPU seconds by part while a load generator (`caller`, which runs for `duration` after
/// `warmup`) is measuring, less half a second at each end (its start-up and wind-down), and
/// the length of that window; `None` for a run too short to have one.
pub fn over_run(
    caller: u32,
    warmup: std::time::Duration,
    duration: std::time::Duration,
) -> Option<(Split, f64)> {
    let window = duration.as_secs_f64() - 1.0;
    if window < 1.0 {
        return None;
    }
    std::thread::sleep(warmup + std::time::Duration::from_millis(500));
    let first = snapshot(caller);
    std::thread::sleep(std::time::Duration::from_secs_f64(window));
    Some((snapshot(caller).since(&first), window))
}
