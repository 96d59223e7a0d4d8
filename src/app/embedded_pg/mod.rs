//! A private PostgreSQL from the local install, for `jobsvc serve` without `DATABASE_URL` and
//! for the test harness.
//!
//! Written by hand because the crates that do this either download binaries at build or run
//! time (impossible on a closed network) or panic when run as root without sudo; this needs
//! only `initdb` and `postgres` from the machine's install.
//!
//! The server runs as a child of a dedicated thread that lives as long as it does, with
//! PR_SET_PDEATHSIG, so it also stops when jobsvc is killed; the next start recovers from the
//! data directory. As root it runs as the `postgres` user (PostgreSQL refuses root).
//!
//! It is private to the account that runs jobsvc: its socket and data directories are
//! reachable only by their owner (0700, `unix_socket_permissions=0700`, the log 0600), and
//! every connection authenticates with scram-sha-256. The superuser's password is generated
//! at `initdb` and kept next to the JWT secret (`pg_superuser_password`, 0600); the service
//! itself connects as `jobsvc`, a role that is neither a superuser nor may create roles, and owns its database
//! ([`EmbeddedPg::service_url`], password in `pg_password`). A cluster made by an older jobsvc
//! (`trust`, no password file) is given a password and scram at its next start.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};

mod access;
mod error;
mod files;
pub use error::PgError;
use error::io;
use files::{SUPERUSER_PASSWORD_FILE, new_password, write_private};

/// How the private server listens and how hard it tries to be durable.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `Some(port)`: also listen on 127.0.0.1:port (0 picks a free one). `None`: unix socket only.
    pub tcp_port: Option<u16>,
    /// Off for tests (fsync, full-page writes and synchronous commit off); on for real data.
    pub durable: bool,
    pub max_connections: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            tcp_port: None,
            durable: true,
            max_connections: 100,
        }
    }
}

pub struct EmbeddedPg {
    /// The data directory (`--data-dir`) the cluster lives under, where the passwords are kept.
    root: PathBuf,
    /// The superuser's password (scram-sha-256 for every connection).
    password: String,
    /// Made by an older jobsvc with `trust`: secured at the next start.
    legacy_trust: bool,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    tcp: bool,
    options: PgOptions,
    run_as: Option<User>,
    /// The running server's pid, while one runs.
    child: Arc<Mutex<Option<i32>>>,
}

