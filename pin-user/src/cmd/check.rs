//! `pinguard check`: is this host configured to keep the guarded CPUs quiet?
//! Exit 0 when nothing fails (warnings allowed), 1 on any failed item, 2 when
//! the check cannot run (bad --guard, unreadable topology).
use std::{io::Write as _, process::ExitCode};

use anyhow::Context as _;

use crate::{
    check,
    cli::CheckArgs,
    config::{Config, Overrides},
    host::Host,
};

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let host = Host::default();
    let mut report = check::check(&host, args.guard.guard.as_ref())?;
    // The daemon's file (--config, else the default path if present).
    let config = Config::load(&Overrides::from(&args.policy))?;
    report.push(check::culprit_naming(&host, config.affinity_syscalls));
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report).context("cannot write the JSON report")?;
        writeln!(out)?;
    } else {
        out.write_all(check::render::table(&report, terminal_width()).as_bytes())?;
    }
    out.flush()?;
    Ok(ExitCode::from(report.exit_code()))
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(110)
        .max(70)
}
