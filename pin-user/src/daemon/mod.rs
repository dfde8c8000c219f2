//! The isolation daemon (`pinguard run`).
//!
//! - `state`: its decisions (inventory, ownership, violations, enforcement),
//!   driven by events and ticks, acting through
//! - `effects`: the probe's maps, affinities, /proc, discovery, the clock;
//! - `violation`: the kinds and records of what it reports;
//! - `metrics`: the series it owns; `collector`: the kernel's, read at scrape;
//! - `http` and `health`: the endpoint, on its own thread;
//! - `runlock`: one daemon per host;
//! - `socket`: the control socket's server (`pinguard latency` registers
//!   its measuring threads there).
pub mod collector;
pub mod effects;
pub mod health;
pub mod http;
pub mod metrics;
pub mod runlock;
pub mod socket;
pub mod state;
pub mod violation;
