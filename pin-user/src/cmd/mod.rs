//! Subcommands: the binary edge. Each returns the process exit code.
pub mod audit;
pub mod check;
pub mod pin;
pub mod run;
pub mod watch;
