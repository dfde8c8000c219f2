//! The window view: what the eBPF observer saw on the guarded CPUs during a time window.
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use pin_common::{CpuStats, ThreadKey, ThreadStats, class};

use super::{
    Class, ClassTime, CpuReport, Finding, Migration, Mode, Ownership, Report, Status, ThreadRow,
    VcpuOff, VcpuOwner, Violation, finish, shared_warnings, vcpu_fields,
};
use crate::{
    bpf::{
        class::ThreadClass,
        events::KernelEvent,
        probe::{Counters, comm_str},
    },
    host::{cpulist::CpuSet, procfs::ThreadInfo, topology::Guard},
    units::fmt_ns,
};

/// Window time not yet attributed to a class when the window closed.
pub const UNATTRIBUTED: &str = "unattributed";

/// How many affinity changes a window report lists one by one.
const MAX_AFFINITY_CHANGES: usize = 100;

/// Window: someone called sched_setaffinity on a vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AffinityChange {
    /// The vCPU thread.
    target: u32,
    /// The caller.
    tid: u32,
    pid: u32,
    comm: String,
    /// The new affinity.
    mask: String,
}

/// Window: events aggregated as they arrive, so memory stays bounded by the
/// number of distinct threads however long the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventTally {
    /// (cpu, tid) -> migrations onto that guarded CPU.
    migrations: BTreeMap<(u32, u32), Migration>,
    /// tid -> guarded CPUs it was reported intruding on (rate-limited events).
    intrusions: BTreeMap<u32, (u32, String, CpuSet)>,
    /// owner tid -> (moves, destinations).
    away: BTreeMap<u32, (u64, CpuSet)>,
    /// sched_setaffinity calls on vCPU threads, in order (the first few).
    affinity: Vec<AffinityChange>,
    affinity_dropped: u64,
    pub decode_errors: u64,
}

impl EventTally {
    pub fn add(&mut self, ev: &KernelEvent) {
        match ev {
            KernelEvent::MigrateIn(mig) => {
                let t = &mig.thread;
                let m = self
                    .migrations
                    .entry((mig.to_cpu, t.tid))
                    .or_insert_with(|| Migration {
                        tid: t.tid,
                        pid: t.tgid,
                        comm: t.comm.clone(),
                        count: 0,
                        from_cpus: CpuSet::new(),
                    });
                m.count += 1;
                m.from_cpus.insert(mig.from_cpu);
            }
            KernelEvent::Intrusion(i) => {
                let t = &i.thread;
                self.intrusions
                    .entry(t.tid)
                    .or_insert_with(|| (t.tgid, t.comm.clone(), CpuSet::new()))
                    .2
                    .insert(i.cpu);
            }
            KernelEvent::OwnerAway(mig) => {
                let a = self.away.entry(mig.thread.tid).or_default();
                a.0 += 1;
                a.1.insert(mig.to_cpu);
            }
            // Bounded: a loop re-pinning a vCPU should not grow memory.
            KernelEvent::AffinityChange(c) if self.affinity.len() < MAX_AFFINITY_CHANGES => {
                self.affinity.push(AffinityChange {
                    target: c.target_tid,
                    tid: c.caller.tid,
                    pid: c.caller.tgid,
                    comm: c.caller.comm.clone(),
                    mask: c.mask.to_string(),
                });
            }
            KernelEvent::AffinityChange(_) => self.affinity_dropped += 1,
            // Guest lifecycle and latency-probe events say nothing about isolation.
            KernelEvent::Exec(_)
            | KernelEvent::Exit(_)
            | KernelEvent::Episode(_)
            | KernelEvent::Irq(_)
            | KernelEvent::Softirq(_) => {}
        }
    }
}

/// The observer's maps at one moment.
#[derive(Debug, Clone, Default)]
pub struct MapSnapshot {
    pub cpu_stats: BTreeMap<u32, CpuStats>,
    pub threads: Vec<(ThreadKey, ThreadStats)>,
    pub counters: Counters,
}

