// pinguard's module tree. Included by main.rs (the binary, where the compiler
// reports every item no command uses) and by lib.rs (a library only under
// `cargo fuzz`, so that the fuzz targets can link the parsers).
mod audit;
mod bpf;
mod check;
mod cli;
mod cmd;
mod config;
mod control;
mod daemon;
mod guests;
mod host;
mod isolate;
mod latency;
mod placement;
mod top;
mod units;

/// Process exit codes shared by every subcommand.
mod exit {
    /// Everything is as it should be.
    pub const OK: u8 = 0;
    /// The command ran and found violations (audit) or failed checks (check).
    pub const VIOLATIONS: u8 = 1;
    /// The command could not do its job (bad input, missing privileges, ...).
    pub const ERROR: u8 = 2;
}
