//! The `tenant-worker` binary: parse the command line, set up logging, run the command.

mod bench;
mod cli;
mod demo;

use clap::Parser as _;
use tenant_worker::telemetry;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    if matches!(args.command, cli::Command::Demo) {
        // The demo's report is on stdout; its logs would interleave with it.
        telemetry::init_with_default("warn");
    } else {
        telemetry::init();
    }
    match cli::run(args).await {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            // Print the cause chain, skipping causes whose text an outer message already
            // includes (some driver errors repeat their source in their own message).
            let mut message = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !message.contains(&text) {
                    if !message.is_empty() {
                        message.push_str(": ");
                    }
                    message.push_str(&text);
                }
            }
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
