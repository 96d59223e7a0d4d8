use clap::Parser;
use jobsvc::app::config::{Cli, Command, ServeArgs};

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
