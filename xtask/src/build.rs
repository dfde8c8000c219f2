//! `cargo xtask build`: setup, then the release build. pin-user's build.rs
//! builds the eBPF object (nightly + bpf-linker) through aya-build and embeds it.
use anyhow::Result;

use crate::{setup, util};

pub fn run() -> Result<()> {
    setup::run()?;
    release_build()
}

/// `cargo build --release` alone, for callers that already ran setup.
pub fn release_build() -> Result<()> {
    util::run("build", util::cargo().args(["build", "--release"]))
}
