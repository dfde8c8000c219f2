//! The harness shared by pinguard's integration tests (`tests/`) and its
//! benchmarks (`cargo xtask bench`): they run the real binary against the
//! real kernel, real threads, real QEMU/KVM guests and a real Prometheus.
//!
//! Everything that starts something returns a guard whose `Drop` stops it,
//! so a failing assertion or an error leaves no process, VM or BPF link
//! behind, and a stopped daemon leaves no thread's affinity changed.
//!
//! Two faces: tests call the panicking functions (the panic says what was
//! expected and what was seen); the benchmark calls their `try_` twins,
//! which return [`Error`], and stops every wait early after
//! [`wait::interrupt`] (its Ctrl-C).
pub mod cpus;
pub mod daemon;
pub mod env;
mod error;
pub mod guest;
pub mod host;
pub mod http;
pub mod lab;
pub mod libvirt;
pub mod metrics;
pub mod process;
pub mod prometheus;
pub mod threads;
pub mod wait;

pub use error::{Error, Result};
pub use which::which;