impl EmbeddedPg {
    /// The directory holding `initdb` and `postgres`: PATH first, then the newest
    /// /usr/lib/postgresql/*/bin.
    pub fn find_bin_dir() -> Result<PathBuf, PgError> {
        let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if let Ok(real) = fs::canonicalize(dir.join("initdb"))
                    && let Some(parent) = real.parent()
                    && has_both(parent)
                {
                    return Ok(parent.to_path_buf());
                }
            }
        }
        let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                has_both(&bin).then_some((version, bin))
            })
            .collect();
        candidates.sort();
        candidates
            .pop()
            .map(|(_, b)| b)
            .ok_or(PgError::NotInstalled)
    }

    /// Prepares (and on first use initializes) a cluster under `root`.
    pub fn init(root: &Path, options: PgOptions) -> Result<Self, PgError> {
        let bin_dir = Self::find_bin_dir()?;
        let run_as = if nix::unistd::geteuid().is_root() {
            Some(
                User::from_name("postgres")
                    .ok()
                    .flatten()
                    .ok_or(PgError::NoPostgresUser)?,
            )
        } else {
            None
        };
        fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
        let root = fs::canonicalize(root).map_err(io("resolving the data directory"))?;
        let base = root.join("pg");
        fs::create_dir_all(&base).map_err(io(format!("creating {}", base.display())))?;
        // Only the owner may list the data directory; the postgres user (when jobsvc runs as
        // root) may pass through it to its own directory, which only it may enter.
        let root_mode = if run_as.is_some() { 0o711 } else { 0o700 };
        fs::set_permissions(&root, fs::Permissions::from_mode(root_mode))
            .map_err(io("making the data directory private"))?;
        if let Some(user) = &run_as {
            std::os::unix::fs::chown(&base, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(io("giving the data directory to the postgres user"))?;
        }
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700))
            .map_err(io("making the PostgreSQL directory private"))?;
        let initialized = base.join("data/PG_VERSION").exists();
        let password_file = root.join(SUPERUSER_PASSWORD_FILE);
        let password = match fs::read_to_string(&password_file) {
            Ok(p) if !p.trim().is_empty() => p.trim().to_owned(),
            _ => new_password()?,
        };
        // Judged by the client authentication itself, not by the password file: an upgrade
        // cut short after writing the file still finishes at the next start.
        let legacy_trust = initialized && files::trusts(&base.join("data/pg_hba.conf"));
        let (port, tcp) = match options.tcp_port {
            Some(0) => (free_port()?, true),
            Some(p) => (p, true),
            None => (5432, false),
        };
        let pg = EmbeddedPg {
            root: root.clone(),
            password,
            legacy_trust,
            bin_dir,
            data_dir: base.join("data"),
            socket_dir: base.clone(),
            log_file: base.join("postgres.log"),
            port,
            tcp,
            options,
            run_as,
            child: Arc::new(Mutex::new(None)),
        };
        if !initialized {
            // Kept before initdb sets it: a crash in between leaves a file that matches.
            write_private(&password_file, &pg.password)?;
            pg.initdb()?;
        }
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        cmd.env("LC_ALL", "C.UTF-8");
        cmd
    }

    fn initdb(&self) -> Result<(), PgError> {
        // initdb reads the superuser's password from a file the postgres user can read, in
        // its own private directory, removed right after.
        let pwfile = self.socket_dir.join("initdb-password");
        write_private(&pwfile, &self.password)?;
        if let Some(user) = &self.run_as {
            std::os::unix::fs::chown(&pwfile, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(io("giving the password file to the postgres user"))?;
        }
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("--locale=C.UTF-8");
        if !self.options.durable {
            cmd.arg("--no-sync");
        }
        let out = cmd.output();
        let _ = fs::remove_file(&pwfile);
        let out = out.map_err(io("running initdb"))?;
        if !out.status.success() {
            return Err(PgError::Failed(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Starts the server and waits until it accepts connections (at most 60 s).
    pub async fn start(&self) -> Result<(), PgError> {
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-k")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!(
                "listen_addresses={}",
                if self.tcp { "127.0.0.1" } else { "" }
            ))
            .arg("-c")
            .arg(format!("max_connections={}", self.options.max_connections))
            .arg("-c")
            .arg("unix_socket_permissions=0700");
        if !self.options.durable {
            for setting in [
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ] {
                cmd.arg("-c").arg(setting);
            }
        }
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.log_file)
                .map_err(io("opening the PostgreSQL log"))?
        };
        // A log made by an older jobsvc was readable by everyone.
        fs::set_permissions(&self.log_file, fs::Permissions::from_mode(0o600))
            .map_err(io("making the PostgreSQL log private"))?;
        let log2 = log.try_clone().map_err(io("opening the PostgreSQL log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C in the terminal reaches jobsvc, which then stops
            // the database after draining calls, not both at once.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGINT).map_err(std::io::Error::from)
            });
        }

        let (tx, rx) = std::sync::mpsc::channel();
        let child_slot = self.child.clone();
        // The keeper thread outlives no one: PDEATHSIG fires when the thread that spawned the
        // child exits, so that thread waits for the child for as long as it runs.
        std::thread::Builder::new()
            .name("embedded-postgres".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    *child_slot.lock().unwrap() = Some(child.id() as i32);
                    let _ = tx.send(Ok(()));
                    let _ = child.wait();
                    *child_slot.lock().unwrap() = None;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(io("starting the PostgreSQL keeper thread"))?;
        rx.recv()
            .map_err(|_| PgError::Failed("PostgreSQL keeper thread died".into()))?
            .map_err(io("starting postgres"))?;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.child.lock().unwrap().is_none() {
                return Err(PgError::Failed(format!(
                    "postgres exited at start; see {}:\n{}",
                    self.log_file.display(),
                    self.log_tail()
                )));
            }
            if <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
                &self.url("postgres"),
            )
            .await
            .is_ok()
            {
                if self.legacy_trust {
                    self.secure_legacy_cluster().await?;
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PgError::Failed(format!(
                    "postgres did not accept connections within 60 s; see {}",
                    self.log_file.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fast shutdown, as `pg_ctl stop -m fast` (SIGINT: open transactions roll back,
    /// committed data stays), and wait for exit.
    pub async fn stop(&self) {
        self.signal_and_wait(Signal::SIGINT, Duration::from_secs(30))
            .await;
        // Still alive: immediate shutdown (crash recovery on the next start).
        self.signal_and_wait(Signal::SIGQUIT, Duration::from_secs(10))
            .await;
    }

    /// Immediate shutdown, as `pg_ctl stop -m immediate` (SIGQUIT to the postmaster): every
    /// backend quits at once, and the next start runs crash recovery. For fault tests.
    pub async fn stop_immediate(&self) {
        self.signal_and_wait(Signal::SIGQUIT, Duration::from_secs(30))
            .await;
    }

    async fn signal_and_wait(&self, signal: Signal, timeout: Duration) {
        let Some(pid) = *self.child.lock().unwrap() else {
            return;
        };
        let _ = kill(Pid::from_raw(pid), signal);
        let deadline = Instant::now() + timeout;
        while self.child.lock().unwrap().is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A superuser's connection string for database `db` (TCP when enabled, else the unix
    /// socket), its password included: for setting the cluster up, tests and tools.
    pub fn url(&self, db: &str) -> String {
        self.url_as("postgres", &self.password, db)
    }

    fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        // The passwords are ours, hex digits only: nothing to escape.
        if self.tcp {
            format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
        } else {
            format!(
                "host={} port={} user={user} password={password} dbname={db}",
                self.socket_dir.display(),
                self.port
            )
        }
    }

    /// Creates database `name` unless it exists.
    pub async fn ensure_database(&self, name: &str) -> Result<(), PgError> {
        use diesel::sql_types::Text;
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Found {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            found: bool,
        }
        let mut conn =
            <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(
                &self.url("postgres"),
            )
            .await
            .map_err(|e| PgError::Failed(format!("connecting to the private PostgreSQL: {e}")))?;
        let exists: Found = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS found",
        )
        .bind::<Text, _>(name)
        .get_result(&mut conn)
        .await
        .map_err(|e| PgError::Failed(e.to_string()))?;
        if !exists.found {
            // The name is ours (a constant or a generated identifier), quoted as an identifier.
            diesel::sql_query(format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")))
                .execute(&mut conn)
                .await
                .map_err(|e| PgError::Failed(format!("creating database {name}: {e}")))?;
        }
        Ok(())
    }

    pub(crate) fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        let running = *self.child.lock().unwrap();
        if let Some(pid) = running {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(15);
            while self.child.lock().unwrap().is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn free_port() -> Result<u16, PgError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}
