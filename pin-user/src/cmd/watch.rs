//! `pinguard watch`: attach the observer and stream what runs on guarded CPUs.
use crate::units::fmt_ns;
use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use pin_common::class;

use crate::{
    bpf::probe::{DecodedEvent, EventReader, Probe, ProbeConfig, comm_str},
    cli::WatchArgs,
    cmd::{check_owners, move_self_to, runtime, wait_for_stop},
    exit,
    host::topology::Topology,
};

pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let guard = Topology::read()?.guard(args.guard.guard.as_ref())?;
    check_owners(&guard.guarded, &args.owners)?;
    move_self_to(&guard.housekeeping)?;
    let mut config = ProbeConfig::new(guard.guarded.clone());
    config.hook = args.hook;
    config.event_interval = args.event_interval;
    runtime()?.block_on(async move {
        let mut probe = Probe::load(&config)?;
        for &(cpu, tid) in &args.owners {
            probe.set_owner(tid, cpu)?;
        }
        let mut events = probe.take_events()?.into_async().context("polling the event ring buffer")?;
        eprintln!(
            "pinguard: watching CPUs {} (housekeeping {}); {}",
            guard.guarded,
            guard.housekeeping,
            match args.duration {
                Some(d) => format!("for {d:?}"),
                None => "Ctrl-C to stop".into(),
            }
        );
        let deadline = tokio::time::sleep(args.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
        tokio::pin!(deadline);
        let stop = wait_for_stop();
        tokio::pin!(stop);
        let mut decode_errors = 0u64;
        let mut print = |r: Result<DecodedEvent, _>| match r {
            Ok(ev) => print_event(&ev, args.json),
            Err(e) => {
                decode_errors += 1;
                log::warn!("undecodable event: {e}");
            }
        };
        loop {
            tokio::select! {
                r = EventReader::next_batch(&mut events, &mut print) => r.context("reading events")?,
                _ = &mut deadline => break,
                r = &mut stop => { r?; break }
            }
        }
        // Events already in the buffer still belong to the window.
        events.get_mut().drain(&mut print);
        print_summary(&probe, args.top, args.json, decode_errors)?;
        Ok(ExitCode::from(exit::OK))
    })
}

fn print_event(ev: &DecodedEvent, json: bool) {
    let mut out = io::stdout().lock();
    let _ = if json {
        writeln!(out, "{}", serde_json::to_string(ev).unwrap_or_default())
    } else {
        let extra = match ev.event {
            "intrusion" => format!(
                "class={} run={} total={} slices={}",
                ev.class,
                fmt_ns(ev.run_ns),
                fmt_ns(ev.total_ns),
                ev.slices
            ),
            "migrate_in" => format!("from_cpu={}", ev.other_cpu.unwrap_or_default()),
            "owner_away" => format!("to_cpu={}", ev.other_cpu.unwrap_or_default()),
            "affinity_change" => format!(
                "vcpu_tid={} new_affinity={}",
                ev.target_tid.unwrap_or_default(),
                ev.mask.as_deref().unwrap_or("")
            ),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<16} cpu={} tid={} tgid={} comm={:?} {}",
            ev.event, ev.cpu, ev.tid, ev.tgid, ev.comm, extra
        )
    };
    let _ = out.flush();
}

#[derive(Debug, serde::Serialize)]
struct CpuSummary {
    cpu: u32,
    /// Nanoseconds by class (idle, vcpu, kernel, allowed, intruder_user, intruder_kthread).
    run_ns: BTreeMap<&'static str, u64>,
    slices: BTreeMap<&'static str, u64>,
    owner_ns: u64,
    allowed_ns: u64,
    other_ns: u64,
    top_intruders: Vec<Intruder>,
}

#[derive(Debug, serde::Serialize)]
struct Intruder {
    tid: u32,
    tgid: u32,
    comm: String,
    class: &'static str,
    run_ns: u64,
    slices: u64,
    max_slice_ns: u64,
}

fn print_summary(probe: &Probe, top: usize, json: bool, decode_errors: u64) -> anyhow::Result<()> {
    let stats = probe.cpu_stats()?;
    let threads = probe.threads()?;
    let counters = probe.counters()?;
    let mut cpus = Vec::new();
    for (cpu, s) in &stats {
        let by = |c: u32| s.run_ns[c as usize];
        let mut intruders: Vec<Intruder> = threads
            .iter()
            .filter(|(k, _)| k.cpu == *cpu)
            .map(|(k, t)| Intruder {
                tid: k.tid,
                tgid: t.tgid,
                comm: comm_str(&t.comm),
                class: class::name(t.class),
                run_ns: t.run_ns,
                slices: t.slices,
                max_slice_ns: t.max_slice_ns,
            })
            .collect();
        intruders.sort_by_key(|i| std::cmp::Reverse(i.run_ns));
        intruders.truncate(top);
        cpus.push(CpuSummary {
            cpu: *cpu,
            run_ns: (0..class::COUNT as u32)
                .map(|c| (class::name(c), by(c)))
                .collect(),
            slices: (0..class::COUNT as u32)
                .map(|c| (class::name(c), s.slices[c as usize]))
                .collect(),
            owner_ns: by(class::VCPU),
            allowed_ns: by(class::KERNEL) + by(class::ALLOWED),
            other_ns: by(class::INTRUDER_USER) + by(class::INTRUDER_KTHREAD),
            top_intruders: intruders,
        });
    }
    let mut out = io::stdout().lock();
    if json {
        let summary = serde_json::json!({
            "event": "summary",
            "cpus": cpus,
            "events_lost": counters.events_lost,
            "thread_map_full": counters.thread_map_full,
            "read_errors": counters.read_errors,
            "decode_errors": decode_errors,
        });
        writeln!(out, "{summary}")?;
    } else {
        writeln!(out, "\nsummary (since attach):")?;
        for c in &cpus {
            writeln!(
                out,
                "cpu {}: owner {}  allowed {}  other {}  idle {}",
                c.cpu,
                fmt_ns(c.owner_ns),
                fmt_ns(c.allowed_ns),
                fmt_ns(c.other_ns),
                fmt_ns(c.run_ns.get("idle").copied().unwrap_or_default())
            )?;
            for i in &c.top_intruders {
                writeln!(
                    out,
                    "    {:>8} {:<16} tid={} tgid={} slices={} longest={} ({})",
                    fmt_ns(i.run_ns),
                    i.comm,
                    i.tid,
                    i.tgid,
                    i.slices,
                    fmt_ns(i.max_slice_ns),
                    i.class
                )?;
            }
        }
        if counters.events_lost + counters.thread_map_full + decode_errors > 0 {
            writeln!(
                out,
                "lost events: {}, threads not tracked (map full): {}, undecodable: {}",
                counters.events_lost, counters.thread_map_full, decode_errors
            )?;
        }
    }
    Ok(())
}
