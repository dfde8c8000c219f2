//! `pinguard pin`: discover the guests, plan the placement, validate it all,
//! then apply it thread by thread with read-back verification.
//!
//! Exit 0 when every thread is where the plan puts it (threads that exited
//! meanwhile are reported, not fatal); 1 when a KVM guest was found whose
//! vCPU threads cannot be told apart (named, not pinned). Exit 2 on bad input, with nothing
//! changed, or when applying fails: what was already changed is rolled back
//! and the message says what was and was not applied.
use std::{collections::BTreeMap, io::Write as _, process::ExitCode};

use anyhow::{Context as _, bail};

use crate::{
    cli::PinArgs,
    cmd::policy,
    exit,
    guests::{DiscoverOptions, Discoverer, Guest, Manager, Unidentified},
    host::affinity,
    host::cpulist::CpuSet,
    host::procfs::Proc,
    host::topology::Topology,
    placement::apply::{self, OnFailure, Status},
    placement::plan::{self, Entry, Role},
    placement::{
        libvirt::{self, Scope},
        place,
        sched::{self, VcpuSched},
    },
};

#[derive(Debug, serde::Serialize)]
struct Row {
    #[serde(flatten)]
    entry: Entry,
    status: Status,
}

/// A thread that exited between discovery and planning.
#[derive(Debug, serde::Serialize)]
struct Gone {
    vm: String,
    tid: u32,
    role: Role,
}

#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    dry_run: bool,
    guarded: &'a CpuSet,
    housekeeping: &'a CpuSet,
    guests: &'a [Guest],
    entries: Vec<Row>,
    shared_cpus: &'a CpuSet,
    warnings: &'a [String],
    /// Threads that exited before planning (those that exited while
    /// applying are entries with status "vanished").
    vanished: Vec<Gone>,
    libvirt: Libvirt,
    /// KVM guests whose vCPU threads could not be told apart: not pinned.
    unidentified: &'a [Unidentified],
    /// The scheduling policy given to the vCPU threads, if any.
    vcpu_sched: Option<VcpuSched>,
}

