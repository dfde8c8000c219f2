//! pinguard: keeps the dedicated CPUs of virtual machines dedicated.
//!
//! Library modules own one concern each and return typed errors; `cmd::*`
//! are the subcommands (the binary edge, where errors become messages and
//! exit codes).
pub mod affinity;
pub mod audit;
pub mod btf;
pub mod check;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod cpulist;
pub mod daemon;
pub mod discover;
pub mod enforce;
pub mod latency;
pub mod metrics;
pub mod plan;
pub mod probe;
pub mod procfs;
pub mod topology;
pub mod units;

/// Process exit codes shared by every subcommand.
pub mod exit {
    /// Everything is as it should be.
    pub const OK: u8 = 0;
    /// The command ran and found violations (audit) or failed checks (check).
    pub const VIOLATIONS: u8 = 1;
    /// The command could not do its job (bad input, missing privileges, ...).
    pub const ERROR: u8 = 2;
}
