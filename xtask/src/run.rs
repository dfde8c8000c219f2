//! `cargo xtask run -- ARGS`: build, then become target/release/pinguard ARGS.
use std::{ffi::OsString, os::unix::process::CommandExt as _, process::ExitCode};

use anyhow::{Result, bail};

use crate::{build, util};

pub fn run(args: &[OsString]) -> Result<ExitCode> {
    build::run()?;
    let bin = util::pinguard_bin()?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(args);
    eprintln!("run: exec {}", util::show(&cmd));
    // exec: the daemon gets our stdio and signals, and its exit code is ours.
    let err = cmd.exec();
    bail!("could not exec {}: {err}", bin.display())
}
