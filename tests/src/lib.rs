//! Shared helpers for pinguard's integration tests: they run the real binary
//! against the real kernel, real threads and real QEMU/KVM guests.
//!
//! Every helper that starts something returns a guard whose `Drop` stops it,
//! so a failing assertion leaves no process, VM or BPF link behind.
pub mod daemon;
pub mod guest;
pub mod process;
pub mod prometheus;
pub mod threads;
pub mod util;
