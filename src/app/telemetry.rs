//! Logging: one line per call, gathered in memory and written out in batches by a thread of
//! its own, so that a call never waits on the log's reader and never wakes a thread.
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::config::LogFormat;

/// How often the writer thread writes out what has gathered.
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Past this many bytes gathered, the writer is woken before its interval.
const EARLY_FLUSH_BYTES: usize = 256 * 1024;
/// Past this many bytes not yet written (a reader that has fallen behind: about 10,000 lines,
/// forty times what a healthy reader is given each [`FLUSH_INTERVAL`] at 20,000 calls/s), new
/// lines are dropped rather than calls held up, and counted (`jobsvc_log_lines_dropped_total`).
const MAX_PENDING_BYTES: usize = 2 * 1024 * 1024;
/// At exit, the writer gets this long to write out the rest.
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(1);

/// The count of log lines dropped because the writer had fallen behind.
pub type DroppedLines = Arc<AtomicU64>;

/// The log writer of `serve`: keep it until exit (dropping it writes out what is gathered,
/// waiting for the writer up to about a second); `dropped` counts the lines it had to drop.
pub struct LogWriter {
    shared: Arc<Shared>,
    done: Option<std::sync::mpsc::Receiver<()>>,
    pub dropped: DroppedLines,
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(FINAL_FLUSH_WAIT);
        }
    }
}

/// Logs to stderr. Lines are gathered in a buffer and written out by a thread every
/// [`FLUSH_INTERVAL`] (sooner past [`EARLY_FLUSH_BYTES`]): one write for many lines, and no
/// wake-up per line.
///
/// Written here rather than taken from tracing-appender, whose non-blocking writer wakes its
/// thread for every line (a futex wake and a context switch per call) and writes each line
/// with a syscall of its own: on two cores that was a quarter of GetJob's throughput. A line
/// reaches the log at most [`FLUSH_INTERVAL`] late. Colours only when stderr is a terminal.
pub fn init_tracing(format: LogFormat) -> LogWriter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let dropped = DroppedLines::default();
    let shared = Arc::new(Shared {
        pending: Mutex::new(Vec::new()),
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
        dropped: dropped.clone(),
    });
    let (done_tx, done) = std::sync::mpsc::channel();
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                shared.write_out(std::io::stderr());
                let _ = done_tx.send(());
            })
    };
    let done = match thread {
        Ok(_) => Some(done),
        Err(e) => {
            eprintln!("cannot start the log writer thread ({e}); logging is off");
            return LogWriter {
                shared,
                done: None,
                dropped,
            };
        }
    };
    let sink = LogSink(shared.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(sink);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogWriter {
        shared,
        done,
        dropped,
    }
}

struct Shared {
    /// Whole lines not yet written.
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    stop: AtomicBool,
    dropped: DroppedLines,
}

impl Shared {
    /// Adds one formatted line (tracing-subscriber's fmt layer writes each event with one
    /// `write_all`), or drops it when too much is waiting.
    fn gather(&self, line: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() + line.len() > MAX_PENDING_BYTES {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = pending.len();
        pending.extend_from_slice(line);
        let crossed = before < EARLY_FLUSH_BYTES && pending.len() >= EARLY_FLUSH_BYTES;
        drop(pending);
        if crossed {
            self.wake.notify_one();
        }
    }

    /// The writer thread: swaps the gathered lines out and writes them, until stopped.
    fn write_out(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            let stopping = {
                let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let (mut pending, _) = self
                    .wake
                    .wait_timeout_while(pending, FLUSH_INTERVAL, |p| {
                        p.len() < EARLY_FLUSH_BYTES && !self.stop.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(|e| e.into_inner());
                std::mem::swap(&mut *pending, &mut batch);
                self.stop.load(Ordering::Acquire)
            };
            if !batch.is_empty() {
                // A failed write (a closed stderr) loses these lines; there is nowhere to
                // report it.
                let _ = out.write_all(&batch).and_then(|_| out.flush());
                batch.clear();
                // Whatever a burst grew the buffer to is given back once it has passed.
                batch.shrink_to(EARLY_FLUSH_BYTES);
            }
            if stopping {
                return;
            }
        }
    }
}

/// The fmt layer's writer: hands each line to [`Shared::gather`].
#[derive(Clone)]
struct LogSink(Arc<Shared>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.gather(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            dropped: DroppedLines::default(),
        })
    }

    /// A writer the test can read while the writer thread holds it.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<u8>>>);

    impl Write for Seen {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_and_all_of_them_at_stop() {
        let shared = shared();
        let seen = Seen::default();
        let thread = {
            let (shared, seen) = (shared.clone(), seen.clone());
            std::thread::spawn(move || shared.write_out(seen))
        };
        for i in 0..1000 {
            shared.gather(format!("line {i}\n").as_bytes());
        }
        shared.stop.store(true, Ordering::Release);
        shared.wake.notify_one();
        thread.join().unwrap();
        let text = String::from_utf8(seen.0.lock().unwrap().clone()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_reader_that_falls_behind_costs_lines_not_memory() {
        let shared = shared();
        // No writer thread: nothing is written out.
        let line = vec![b'x'; 1024];
        let lines = MAX_PENDING_BYTES / line.len() + 10;
        for _ in 0..lines {
            shared.gather(&line);
        }
        assert!(shared.pending.lock().unwrap().len() <= MAX_PENDING_BYTES);
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 10);
    }
}
