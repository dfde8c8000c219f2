//! pinguard: keeps the dedicated CPUs of virtual machines dedicated.
//!
//! A binary crate on purpose: nothing else links these modules, so the
//! compiler reports every item no command uses. Features live in folders
//! (`guests`, `placement`, `audit`, `check`, `daemon`, `latency`), facts about
//! the host they share in `host`, the kernel side in `bpf`; `cmd` is the edge
//! where clap arguments (`cli`) become domain types and errors become
//! messages and exit codes.
use std::process::ExitCode;

use clap::Parser as _;

mod audit;
mod bpf;
mod check;
mod cli;
mod cmd;
mod config;
mod daemon;
mod guests;
mod host;
mod isolate;
mod latency;
mod placement;
#[cfg(test)]
mod robustness;
mod top;
mod units;

use cli::{Cli, Command};

/// Process exit codes shared by every subcommand.
mod exit {
    /// Everything is as it should be.
    pub const OK: u8 = 0;
    /// The command ran and found violations (audit) or failed checks (check).
    pub const VIOLATIONS: u8 = 1;
    /// The command could not do its job (bad input, missing privileges, ...).
    pub const ERROR: u8 = 2;
}

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
        Command::Isolate(args) => cmd::isolate::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Latency(args) => cmd::latency::run(args),
        Command::Top(args) => cmd::top::run(args),
        Command::Attach(args) => cmd::attach::run(args),
        Command::Completions(args) => cmd::completions::run(args),
        Command::Manpages(args) => cmd::manpages::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pinguard: error: {err:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
