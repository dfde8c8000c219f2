//! Hidden `pinguard attach`: one program attached until a signal, for benchmarks.
use std::{io::Write as _, process::ExitCode};

use anyhow::bail;

use crate::{
    bpf::probe::{PROGRAMS, Probe, ProbeConfig},
    cli::AttachArgs,
    cmd::{check_owners, move_self_to, runtime, wait_for_stop},
    exit,
    host::topology::Topology,
};

pub fn run(args: AttachArgs) -> anyhow::Result<ExitCode> {
    let guard = Topology::read()?.guard(args.guard.guard.as_ref())?;
    let mut programs = Vec::new();
    for name in &args.programs {
        match PROGRAMS.iter().find(|p| **p == name.as_str()) {
            Some(p) => programs.push(*p),
            None => bail!(
                "--program {name:?}: unknown program; expected one of {}",
                PROGRAMS.join(", ")
            ),
        }
    }
    check_owners(&guard.guarded, &args.owners)?;
    move_self_to(&guard.housekeeping)?;
    runtime()?.block_on(async {
        let mut probe = Probe::load_only(&ProbeConfig::new(guard.guarded.clone()), &programs)?;
        // Before "attached": the caller measures from that line on.
        for &(cpu, tid) in &args.owners {
            probe.set_owner(tid, cpu)?;
            if args.watch_owners {
                probe.set_watched(tid, pin_common::watch::VCPU)?;
            }
        }
        let mut out = std::io::stdout().lock();
        for name in probe.attached() {
            writeln!(out, "attached {name}")?;
        }
        out.flush()?;
        drop(out);
        wait_for_stop().await?;
        drop(probe);
        Ok(ExitCode::from(exit::OK))
    })
}