/// Gives every vCPU thread of the plan `sched`; on a refusal, puts back
/// the policies already changed and says what stays (the affinities).
fn set_vcpu_sched(plan: &plan::Plan, statuses: &[Status], sched: VcpuSched) -> anyhow::Result<()> {
    let proc = Proc::default();
    let mut changed: Vec<(u32, VcpuSched)> = Vec::new();
    for (e, st) in plan.entries.iter().zip(statuses) {
        if e.role != Role::Vcpu || *st == Status::Vanished {
            continue;
        }
        let Some(before) = proc.sched(e.pid, e.tid) else {
            continue; // exited
        };
        if sched.matches(&before) {
            continue;
        }
        match sched::set(e.tid, sched) {
            Ok(()) => {
                if let Some(was) = sched::current(&before) {
                    changed.push((e.tid, was));
                }
            }
            Err(sched::SchedError::Gone { .. }) => {}
            Err(err) => {
                for (tid, was) in changed.iter().rev() {
                    let _ = sched::set(*tid, *was);
                }
                bail!(
                    "guest {} vCPU {}: {err}\nthe vCPU policies set before were put back; \
                     the CPU placement stays applied",
                    e.vm,
                    e.vcpu.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// The libvirt domains among the guests: pinned through libvirt.
#[derive(Debug, Default, serde::Serialize)]
struct Libvirt {
    domains: Vec<String>,
    /// Whether the placement was also written into their persistent definitions.
    persistent: bool,
}

/// Writes the placement of every libvirt domain of the plan into its
/// persistent definition (`virsh vcpupin/emulatorpin --config`).
fn persist(plan: &plan::Plan) -> Result<(), libvirt::LibvirtError> {
    let mut emulators_done = Vec::new();
    for e in plan
        .entries
        .iter()
        .filter(|e| e.manager == Manager::Libvirt)
    {
        match e.vcpu {
            Some(i) => libvirt::vcpupin(&e.vm, i, &e.to, Scope::Config)?,
            None if !emulators_done.contains(&&e.vm) => {
                libvirt::emulatorpin(&e.vm, &e.to, Scope::Config)?;
                emulators_done.push(&e.vm);
            }
            None => {}
        }
    }
    Ok(())
}

pub fn run(args: PinArgs) -> anyhow::Result<ExitCode> {
    let topo = Topology::read()?;
    let config = policy::load(&args.policy)?;
    let guard = policy::guard(&topo, &args.guard, &config)?;

    let mut discoverer = Discoverer::new(Proc::default(), DiscoverOptions::from(&args.discover));
    let discovery = discoverer.scan()?;
    for w in &discovery.warnings {
        log::warn!("{w}");
    }
    if !discovery.errors.is_empty() {
        let msgs: Vec<String> = discovery.errors.iter().map(|e| e.to_string()).collect();
        bail!("{}\nnothing was changed", msgs.join("\n"));
    }

    let unidentified = discovery.unidentified;
    let vcpu_sched = args.vcpu_sched.or(config.vcpu_sched);
    let (guests, current, vanished) = read_affinities(discovery.guests)?;
    let plan = plan::plan(
        &topo,
        &guard,
        &guests,
        &current,
        &args.plan_options(config.plan_options()),
    )
    .map_err(|e| anyhow::anyhow!("{e}\nnothing was changed"))?;
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    let libvirt_domains: Vec<&str> = guests
        .iter()
        .filter(|g| g.manager == Manager::Libvirt)
        .map(|g| g.name.as_str())
        .collect();
    if args.persist {
        // Checked before anything changes: all or nothing.
        for d in &libvirt_domains {
            libvirt::require_persistent(d)
                .map_err(|e| anyhow::anyhow!("{e}\nnothing was changed"))?;
        }
    }

    let statuses = if args.dry_run {
        apply::planned(&plan)
    } else {
        let applied = apply::apply(&plan, &mut place::Live::new(), OnFailure::Rollback)?;
        for (e, s) in plan.entries.iter().zip(&applied.statuses) {
            if *s == Status::Vanished {
                log::info!("{} exited before it could be pinned", apply::describe(e));
            }
        }
        if let Some(sched) = vcpu_sched {
            set_vcpu_sched(&plan, &applied.statuses, sched)?;
        }
        if args.persist {
            persist(&plan).context(
                "the placement is applied to the running domains, but writing it into their \
                 persistent definitions failed",
            )?;
        }
        applied.statuses
    };

    let report = Report {
        dry_run: args.dry_run,
        guarded: &guard.guarded,
        housekeeping: &guard.housekeeping,
        guests: &guests,
        entries: plan
            .entries
            .iter()
            .cloned()
            .zip(statuses)
            .map(|(entry, status)| Row { entry, status })
            .collect(),
        shared_cpus: &plan.shared_cpus,
        warnings: &plan.warnings,
        vanished,
        libvirt: Libvirt {
            domains: libvirt_domains.iter().map(|d| d.to_string()).collect(),
            persistent: args.persist && !args.dry_run,
        },
        unidentified: &unidentified,
        vcpu_sched,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report).context("cannot write the JSON report")?;
        writeln!(out)?;
    } else {
        out.write_all(render(&report).as_bytes())?;
    }
    out.flush()?;
    // A guest left unpinned is not "all is well".
    Ok(ExitCode::from(if unidentified.is_empty() {
        exit::OK
    } else {
        exit::VIOLATIONS
    }))
}

type Affinities = BTreeMap<u32, CpuSet>;

/// Reads every thread's current affinity. Threads that exited are dropped
/// (and guests left without vCPUs); any other failure stops before
/// anything is changed.
fn read_affinities(guests: Vec<Guest>) -> anyhow::Result<(Vec<Guest>, Affinities, Vec<Gone>)> {
    let mut current = BTreeMap::new();
    let mut vanished = Vec::new();
    let mut out = Vec::new();
    for mut g in guests {
        let mut read = |tid: u32, role: Role| -> anyhow::Result<bool> {
            match affinity::get(tid) {
                Ok(cpus) => {
                    current.insert(tid, cpus);
                    Ok(true)
                }
                Err(e) if e.is_gone() => {
                    vanished.push(Gone {
                        vm: g.name.clone(),
                        tid,
                        role,
                    });
                    Ok(false)
                }
                Err(e) => Err(anyhow::anyhow!(
                    "guest {}: {e}\nnothing was changed",
                    g.name
                )),
            }
        };
        let mut vcpus = Vec::new();
        for v in &g.vcpus {
            if read(v.tid, Role::Vcpu)? {
                vcpus.push(*v);
            }
        }
        let mut emulator = Vec::new();
        for &tid in &g.emulator_tids {
            if read(tid, Role::Emulator)? {
                emulator.push(tid);
            }
        }
        if vcpus.is_empty() {
            // The guest exited while we looked.
            continue;
        }
        g.vcpus = vcpus;
        g.emulator_tids = emulator;
        out.push(g);
    }
    Ok((out, current, vanished))
}

fn unidentified(s: &mut String, guests: &[Unidentified]) {
    for u in guests {
        s.push_str(&format!(
            "NOT PINNED: guest {} (pid {}, {} vCPU(s)): its vCPU threads cannot be told apart \
             (no QMP socket, no libvirt status, no debug-threads=on, and its vCPUs are not all \
             running, e.g. paused); pass --qmp PATH or start QEMU with -name NAME,debug-threads=on.\n",
            u.name, u.pid, u.vcpus
        ));
    }
}

fn render(r: &Report) -> String {
    let mut s = String::new();
    if r.entries.is_empty() {
        if r.unidentified.is_empty() {
            s.push_str("No QEMU guests found.\n");
        }
        unidentified(&mut s, r.unidentified);
        return s;
    }
    // Column width: the longest cell, at least the header's width.
    let width = |cell: &dyn Fn(&crate::placement::plan::Entry) -> usize, min: usize| {
        r.entries
            .iter()
            .map(|e| cell(&e.entry))
            .max()
            .unwrap_or(min)
            .max(min)
    };
    let vm_w = width(&|e| e.vm.len(), 2);
    let from_w = width(&|e| e.from.to_string().len(), 4);
    let to_w = width(&|e| e.to.to_string().len(), 2);
    s.push_str(&format!(
        "{:<vm_w$}  {:<4}  {:<8}  {:<from_w$}    {:<to_w$}  STATUS\n",
        "VM", "VCPU", "TID", "FROM", "TO"
    ));
    for row in &r.entries {
        let e = &row.entry;
        let vcpu = e.vcpu.map_or_else(|| "emu".to_string(), |i| i.to_string());
        let mut status = match row.status {
            Status::Unchanged => "unchanged",
            Status::Planned => "would change",
            Status::Applied => "pinned",
            Status::Vanished => "exited",
            Status::Failed => "failed",
        }
        .to_string();
        if e.shared {
            status.push_str(", shared");
        }
        s.push_str(&format!(
            "{:<vm_w$}  {vcpu:<4}  {:<8}  {:<from_w$} -> {:<to_w$}  {status}\n",
            e.vm,
            e.tid,
            e.from.to_string(),
            e.to.to_string()
        ));
    }
    let count = |st: Status| r.entries.iter().filter(|e| e.status == st).count();
    s.push('\n');
    if r.dry_run {
        s.push_str(&format!(
            "Dry run: {} of {} thread(s) of {} guest(s) would change; nothing was changed.\n",
            count(Status::Planned),
            r.entries.len(),
            r.guests.len()
        ));
    } else {
        s.push_str(&format!(
            "Pinned {} guest(s) on guarded CPUs {}: {} thread(s) changed, {} already in place.\n",
            r.guests.len(),
            r.guarded,
            count(Status::Applied),
            count(Status::Unchanged)
        ));
    }
    let exited: Vec<String> = r
        .vanished
        .iter()
        .map(|g| g.tid)
        .chain(
            r.entries
                .iter()
                .filter(|e| e.status == Status::Vanished)
                .map(|e| e.entry.tid),
        )
        .map(|t| t.to_string())
        .collect();
    if !exited.is_empty() {
        s.push_str(&format!(
            "{} thread(s) exited before they could be pinned: {}\n",
            exited.len(),
            exited.join(", ")
        ));
    }
    if let Some(sched) = r.vcpu_sched {
        let verb = if r.dry_run { "would run" } else { "run" };
        s.push_str(&format!(
            "vCPU threads {verb} with scheduling policy {sched}.\n"
        ));
    }
    if !r.shared_cpus.is_empty() {
        s.push_str(&format!(
            "CPUs {} each run more than one vCPU (--allow-shared).\n",
            r.shared_cpus
        ));
    }
    unidentified(&mut s, r.unidentified);
    if !r.libvirt.domains.is_empty() {
        let names = r.libvirt.domains.join(", ");
        let verb = if r.dry_run { "would be" } else { "were" };
        if r.libvirt.persistent {
            s.push_str(&format!(
                "libvirt domains {names} {verb} pinned through libvirt, live and in their \
                 persistent definitions (virsh vcpupin/emulatorpin show it; a restart keeps it).\n"
            ));
        } else {
            s.push_str(&format!(
                "libvirt domains {names} {verb} pinned through libvirt (virsh vcpupin/emulatorpin \
                 show it), live only: a restart of the domain loses it; pass --persist to write \
                 it into the domain definition.\n"
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vm: &str, vcpu: Option<u32>, tid: u32, from: &str, to: &str) -> Entry {
        let from = CpuSet::parse(from).unwrap();
        let to = CpuSet::parse(to).unwrap();
        Entry {
            vm: vm.into(),
            pid: 1,
            vcpu,
            tid,
            role: if vcpu.is_some() {
                Role::Vcpu
            } else {
                Role::Emulator
            },
            change: from != to,
            from,
            to,
            shared: false,
            manager: Default::default(),
        }
    }

    #[test]
    fn renders_table_and_summary() {
        let guarded = CpuSet::single(1);
        let hk = CpuSet::single(0);
        let report = Report {
            dry_run: false,
            guarded: &guarded,
            housekeeping: &hk,
            guests: &[],
            entries: vec![
                Row {
                    entry: entry("g1", Some(0), 4242, "0-1", "1"),
                    status: Status::Applied,
                },
                Row {
                    entry: entry("g1", None, 4240, "0", "0"),
                    status: Status::Unchanged,
                },
                Row {
                    entry: entry("g1", None, 4241, "0-1", "0"),
                    status: Status::Vanished,
                },
            ],
            shared_cpus: &CpuSet::new(),
            warnings: &[],
            vanished: vec![],
            libvirt: Libvirt::default(),
            unidentified: &[],
            vcpu_sched: None,
        };
        let s = render(&report);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "VM  VCPU  TID       FROM    TO  STATUS");
        assert_eq!(lines[1], "g1  0     4242      0-1  -> 1   pinned");
        assert_eq!(lines[2], "g1  emu   4240      0    -> 0   unchanged");
        assert!(s.contains("1 thread(s) changed, 1 already in place"), "{s}");
        assert!(
            s.contains("exited before they could be pinned: 4241"),
            "{s}"
        );

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["entries"][0]["status"], "applied");
        assert_eq!(json["entries"][0]["change"], true);
        assert_eq!(json["entries"][1]["vcpu"], serde_json::Value::Null);
        assert_eq!(json["guarded"], "1");
    }
}
