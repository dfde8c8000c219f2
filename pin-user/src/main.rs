use std::process::ExitCode;

use clap::Parser as _;
use pinguard::{
    cli::{Cli, Command},
    cmd, exit,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone()))
        .format_timestamp_millis()
        .init();
    let result = match cli.command {
        Command::Watch(args) => cmd::watch::run(args),
        Command::Pin(args) => cmd::pin::run(args),
        Command::Audit(args) => cmd::audit::run(args),
        Command::Check(args) => cmd::check::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Latency(args) => cmd::latency::run(args),
        Command::Attach(args) => cmd::attach::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pinguard: error: {err:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
