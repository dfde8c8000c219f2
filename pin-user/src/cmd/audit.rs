//! `pinguard audit`: report what runs on the guarded CPUs, as a snapshot of
//! /proc or observed with the eBPF observer over `--window`.
//!
//! Ownership (which vCPU owns which guarded CPU) is what `pinguard pin` would
//! plan now: discovery, then placement with the current affinities (existing
//! valid pins are kept). Nothing is changed. Exit 0 clean, 1 violations,
//! 2 could not audit.
use std::{
    collections::BTreeMap,
    io::Write as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    audit::{self, EventTally, MapSnapshot, Observation, Ownership, Report},
    bpf::{
        events::{DecodeError, KernelEvent},
        probe::{self, EventReader, Probe, ProbeConfig},
    },
    cli::AuditArgs,
    cmd::{move_self_to, policy, runtime, wait_for_stop},
    host::procfs::{Proc, Sched},
    host::topology::{Guard, Topology},
};

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let topo = Topology::read()?;
    let config = policy::load(&args.policy)?;
    let guard = policy::guard(&topo, &args.guard, &config)?;
    if args.window == Some(Duration::ZERO) {
        bail!("--window 0: give a duration to observe, e.g. --window 5s");
    }
    // The audit itself should not disturb the CPUs it audits.
    move_self_to(&guard.housekeeping)?;
    let proc = Proc::default();
    let now = policy::plan_now(
        &topo,
        &guard,
        &proc,
        &args.discover,
        &config.plan_options(),
        "audit",
    )?;
    let mut own = Ownership::from_plan(&now.plan);
    for u in &now.unidentified {
        own.add_unidentified(u.pid, &u.name);
    }
    let threads = now.threads;
    let mut report = match args.window {
        None => audit::snapshot(&guard, &threads, &own, std::process::id()),
        Some(window) => observe(&guard, &own, &proc, window)?,
    };
    // A snapshot has every thread's class from its listing: reading each
    // listed thread's stat again cost a third of an audit of a big host.
    let listed: std::collections::HashMap<(u32, u32), Sched> = match args.window {
        None => threads
            .iter()
            .filter_map(|t| Some(((t.tgid, t.tid), t.sched?)))
            .collect(),
        Some(_) => Default::default(),
    };
    report.fill_sched(|pid, tid| {
        listed
            .get(&(pid, tid))
            .copied()
            .or_else(|| proc.sched(pid, tid))
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report).context("cannot write the JSON report")?;
        writeln!(out)?;
    } else {
        out.write_all(audit::render(&report).as_bytes())?;
    }
    out.flush()?;
    Ok(ExitCode::from(report.exit_code()))
}

fn read_maps(probe: &Probe) -> anyhow::Result<MapSnapshot> {
    Ok(MapSnapshot {
        cpu_stats: probe.cpu_stats()?,
        threads: probe.threads()?,
        counters: probe.counters()?,
    })
}

/// Loads the observer, watches for `window` (or until Ctrl-C) and judges what it saw.
fn observe(
    guard: &Guard,
    own: &Ownership,
    proc: &Proc,
    window: Duration,
) -> anyhow::Result<Report> {
    let mut config = ProbeConfig::new(guard.guarded.clone());
    // Who changed a vCPU's affinity is a bonus; without tracefs audit still works.
    config.affinity = probe::tracefs_mounted();
    runtime()?.block_on(async {
        let mut probe =
            Probe::load(&config).context("cannot load the eBPF observer needed for --window")?;
        // Only now: without privileges tracefs looks absent too, and that is not the news.
        if !config.affinity {
            log::warn!(
                "tracefs is not mounted at /sys/kernel/tracing: changes of vCPU affinity will not be attributed"
            );
        }
        for o in own.vcpus() {
            probe.set_owner(o.tid, o.cpu)?;
        }
        let mut events = probe
            .take_events()?
            .into_async()
            .context("polling the event ring buffer")?;
        // The window starts now that owners are known: what came before is
        // left out of the events and subtracted from the maps.
        events.get_mut().drain(|_| {});
        let before = read_maps(&probe)?;
        let start = Instant::now();
        eprintln!(
            "pinguard: auditing CPUs {} for {window:?} (housekeeping {}); Ctrl-C stops early",
            guard.guarded, guard.housekeeping
        );
        let mut tally = EventTally::default();
        let mut decode_errors = 0u64;
        let mut add = |r: Result<KernelEvent, DecodeError>| match r {
            Ok(ev) => tally.add(&ev),
            Err(e) => {
                decode_errors += 1;
                log::debug!("undecodable event: {e}");
            }
        };
        let deadline = tokio::time::sleep(window);
        tokio::pin!(deadline);
        let stop = wait_for_stop();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                r = EventReader::next_batch(&mut events, &mut add) => r.context("reading events")?,
                _ = &mut deadline => break,
                r = &mut stop => {
                    r?;
                    log::warn!("stopped early: reporting {:?} of observation", start.elapsed());
                    break;
                }
            }
        }
        events.get_mut().drain(&mut add);
        let after = read_maps(&probe)?;
        let elapsed = start.elapsed();
        drop(events);
        drop(probe);
        tally.decode_errors = decode_errors;
        let obs = Observation {
            elapsed,
            maps: after.since(&before),
            events: tally,
        };
        // Affinities of the threads still alive; those that exited are reported from the maps.
        let mut live = BTreeMap::new();
        let wanted = obs
            .maps
            .threads
            .iter()
            .map(|(k, t)| (t.tgid, k.tid))
            .chain(own.vcpus().map(|o| (o.pid, o.tid)));
        for (tgid, tid) in wanted {
            if let Some(t) = proc.thread(tgid, tid)? {
                live.insert(tid, t);
            }
        }
        Ok(audit::window(guard, own, &obs, &live))
    })
}
