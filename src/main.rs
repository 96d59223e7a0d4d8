use clap::Parser;
use jobsvc::app::config::{Cli, Command, ServeArgs};

/// jemalloc rather than glibc's malloc: a call makes about ninety allocations, many freed on
/// another thread than the one that made them, and glibc's malloc was 14% of the server's
/// CPU under GetJob load. With jemalloc the server's CPU per call fell by 7-15% (a user's
/// GetJob, ListJobs, GetJob), and an idle stream costs about as much memory as before
/// (mimalloc saved about as much CPU but more than doubled that). The bench's binary, which
/// is also the server it measures, uses the same.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Token(args)) => jobsvc::app::print_token(args),
        Some(Command::ApiKey(command)) => jobsvc::app::api_key(command),
        Some(Command::Export(args)) => jobsvc::app::export(args).await,
        Some(Command::Import(args)) => jobsvc::app::import(args).await,
        Some(Command::Serve(args)) => jobsvc::app::serve(*args).await,
        None => match ServeArgs::from_env() {
            Ok(args) => jobsvc::app::serve(args).await,
            Err(e) => e.exit(),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobsvc: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
