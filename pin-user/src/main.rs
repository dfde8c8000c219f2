//! pinguard: keeps the dedicated CPUs of virtual machines dedicated.
//!
//! A binary crate on purpose: nothing else links these modules, so the
//! compiler reports every item no command uses. Features live in folders
//! (`guests`, `placement`, `audit`, `check`, `daemon`, `latency`), facts about
//! the host they share in `host`, the kernel side in `bpf`; `cmd` is the edge
//! where clap arguments (`cli`) become domain types and errors become
//! messages and exit codes. (lib.rs exists only for the fuzz targets.)
use std::process::ExitCode;

use clap::Parser as _;

// The module tree, shared with the fuzzing-only library (lib.rs).
include!("modules.rs");
#[cfg(test)]
mod fuzzing;
#[cfg(test)]
mod robustness;

use cli::{Cli, Command};

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
        Command::Lab(args) => cmd::lab::run(args),
        Command::Top(args) => cmd::top::run(args),
        Command::Cleanup(args) => cmd::cleanup::run(args),
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