impl MapSnapshot {
    /// What accumulated between `before` and `self` (the window). Threads
    /// first seen in the window keep all their time; `max_slice_ns` is the
    /// longest slice since the thread was first seen (it cannot be split).
    pub fn since(&self, before: &MapSnapshot) -> MapSnapshot {
        let cpu_stats = self
            .cpu_stats
            .iter()
            .map(|(cpu, s)| {
                let mut d = *s;
                if let Some(b) = before.cpu_stats.get(cpu) {
                    for c in 0..class::COUNT {
                        d.run_ns[c] = s.run_ns[c].saturating_sub(b.run_ns[c]);
                        d.slices[c] = s.slices[c].saturating_sub(b.slices[c]);
                    }
                }
                (*cpu, d)
            })
            .collect();
        let old: BTreeMap<(u32, u32), &ThreadStats> = before
            .threads
            .iter()
            .map(|(k, v)| ((k.cpu, k.tid), v))
            .collect();
        let threads = self
            .threads
            .iter()
            .filter_map(|(k, v)| {
                let mut d = *v;
                if let Some(b) = old.get(&(k.cpu, k.tid)) {
                    d.run_ns = v.run_ns.saturating_sub(b.run_ns);
                    d.slices = v.slices.saturating_sub(b.slices);
                }
                (d.slices > 0).then_some((*k, d))
            })
            .collect();
        let c = |a: u64, b: u64| a.saturating_sub(b);
        MapSnapshot {
            cpu_stats,
            threads,
            counters: Counters {
                events_lost: c(self.counters.events_lost, before.counters.events_lost),
                thread_map_full: c(
                    self.counters.thread_map_full,
                    before.counters.thread_map_full,
                ),
                read_errors: c(self.counters.read_errors, before.counters.read_errors),
            },
        }
    }
}

/// What the observer saw during one window.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub elapsed: Duration,
    /// The maps' growth over the window ([`MapSnapshot::since`]).
    pub maps: MapSnapshot,
    pub events: EventTally,
}

