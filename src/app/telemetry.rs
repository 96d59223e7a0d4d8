//! Logging: one line per call, through a writer thread that never holds a call up.
use std::io::IsTerminal;

use super::config::LogFormat;

/// Lines the log writer holds for a reader that has fallen behind: about 4 s of calls at
/// 4,000 calls/s. The buffer is allocated up front (32 bytes a line), so the crate's default
/// of 128,000 lines added 4 MB to the idle server.
const LOG_BUFFER_LINES: usize = 16_384;

/// The log writer of `serve`: keep it until exit (dropping it flushes what is buffered,
/// waiting for the writer up to about a second); `dropped` counts the lines it had to drop.
pub struct LogWriter {
    _guard: tracing_appender::non_blocking::WorkerGuard,
    pub dropped: tracing_appender::non_blocking::ErrorCounter,
}

/// Logs to stderr through a writer thread (tracing-appender's non-blocking writer): a call
/// never waits on a slow or stalled log reader, which would hold up a runtime worker and every
/// call on it. If the reader falls [`LOG_BUFFER_LINES`] behind, new lines are dropped rather
/// than calls held up, and counted (`jobsvc_log_lines_dropped_total`). Colours only when
/// stderr is a terminal.
pub fn init_tracing(format: LogFormat) -> LogWriter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogWriter {
        _guard: guard,
        dropped,
    }
}
