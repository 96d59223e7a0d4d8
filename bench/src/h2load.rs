//! `--client h2load`: a unary scenario driven by nghttp2's h2load (Debian `nghttp2-client`)
//! instead of the bench's own Rust client. h2load replays one encoded request and does not
//! decode the replies, so nearly all the CPU it leaves goes to the server and PostgreSQL: the
//! figure shows the server, not the caller.
//!
//! A gRPC error is still HTTP 200 (its status rides in the trailers, which h2load does not
//! read), so every run is checked by bytes: the mean DATA bytes per reply must reach what a
//! real reply of the scenario carries (an error reply has none), and a create's run must
//! have created as many rows as it counted.
use std::process::Command;
use std::time::Duration;

use super::{Args, Outcome};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One h2load run of `path` with the encoded `message`, as `token`'s caller.
pub struct Run {
    pub succeeded: u64,
    pub rps: f64,
    pub mean_ms: f64,
    /// CPU per call of PostgreSQL, the server and h2load, over the measured time.
    pub cpu_us: Option<super::cpu::Split>,
}

/// Runs h2load for the warm-up and the measured time; `min_reply_bytes` is the least a real
/// reply weighs.
pub fn run(
    args: &Args,
    addr: std::net::SocketAddr,
    method: &str,
    token: &str,
    message: &[u8],
    min_reply_bytes: f64,
) -> Result<Run, BoxError> {
    let file = std::env::temp_dir().join(format!("jobsvc-h2load-{}.bin", std::process::id()));
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    std::fs::write(&file, &framed)?;
    eprintln!(
        "h2load: warming up {:?}, then measuring {:?}",
        args.warmup, args.duration
    );
    let child = Command::new("h2load")
        .args(["-c", &args.concurrency.to_string(), "-m", "1", "-t", "1"])
        .args(["--warm-up-time", &secs(args.warmup)])
        .args(["-D", &secs(args.duration)])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .arg("-d")
        .arg(&file)
        .arg(format!("http://{addr}/jobs.v1.JobService/{method}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run h2load ({e}): install it with `apt-get install nghttp2-client`")
        })?;
    let measured = super::cpu::over_run(child.id(), args.warmup, args.duration);
    let out = child.wait_with_output()?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let number = |line_start: &str, word: &str| -> Option<f64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(line_start))?;
        let at = line.find(word)?;
        line[..at]
            .split([' ', ',', '('])
            .rev()
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    };
    let succeeded = number("requests:", " succeeded").ok_or("h2load printed no request count")?;
    let rps = number("finished in", " req/s").ok_or("h2load printed no rate")?;
    // "traffic: 30.73MB (32219872) total, ... 27.99MB (29349870) data"
    let data = text
        .lines()
        .find(|l| l.starts_with("traffic:"))
        .and_then(|l| {
            let end = l.rfind(") data")?;
            let start = l[..end].rfind('(')? + 1;
            l[start..end].parse::<f64>().ok()
        })
        .ok_or("h2load printed no traffic figure")?;
    let mean_ms = text
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5).map(str::to_owned))
        .and_then(|mean| parse_time_ms(&mean))
        .unwrap_or(f64::NAN);
    let bytes_per_reply = data / succeeded.max(1.0);
    if succeeded == 0.0 || bytes_per_reply < min_reply_bytes {
        return Err(format!(
            "h2load's replies are not real {method} answers ({bytes_per_reply:.0} data bytes per \
             reply, at least {min_reply_bytes} expected; errors carry none):\n{text}"
        )
        .into());
    }
    eprintln!(
        "h2load: {succeeded} {method} replies, {bytes_per_reply:.0} data bytes each, {rps:.0}/s"
    );
    Ok(Run {
        succeeded: succeeded as u64,
        rps,
        mean_ms,
        cpu_us: measured.and_then(|(split, window)| split.per_call_us(rps * window)),
    })
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// h2load's times: "1.23ms", "456us", "1.2s".
fn parse_time_ms(s: &str) -> Option<f64> {
    if let Some(v) = s.strip_suffix("ms") {
        return v.parse().ok();
    }
    if let Some(v) = s.strip_suffix("us") {
        return v.parse::<f64>().ok().map(|v| v / 1e3);
    }
    s.strip_suffix('s')?.parse::<f64>().ok().map(|v| v * 1e3)
}

impl Run {
    /// The run as the bench's outcome (h2load gives a mean, not percentiles).
    pub fn outcome(&self) -> Outcome {
        Outcome {
            rps: self.rps,
            p50_ms: self.mean_ms,
            p99_ms: f64::NAN,
            p999_ms: f64::NAN,
            cpu_us: self.cpu_us,
            ..Default::default()
        }
    }
}