/// The window audit. `live` holds what /proc says now about threads that
/// still exist (for their affinity); threads that exited are reported from
/// the observer's records alone.
pub fn window(
    guard: &Guard,
    own: &Ownership,
    obs: &Observation,
    live: &BTreeMap<u32, ThreadInfo>,
) -> Report {
    let window_ns = u64::try_from(obs.elapsed.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    let pct = |ns: u64| (ns as f64 * 1000.0 / window_ns as f64).round() / 10.0;
    let mut cpus = Vec::new();
    // Off-CPU vCPUs, by their own CPU.
    let mut off: BTreeMap<u32, VcpuOff> = BTreeMap::new();
    let off_entry = |off: &mut BTreeMap<u32, VcpuOff>, o: &VcpuOwner| -> VcpuOff {
        off.remove(&o.tid).unwrap_or_else(|| VcpuOff {
            vm: o.vm.clone(),
            vcpu: o.vcpu,
            tid: o.tid,
            ran_on: CpuSet::new(),
            ran_ns: 0,
            moved_to: CpuSet::new(),
            moves: 0,
        })
    };
    for (k, t) in &obs.maps.threads {
        if let Some(o) = own.vcpu(k.tid)
            && o.cpu != k.cpu
        {
            let mut e = off_entry(&mut off, o);
            e.ran_on.insert(k.cpu);
            e.ran_ns += t.run_ns;
            off.insert(o.tid, e);
        }
    }
    for (tid, (_, _, on)) in &obs.events.intrusions {
        if let Some(o) = own.vcpu(*tid) {
            let elsewhere: CpuSet = on.iter().filter(|c| *c != o.cpu).collect();
            if !elsewhere.is_empty() {
                let mut e = off_entry(&mut off, o);
                e.ran_on = e.ran_on.union(&elsewhere);
                off.insert(o.tid, e);
            }
        }
    }
    for (tid, (moves, to)) in &obs.events.away {
        if let Some(o) = own.vcpu(*tid) {
            let mut e = off_entry(&mut off, o);
            e.moves += moves;
            e.moved_to = e.moved_to.union(to);
            off.insert(o.tid, e);
        }
    }

    for cpu in guard.guarded.iter() {
        let stats = obs.maps.cpu_stats.get(&cpu).copied().unwrap_or_default();
        let mut time: BTreeMap<&'static str, ClassTime> = ThreadClass::ALL
            .iter()
            .map(|c| {
                let ns = stats.run_ns[c.index()];
                (c.as_str(), ClassTime { ns, pct: pct(ns) })
            })
            .collect();
        // A slice is accounted when it ends: one still running when the
        // window closed (a CPU hog that never switched out) is in no class yet.
        let accounted: u64 = stats.run_ns.iter().sum();
        let rest = window_ns.saturating_sub(accounted);
        time.insert(
            UNATTRIBUTED,
            ClassTime {
                ns: rest,
                pct: pct(rest),
            },
        );
        let mut rows = Vec::new();
        let mut violations = Vec::new();
        for (k, t) in obs.maps.threads.iter().filter(|(k, _)| k.cpu == cpu) {
            let now = live.get(&k.tid).filter(|i| i.tgid == t.tgid);
            let comm = now.map_or_else(|| comm_str(&t.comm), |i| i.comm.clone());
            let Some(class) = ThreadClass::from_raw(t.class) else {
                continue;
            };
            let kthread = class == ThreadClass::IntruderKthread;
            let (vm, vcpu, assigned_cpu) = vcpu_fields(k.tid, t.tgid, own);
            let unidentified = own.unidentified_guest(t.tgid).is_some();
            let (row_class, finding) = match (own.vcpu(k.tid), vm.is_some(), kthread) {
                (Some(_), _, _) => (Class::OtherVcpu, Finding::Intruder),
                (None, true, _) => (Class::Emulator, Finding::Intruder),
                (None, false, _) if unidentified => {
                    (Class::UnidentifiedGuest, Finding::UnidentifiedGuest)
                }
                (None, false, true) => (Class::UnboundKthread, Finding::UnboundKthread),
                (None, false, false) => (Class::User, Finding::Intruder),
            };
            let mut note = format!(
                "{} ran {} in {} slice(s), longest {}",
                class,
                fmt_ns(t.run_ns),
                t.slices,
                fmt_ns(t.max_slice_ns)
            );
            match (own.vcpu(k.tid), &vm) {
                (Some(o), _) => {
                    let _ = write!(note, "; vCPU {} of {} (owns CPU {})", o.vcpu, o.vm, o.cpu);
                }
                (None, Some(vm)) => {
                    let _ = write!(note, "; emulator thread of {vm}");
                }
                _ => {}
            }
            if now.is_none() {
                note.push_str("; exited since");
            }
            violations.push(Violation {
                kind: finding,
                cpu,
                tid: k.tid,
                pid: t.tgid,
                comm: comm.clone(),
                vm: vm.clone(),
                vcpu,
                detail: note.clone(),
            });
            rows.push(ThreadRow {
                class: row_class,
                tid: k.tid,
                pid: t.tgid,
                comm,
                state: now.map(|i| i.state),
                last_cpu: now.map(|i| i.last_cpu),
                affinity: now.map(|i| i.allowed.clone()),
                sched: None,
                vm,
                vcpu,
                assigned_cpu,
                status: Status::Violation,
                finding: Some(finding),
                note,
                run_ns: Some(t.run_ns),
                slices: Some(t.slices),
                max_slice_ns: Some(t.max_slice_ns),
            });
        }
        rows.sort_by(|a, b| b.run_ns.cmp(&a.run_ns).then(a.tid.cmp(&b.tid)));
        violations.sort_by(|a, b| {
            let ns = |v: &Violation| {
                rows.iter()
                    .find(|r| r.tid == v.tid)
                    .and_then(|r| r.run_ns)
                    .unwrap_or(0)
            };
            ns(b).cmp(&ns(a)).then(a.tid.cmp(&b.tid))
        });

        let migrations: Vec<Migration> = obs
            .events
            .migrations
            .iter()
            .filter(|((c, _), _)| *c == cpu)
            .map(|(_, m)| m.clone())
            .collect();
        for m in &migrations {
            let (vm, vcpu, _) = vcpu_fields(m.tid, m.pid, own);
            violations.push(Violation {
                kind: Finding::MigrationIn,
                cpu,
                tid: m.tid,
                pid: m.pid,
                comm: m.comm.clone(),
                vm,
                vcpu,
                detail: format!(
                    "migrated onto CPU {cpu} {} time(s) from CPU {}",
                    m.count, m.from_cpus
                ),
            });
        }
        let vcpus_off: Vec<VcpuOff> = own
            .owners_of(cpu)
            .iter()
            .filter_map(|o| off.get(&o.tid).cloned())
            .collect();
        for v in &vcpus_off {
            let mut what = Vec::new();
            if !v.ran_on.is_empty() {
                what.push(format!("ran on CPU {} for {}", v.ran_on, fmt_ns(v.ran_ns)));
            }
            if v.moves > 0 {
                what.push(format!(
                    "was moved to CPU {} {} time(s)",
                    v.moved_to, v.moves
                ));
            }
            let pid = own.vcpu(v.tid).map_or(0, |o| o.pid);
            violations.push(Violation {
                kind: Finding::VcpuOffCpu,
                cpu,
                tid: v.tid,
                pid,
                comm: live.get(&v.tid).map(|i| i.comm.clone()).unwrap_or_default(),
                vm: Some(v.vm.clone()),
                vcpu: Some(v.vcpu),
                detail: format!(
                    "vCPU {} of {} left CPU {cpu}: {}",
                    v.vcpu,
                    v.vm,
                    what.join(", ")
                ),
            });
        }
        cpus.push(CpuReport {
            cpu,
            owners: own.owners_of(cpu),
            threads: rows,
            violations,
            time: Some(time),
            migrations: Some(migrations),
            vcpus_off: Some(vcpus_off),
        });
    }

    let mut warnings = Vec::new();
    shared_warnings(own, &mut warnings);
    for a in &obs.events.affinity {
        let whom = own.vcpu(a.target).map_or_else(
            || format!("thread {}", a.target),
            |o| format!("{} vCPU {} (tid {})", o.vm, o.vcpu, a.target),
        );
        warnings.push(format!(
            "{:?} (pid {}, tid {}) set the affinity of {whom} to {}",
            a.comm, a.pid, a.tid, a.mask
        ));
    }
    if obs.events.affinity_dropped > 0 {
        warnings.push(format!(
            "... and {} more affinity changes of vCPU threads",
            obs.events.affinity_dropped
        ));
    }
    let c = &obs.maps.counters;
    if c.events_lost > 0 {
        warnings.push(format!(
            "{} events were lost (ring buffer full): migration and vCPU-move counts are incomplete; \
             time totals and intruders are not affected",
            c.events_lost
        ));
    }
    if c.thread_map_full > 0 {
        warnings.push(format!(
            "{} intruder slices were not tracked per thread (thread map full): they count in the \
             time by class only",
            c.thread_map_full
        ));
    }
    if obs.events.decode_errors > 0 {
        warnings.push(format!("{} undecodable events", obs.events.decode_errors));
    }
    finish(
        guard,
        Mode::Window,
        Some(window_ns),
        cpus,
        warnings,
        Some(c.events_lost),
    )
}
