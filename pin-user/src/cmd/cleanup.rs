//! `pinguard cleanup`: detaches and removes what pinguard pinned in bpffs
//! (a daemon killed with SIGKILL, or stopped with `keep_sensors_on_exit`).
//! Exit 0 when nothing pinguard pinned is left, 2 when that could not be done.
use std::{io::Write as _, path::Path, process::ExitCode};

use anyhow::Context as _;

use crate::{
    bpf::pinning::{self, Kind},
    cli::CleanupArgs,
    daemon::runlock::{RUN_LOCK, RunLock},
    exit,
};

pub fn run(args: CleanupArgs) -> anyhow::Result<ExitCode> {
    // Held while removing: a daemon starting now would adopt what we remove.
    let _lock = RunLock::acquire(Path::new(RUN_LOCK)).context(
        "pinguard cleanup removes the running daemon's programs only once it is stopped",
    )?;
    let root = Path::new(pinning::ROOT);
    let removed = pinning::remove_all(root)
        .with_context(|| format!("removing what pinguard pinned in {}", root.display()))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "removed": removed }))
            .context("cannot write the JSON report")?;
        writeln!(out)?;
    } else if removed.is_empty() {
        writeln!(out, "nothing pinned under {}", root.display())?;
    } else {
        for r in &removed {
            let what = match (r.kind, r.id) {
                (Kind::Link, Some(id)) => format!("link of program {id} (detached)"),
                (Kind::Link, None) => "link (detached)".into(),
                (Kind::Program, Some(id)) => format!("program {id}"),
                (Kind::Map, Some(id)) => format!("map {id}"),
                (kind, _) => format!("{kind:?}").to_lowercase(),
            };
            writeln!(out, "removed {what}: {}", r.path.display())?;
        }
    }
    out.flush()?;
    Ok(ExitCode::from(exit::OK))
}
