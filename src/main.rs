//! The `tenant-worker` binary: parse the command line, set up logging, run the command.

use clap::Parser as _;
use tenant_worker::{cli, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    telemetry::init();
    let args = cli::Cli::parse();
    match cli::run(args).await {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
