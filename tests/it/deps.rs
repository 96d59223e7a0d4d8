//! What the tests need from outside Rust: PostgreSQL's server binaries, and for the client
//! tests the Python venv in `target/clients-venv` (the Python client's packages, grpcurl) and
//! the Node.js packages. `scripts/test-deps` sets them up, once per test process: it installs
//! only what is missing (PostgreSQL with apt-get when root, the rest under this clone) and does
//! nothing, quickly, when everything is there.
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The outcome of this process's one run of `scripts/test-deps`.
static DEPS: OnceLock<Result<(), String>> = OnceLock::new();

/// Runs `scripts/test-deps` the first time it is called in this process (concurrent callers
/// wait for that run); panics, at every call, with its output if it failed.
pub fn ensure() {
    let outcome = DEPS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = root.join("scripts/test-deps");
        match Command::new(&script).current_dir(root).output() {
            Ok(out) if out.status.success() => {
                // What it installed, if anything (shown with a failing test's output).
                eprint!("{}", String::from_utf8_lossy(&out.stderr));
                Ok(())
            }
            Ok(out) => Err(format!(
                "{} failed ({}):\n{}{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            )),
            Err(e) => Err(format!("cannot run {}: {e}", script.display())),
        }
    });
    if let Err(message) = outcome {
        panic!("{message}");
    }
}

/// The venv's bin directory, `target/clients-venv/bin`: `python` and `grpcurl`.
pub fn venv_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients-venv/bin")
}

/// PATH with [`venv_bin`] first.
pub fn path_with_venv() -> OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(venv_bin()).chain(std::env::split_paths(&path));
    std::env::join_paths(dirs).expect("PATH with the venv's bin directory first")
}
