//! What can go wrong with the private PostgreSQL.

/// The command that installs the server on this machine kind.
pub(crate) const INSTALL_HINT: &str = "apt-get update && apt-get install -y postgresql";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "no PostgreSQL server binaries found (initdb and postgres on PATH or under /usr/lib/postgresql/*/bin); install them with: {INSTALL_HINT}"
    )]
    NotInstalled,
    #[error(
        "PostgreSQL refuses to run as root and there is no `postgres` user to run it as; install PostgreSQL with: {INSTALL_HINT}"
    )]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Io { what, source }
}
