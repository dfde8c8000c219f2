//! `pinguard audit`: report what runs on the guarded CPUs, as a snapshot of
//! /proc or observed with the eBPF observer over `--window`.
//!
//! Ownership (which vCPU owns which guarded CPU) is what `pinguard pin` would
//! plan now: discovery, then placement with the current affinities (existing
//! valid pins are kept). Nothing is changed. Exit 0 clean, 1 violations,
//! 2 could not audit.
use std::{
    collections::{BTreeMap, HashMap},
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
    cli::{AuditArgs, DiscoverArgs},
    cmd::{move_self_to, runtime, wait_for_stop},
    guests::{DiscoverOptions, Discoverer},
    host::cpulist::CpuSet,
    host::procfs::{Proc, ThreadInfo},
    host::topology::{Guard, Topology},
    placement::plan::{self, PlanOptions},
};

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let topo = Topology::read()?;
    let guard = topo.guard(args.guard.guard.as_ref())?;
    if args.window == Some(Duration::ZERO) {
        bail!("--window 0: give a duration to observe, e.g. --window 5s");
    }
    // The audit itself should not disturb the CPUs it audits.
    move_self_to(&guard.housekeeping)?;
    let proc = Proc::default();
    let (own, threads) = ownership(&topo, &guard, &proc, &args.discover)?;
    let report = match args.window {
        None => audit::snapshot(&guard, &threads, &own, std::process::id()),
        Some(window) => observe(&guard, &own, &proc, window)?,
    };
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

/// Discovers the guests and plans their placement as `pin` would, and reads
/// every thread on the host (the snapshot the ownership is judged against).
fn ownership(
    topo: &Topology,
    guard: &Guard,
    proc: &Proc,
    args: &DiscoverArgs,
) -> anyhow::Result<(Ownership, Vec<ThreadInfo>)> {
    let mut discoverer = Discoverer::new(proc.clone(), DiscoverOptions::from(args));
    let discovery = discoverer.scan()?;
    for w in &discovery.warnings {
        log::warn!("{w}");
    }
    if !discovery.errors.is_empty() {
        let msgs: Vec<String> = discovery.errors.iter().map(|e| e.to_string()).collect();
        bail!(
            "{}\ncould not audit: without that guest's vCPU map its threads cannot be told from intruders",
            msgs.join("\n")
        );
    }
    // Listed after discovery, so every vCPU still running is in the listing.
    let threads = proc
        .all_threads()
        .with_context(|| format!("cannot list threads in {}", proc.root().display()))?;
    let by_tid: HashMap<u32, &ThreadInfo> = threads.iter().map(|t| (t.tid, t)).collect();
    let mut current: BTreeMap<u32, CpuSet> = BTreeMap::new();
    let mut guests = Vec::new();
    for mut g in discovery.guests {
        // Threads that exited since discovery cannot own anything.
        g.vcpus
            .retain(|v| by_tid.get(&v.tid).is_some_and(|t| t.tgid == g.pid));
        g.emulator_tids.retain(|t| by_tid.contains_key(t));
        if g.vcpus.is_empty() {
            continue;
        }
        for tid in g.tids() {
            current.insert(tid, by_tid[&tid].allowed.clone());
        }
        guests.push(g);
    }
    // Sharing is allowed so that a host with more vCPUs than guarded CPUs can
    // still be audited; the report warns about shared CPUs.
    let opts = PlanOptions {
        allow_shared: true,
        ..PlanOptions::default()
    };
    let plan = plan::plan(topo, guard, &guests, &current, &opts)
        .context("cannot work out which vCPU owns which guarded CPU")?;
    Ok((Ownership::from_plan(&plan), threads))
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
