//! `pinguard audit`: what runs on the guarded CPUs, classified and explained.
//!
//! Two views, both pure functions over facts gathered by `cmd::audit`:
//! - [`snapshot`]: every thread whose last CPU is a guarded CPU or whose
//!   affinity includes one (the `ps -eLo lwp,psr` view), classified against
//!   the guests' ownership (who owns which CPU, from discovery + planning);
//! - [`window`]: what the eBPF observer saw during a window: time by class,
//!   every intruder with its run time (also the short ones a snapshot never
//!   sees), migrations onto guarded CPUs and vCPUs running off their CPU.
//!
//! A snapshot judges the present: a thread whose last CPU is guarded but whose
//! affinity no longer includes it (moved while asleep; the kernel only updates
//! `task_cpu` when it next wakes) is reported, not counted as a violation.
use std::collections::{BTreeMap, BTreeSet};

use crate::{
    exit,
    host::{
        cpulist::CpuSet,
        procfs::{Sched, ThreadInfo},
        topology::Guard,
    },
};

mod ownership;
mod render;
mod window;

pub use ownership::*;
pub use render::*;
pub use window::*;

/// What a thread is, as far as a guarded CPU is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// The vCPU assigned to this CPU.
    Owner,
    /// A vCPU assigned to another CPU.
    OtherVcpu,
    /// A non-vCPU thread of a guest (QEMU main loop, IO threads, vhost workers).
    Emulator,
    /// A kernel thread bound to exactly one CPU (migration/N, ksoftirqd/N, kworker/N:M).
    PercpuKthread,
    /// A kernel thread that may run on several CPUs (kworker/u*, rcu_preempt, ...).
    UnboundKthread,
    /// A thread of a KVM guest whose vCPU threads could not be told apart
    /// (a vCPU or an emulator thread: not an intruder, not manageable either).
    UnidentifiedGuest,
    /// Any other user thread.
    User,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::OtherVcpu => "other_vcpu",
            Self::Emulator => "emulator",
            Self::PercpuKthread => "percpu_kthread",
            Self::UnboundKthread => "unbound_kthread",
            Self::UnidentifiedGuest => "unidentified_guest",
            Self::User => "user",
        }
    }
}

/// Verdict on one thread (snapshot) or finding (window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    // Ordered so that sorting puts violations first.
    Violation,
    Warning,
    Ok,
}

/// What is wrong (violations) or worth knowing (warnings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    /// A user thread ran (or is confined to run) on a guarded CPU.
    Intruder,
    /// A kernel thread not bound to this CPU ran (or is confined to run) here.
    UnboundKthread,
    /// The CPU's vCPU may run elsewhere (its affinity is not exactly its CPU).
    VcpuNotPinned,
    /// A vCPU ran away from its CPU (on another guarded CPU, or moved away).
    VcpuOffCpu,
    /// An emulator thread may run on a guarded CPU.
    EmulatorOnGuarded,
    /// A thread was migrated onto a guarded CPU (window).
    MigrationIn,
    /// The thread's affinity includes the CPU, but it did not last run there (warning).
    Exposed,
    /// A thread of a guest pinguard cannot identify may run here.
    UnidentifiedGuest,
}

impl Finding {
    pub fn name(self) -> &'static str {
        match self {
            Self::Intruder => "intruder",
            Self::UnboundKthread => "unbound_kthread",
            Self::VcpuNotPinned => "vcpu_not_pinned",
            Self::VcpuOffCpu => "vcpu_off_cpu",
            Self::EmulatorOnGuarded => "emulator_on_guarded",
            Self::MigrationIn => "migration_in",
            Self::Exposed => "exposed",
            Self::UnidentifiedGuest => "unidentified_guest",
        }
    }

    /// How to fix it, for the human report.
    fn hint(self, housekeeping: &CpuSet) -> String {
        match self {
            Self::Intruder => format!(
                "intruder: move it to housekeeping CPUs with `taskset -apc {housekeeping} PID` \
                 (or its unit's CPUAffinity=/AllowedCPUs=), or run `pinguard run --mode enforce`"
            ),
            Self::UnboundKthread => format!(
                "unbound_kthread: keep unbound kernel work off guarded CPUs with isolcpus=domain,managed_irq \
                 and the workqueue cpumask, a hex mask (echo {} > /sys/devices/virtual/workqueue/cpumask; \
                 see `pinguard check`)",
                housekeeping.to_mask()
            ),
            Self::VcpuNotPinned | Self::EmulatorOnGuarded => {
                format!("{}: pin the guests with `pinguard pin`", self.name())
            }
            Self::VcpuOffCpu => "vcpu_off_cpu: re-pin with `pinguard pin`; find who changed the \
                                 affinity with `pinguard watch`"
                .to_string(),
            Self::MigrationIn => "migration_in: a thread allowed on guarded CPUs was moved there; \
                                  narrow its affinity to housekeeping CPUs or isolate the CPUs (isolcpus=)"
                .to_string(),
            Self::Exposed => String::new(),
            Self::UnidentifiedGuest => "unidentified_guest: pinguard cannot tell this guest's vCPU \
                                        threads apart; give it a QMP socket (--qmp PATH) or start \
                                        QEMU with -name NAME,debug-threads=on, then `pinguard pin`"
                .to_string(),
        }
    }
}

/// One thread listed under a guarded CPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ThreadRow {
    pub class: Class,
    pub tid: u32,
    /// Thread group (process) id.
    pub pid: u32,
    pub comm: String,
    /// Scheduler state letter; `None` when the thread exited (window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<char>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_cpu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<CpuSet>,
    /// Scheduling class, real-time priority and nice (`ps -eLo
    /// class,rtprio,ni`): a real-time vCPU runs before every kernel thread
    /// of its CPU. Read at the edge (see [`Report::fill_sched`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sched: Option<Sched>,
    pub vm: Option<String>,
    pub vcpu: Option<u32>,
    /// For vCPUs: the CPU they own.
    pub assigned_cpu: Option<u32>,
    pub status: Status,
    pub finding: Option<Finding>,
    pub note: String,
    /// Window: nanoseconds run on this CPU during the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slices: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_slice_ns: Option<u64>,
}

/// A violation on one guarded CPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub kind: Finding,
    pub cpu: u32,
    pub tid: u32,
    pub pid: u32,
    pub comm: String,
    pub vm: Option<String>,
    pub vcpu: Option<u32>,
    pub detail: String,
}

/// Window: time spent by one class on a CPU.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ClassTime {
    pub ns: u64,
    /// Share of the window.
    pub pct: f64,
}

/// Window: a thread migrated onto a guarded CPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Migration {
    pub tid: u32,
    pub pid: u32,
    pub comm: String,
    pub count: u64,
    pub from_cpus: CpuSet,
}

/// Window: a vCPU seen away from its CPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VcpuOff {
    pub vm: String,
    pub vcpu: u32,
    pub tid: u32,
    /// Other guarded CPUs it ran on.
    pub ran_on: CpuSet,
    /// Nanoseconds it ran on other guarded CPUs.
    pub ran_ns: u64,
    /// CPUs the scheduler moved it to (owner_away events).
    pub moved_to: CpuSet,
    pub moves: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CpuReport {
    pub cpu: u32,
    /// The vCPUs that own this CPU (empty: no guest is assigned to it).
    pub owners: Vec<VcpuOwner>,
    /// Snapshot: every thread on or allowed on this CPU; window: every
    /// intruder that ran here. Violations first, then warnings.
    pub threads: Vec<ThreadRow>,
    pub violations: Vec<Violation>,
    /// Window: time by class (idle, vcpu, kernel, allowed, intruder_user,
    /// intruder_kthread) and [`UNATTRIBUTED`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<BTreeMap<&'static str, ClassTime>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrations: Option<Vec<Migration>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus_off: Option<Vec<VcpuOff>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Snapshot,
    Window,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Number of entries in every CPU's `violations`.
    pub violations: usize,
    /// Threads with a warning and no violation, plus the report's `warnings` messages.
    pub warnings: usize,
    /// Distinct threads that may run on guarded CPUs without having last run there.
    pub exposed: usize,
    /// Window: events the kernel could not deliver (ring buffer full).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_lost: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub guarded: CpuSet,
    pub housekeeping: CpuSet,
    pub mode: Mode,
    /// Window: how long was observed (ns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_ns: Option<u64>,
    pub cpus: Vec<CpuReport>,
    pub summary: Summary,
    /// Things worth knowing that are not tied to one thread.
    pub warnings: Vec<String>,
}

impl Report {
    /// Adds each listed thread's scheduling class, read by `sched`.
    pub fn fill_sched(&mut self, sched: impl Fn(u32, u32) -> Option<Sched>) {
        for c in &mut self.cpus {
            for t in &mut c.threads {
                t.sched = sched(t.pid, t.tid);
            }
        }
    }

    /// 0 clean, 1 violations found.
    pub fn exit_code(&self) -> u8 {
        if self.summary.violations > 0 {
            exit::VIOLATIONS
        } else {
            exit::OK
        }
    }
}

/// The class of `t` as seen from guarded CPU `cpu`.
pub fn classify(t: &ThreadInfo, cpu: u32, own: &Ownership) -> Class {
    if let Some(o) = own.vcpu(t.tid) {
        return if o.cpu == cpu {
            Class::Owner
        } else {
            Class::OtherVcpu
        };
    }
    if own.emulator_of(t.tid, t.tgid).is_some() {
        return Class::Emulator;
    }
    if own.unidentified_guest(t.tgid).is_some() {
        return Class::UnidentifiedGuest;
    }
    if t.is_kthread() {
        // Bound to one CPU: it serves that CPU (the observer's rule too).
        return if t.allowed.len() == 1 {
            Class::PercpuKthread
        } else {
            Class::UnboundKthread
        };
    }
    Class::User
}

/// The verdict on one thread listed under guarded CPU `cpu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub class: Class,
    pub status: Status,
    pub finding: Option<Finding>,
    pub note: String,
}

/// Classifies `t` on guarded CPU `cpu` and judges it (the rules are in the
/// module documentation of each [`Finding`]).
pub fn assess(t: &ThreadInfo, cpu: u32, guarded: &CpuSet, own: &Ownership) -> Assessment {
    let class = classify(t, cpu, own);
    let here = t.last_cpu == cpu;
    let can = t.allowed.contains(cpu);
    // Affinity within the guarded CPUs: it will run on one of them whenever it runs.
    let confined = !t.allowed.is_empty() && t.allowed.is_subset(guarded);
    let aff = &t.allowed;
    let verdict = |status, finding, note: String| Assessment {
        class,
        status,
        finding,
        note,
    };
    let ok = |note: String| verdict(Status::Ok, None, note);
    let moved_off = || {
        ok(format!(
            "last ran here, but its affinity ({aff}) no longer includes CPU {cpu}; it moves when it next wakes"
        ))
    };
    if matches!(t.state, 'Z' | 'X') {
        return ok("exited (zombie)".into());
    }
    match class {
        Class::Owner => {
            if *aff == CpuSet::single(cpu) {
                ok("owner vCPU, pinned".into())
            } else {
                verdict(
                    Status::Violation,
                    Some(Finding::VcpuNotPinned),
                    format!("vCPU not pinned: affinity {aff}, should be exactly CPU {cpu}"),
                )
            }
        }
        Class::OtherVcpu => {
            let home = own.vcpu(t.tid).map_or(cpu, |o| o.cpu);
            if can && (here || confined) {
                verdict(
                    Status::Violation,
                    Some(Finding::VcpuOffCpu),
                    if here {
                        format!("vCPU of CPU {home} last ran here (affinity {aff})")
                    } else {
                        format!("vCPU of CPU {home} is confined here (affinity {aff})")
                    },
                )
            } else if can {
                verdict(
                    Status::Warning,
                    Some(Finding::Exposed),
                    format!("vCPU of CPU {home} may run here (affinity {aff}; see CPU {home})"),
                )
            } else {
                moved_off()
            }
        }
        Class::Emulator => {
            if can && own.emulator_placed(t.tid, aff) {
                ok(format!(
                    "emulator thread placed here by the emulator policy (affinity {aff})"
                ))
            } else if can {
                verdict(
                    Status::Violation,
                    Some(Finding::EmulatorOnGuarded),
                    format!("emulator thread may run on this guarded CPU (affinity {aff})"),
                )
            } else if here {
                moved_off()
            } else {
                ok(format!("emulator thread (affinity {aff})"))
            }
        }
        Class::UnidentifiedGuest => {
            if can {
                verdict(
                    Status::Violation,
                    Some(Finding::UnidentifiedGuest),
                    format!(
                        "thread of a KVM guest pinguard cannot identify (affinity {aff}): \
                         not pinned, not evicted"
                    ),
                )
            } else {
                moved_off()
            }
        }
        Class::PercpuKthread => {
            if can {
                ok("per-CPU kernel thread (allowed)".into())
            } else {
                moved_off()
            }
        }
        Class::UnboundKthread | Class::User => {
            let (finding, what) = if class == Class::User {
                (Finding::Intruder, "user thread")
            } else {
                (Finding::UnboundKthread, "unbound kernel thread")
            };
            if can && here && class == Class::UnboundKthread && t.no_setaffinity() && !confined {
                // Workqueue rescuers (kworker/R-*) and the like: the kernel
                // places them and refuses anyone else's affinity. Named, with
                // why; only a boot parameter keeps them off.
                verdict(
                    Status::Warning,
                    Some(finding),
                    format!(
                        "unbound kernel thread the kernel places itself (PF_NO_SETAFFINITY: \
                         user space cannot move it) last ran here (affinity {aff}); \
                         isolcpus=domain at boot keeps it off"
                    ),
                )
            } else if can && here {
                verdict(
                    Status::Violation,
                    Some(finding),
                    format!("{what} last ran here (affinity {aff})"),
                )
            } else if can && confined {
                verdict(
                    Status::Violation,
                    Some(finding),
                    format!("{what} confined to guarded CPUs (affinity {aff})"),
                )
            } else if can {
                verdict(
                    Status::Warning,
                    Some(Finding::Exposed),
                    format!("may run here (affinity {aff})"),
                )
            } else {
                moved_off()
            }
        }
    }
}

fn vcpu_fields(
    t_tid: u32,
    t_tgid: u32,
    own: &Ownership,
) -> (Option<String>, Option<u32>, Option<u32>) {
    match own.vcpu(t_tid) {
        Some(o) => (Some(o.vm.clone()), Some(o.vcpu), Some(o.cpu)),
        None => (
            own.emulator_of(t_tid, t_tgid).map(str::to_string),
            None,
            None,
        ),
    }
}

/// The snapshot audit of `threads` (the whole host, as `Proc::all_threads`
/// reads it). Threads of `exclude_tgid` (pinguard itself) are left out.
pub fn snapshot(
    guard: &Guard,
    threads: &[ThreadInfo],
    own: &Ownership,
    exclude_tgid: u32,
) -> Report {
    let mut cpus = Vec::new();
    for cpu in guard.guarded.iter() {
        let mut rows = Vec::new();
        let mut violations = Vec::new();
        for t in threads.iter().filter(|t| t.tgid != exclude_tgid) {
            let owner_here = own.vcpu(t.tid).is_some_and(|o| o.cpu == cpu);
            if !(t.last_cpu == cpu || t.allowed.contains(cpu) || owner_here) {
                continue;
            }
            let a = assess(t, cpu, &guard.guarded, own);
            let (vm, vcpu, assigned_cpu) = vcpu_fields(t.tid, t.tgid, own);
            if a.status == Status::Violation
                && let Some(kind) = a.finding
            {
                violations.push(Violation {
                    kind,
                    cpu,
                    tid: t.tid,
                    pid: t.tgid,
                    comm: t.comm.clone(),
                    vm: vm.clone(),
                    vcpu,
                    detail: a.note.clone(),
                });
            }
            rows.push(ThreadRow {
                class: a.class,
                tid: t.tid,
                pid: t.tgid,
                comm: t.comm.clone(),
                state: Some(t.state),
                last_cpu: Some(t.last_cpu),
                affinity: Some(t.allowed.clone()),
                sched: None,
                vm,
                vcpu,
                assigned_cpu,
                status: a.status,
                finding: a.finding,
                note: a.note,
                run_ns: None,
                slices: None,
                max_slice_ns: None,
            });
        }
        rows.sort_by_key(|r| (r.status, r.class, r.tid));
        let owners = own.owners_of(cpu);
        // A vCPU that exited between discovery and the listing cannot be judged.
        cpus.push(CpuReport {
            cpu,
            owners,
            threads: rows,
            violations,
            time: None,
            migrations: None,
            vcpus_off: None,
        });
    }
    let mut warnings = Vec::new();
    shared_warnings(own, &mut warnings);
    finish(guard, Mode::Snapshot, None, cpus, warnings, None)
}

fn exposed_message(n: usize, guard: &Guard) -> String {
    format!(
        "{n} threads may run on guarded CPUs (affinity includes them); isolate with isolcpus= \
         (e.g. isolcpus=domain,managed_irq,{} nohz_full={} on the kernel command line; see `pinguard check`)",
        guard.guarded, guard.guarded
    )
}

fn shared_warnings(own: &Ownership, warnings: &mut Vec<String>) {
    for cpu in own.shared_cpus().iter() {
        let who: Vec<String> = own
            .owners_of(cpu)
            .iter()
            .map(|o| format!("{} vCPU {} (tid {})", o.vm, o.vcpu, o.tid))
            .collect();
        warnings.push(format!(
            "CPU {cpu} is assigned to {} vCPUs, which contend for it: {} (guard more CPUs)",
            who.len(),
            who.join(", ")
        ));
    }
}

fn finish(
    guard: &Guard,
    mode: Mode,
    window_ns: Option<u64>,
    cpus: Vec<CpuReport>,
    mut warnings: Vec<String>,
    events_lost: Option<u64>,
) -> Report {
    // A thread counts once, as its worst finding on any CPU.
    let violators: BTreeSet<u32> = cpus
        .iter()
        .flat_map(|c| &c.violations)
        .map(|v| v.tid)
        .collect();
    let warned = |only_exposed: bool| -> BTreeSet<u32> {
        cpus.iter()
            .flat_map(|c| &c.threads)
            .filter(|r| r.status == Status::Warning && !violators.contains(&r.tid))
            .filter(|r| !only_exposed || r.finding == Some(Finding::Exposed))
            .map(|r| r.tid)
            .collect()
    };
    let exposed = warned(true).len();
    let messages = warnings.len();
    if exposed > 0 {
        // Summarises threads already counted one by one: not counted again.
        warnings.push(exposed_message(exposed, guard));
    }
    let summary = Summary {
        violations: cpus.iter().map(|c| c.violations.len()).sum(),
        warnings: warned(false).len() + messages,
        exposed,
        events_lost,
    };
    Report {
        guarded: guard.guarded.clone(),
        housekeeping: guard.housekeeping.clone(),
        mode,
        window_ns,
        cpus,
        summary,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pin_common::{CpuStats, PF_KTHREAD, TASK_COMM_LEN, ThreadKey, ThreadStats, class};

    use super::*;
    use crate::bpf::{
        class::ThreadClass,
        events::{self, KernelEvent, Thread},
    };

    fn set(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

    fn guard() -> Guard {
        Guard {
            guarded: set("2-3"),
            housekeeping: set("0-1"),
        }
    }

    fn thread(tgid: u32, tid: u32, comm: &str, last_cpu: u32, allowed: &str) -> ThreadInfo {
        ThreadInfo {
            tgid,
            tid,
            comm: comm.into(),
            state: 'S',
            flags: 0,
            last_cpu,
            allowed: set(allowed),
            start_time: 0,
            sched: None,
        }
    }

    fn kthread(tid: u32, comm: &str, last_cpu: u32, allowed: &str) -> ThreadInfo {
        ThreadInfo {
            flags: PF_KTHREAD,
            ..thread(tid, tid, comm, last_cpu, allowed)
        }
    }

    /// Guest g1 (pid 100): vCPU 0 (tid 101) owns CPU 2, vCPU 1 (tid 102) owns CPU 3;
    /// tid 103 is its main loop, tid 900 its vhost worker.
    fn ownership() -> Ownership {
        let mut own = Ownership::default();
        for (vcpu, tid, cpu) in [(0, 101, 2), (1, 102, 3)] {
            own.add_vcpu(VcpuOwner {
                vm: "g1".into(),
                pid: 100,
                vcpu,
                tid,
                cpu,
                shared: false,
            });
        }
        own.add_emulator(900, "g1", 100);
        own
    }

    /// A host where everything is in its place.
    fn clean_host() -> Vec<ThreadInfo> {
        vec![
            thread(100, 101, "CPU 0/KVM", 2, "2"),
            thread(100, 102, "CPU 1/KVM", 3, "3"),
            thread(100, 103, "qemu-system-x86", 0, "0-1"),
            // Pinned away while asleep: its last CPU is stale.
            thread(100, 104, "IO mon_iothread", 2, "0-1"),
            ThreadInfo {
                flags: PF_KTHREAD,
                ..thread(900, 900, "vhost-100", 1, "0-1")
            },
            kthread(20, "migration/2", 2, "2"),
            kthread(21, "ksoftirqd/3", 3, "3"),
            kthread(22, "kworker/u8:1", 0, "0-1"),
            thread(500, 500, "sshd", 1, "0-1"),
            thread(501, 501, "zombie", 2, "0-3"),
        ]
        .into_iter()
        .map(|mut t| {
            if t.comm == "zombie" {
                t.state = 'Z';
            }
            t
        })
        .collect()
    }

    #[test]
    fn an_emulator_the_policy_puts_with_vcpu0_is_there_by_design() {
        use crate::placement::plan::{Entry, Plan, Role};
        let entry = |tid, role, vcpu, to: &str| Entry {
            vm: "g1".into(),
            pid: 100,
            vcpu,
            tid,
            role,
            from: set("0-3"),
            to: set(to),
            change: true,
            shared: false,
            manager: Default::default(),
        };
        // `emulator = "with-vcpu0"`: the main loop goes with vCPU 0 on CPU 2.
        let own = Ownership::from_plan(&Plan {
            entries: vec![
                entry(101, Role::Vcpu, Some(0), "2"),
                entry(103, Role::Emulator, None, "2"),
            ],
            ..Plan::default()
        });
        let mut t = thread(100, 103, "qemu-system-x86", 2, "2");
        let a = assess(&t, 2, &set("2-3"), &own);
        assert_eq!(
            (a.class, a.status, a.finding),
            (Class::Emulator, Status::Ok, None)
        );
        assert!(a.note.contains("emulator policy"), "{}", a.note);
        // Widened beyond what the policy gives it: a violation again.
        t.allowed = set("0-3");
        let a = assess(&t, 2, &set("2-3"), &own);
        assert_eq!(a.finding, Some(Finding::EmulatorOnGuarded));
    }

    #[test]
    fn threads_of_an_unidentified_guest_are_named_as_such_not_intruders() {
        let mut own = ownership();
        own.add_unidentified(300, "hidden");
        let t = thread(300, 301, "qemu-system-x86", 2, "0-3");
        let a = assess(&t, 2, &set("2-3"), &own);
        assert_eq!(a.class, Class::UnidentifiedGuest);
        assert_eq!(a.finding, Some(Finding::UnidentifiedGuest));
        assert!(a.note.contains("cannot identify"), "{}", a.note);
    }

    #[test]
    fn a_kernel_thread_user_space_cannot_move_is_a_warning_with_why() {
        let mut t = kthread(4, "kworker/R-rcu_gp", 2, "0-3");
        t.flags |= pin_common::PF_NO_SETAFFINITY;
        let a = assess(&t, 2, &set("2-3"), &ownership());
        assert_eq!(
            (a.status, a.finding),
            (Status::Warning, Some(Finding::UnboundKthread))
        );
        assert!(a.note.contains("PF_NO_SETAFFINITY"), "{}", a.note);
        // One user space can move is a violation.
        t.flags &= !pin_common::PF_NO_SETAFFINITY;
        assert_eq!(
            assess(&t, 2, &set("2-3"), &ownership()).status,
            Status::Violation
        );
    }

    #[test]
    fn classifies_every_kind_of_thread() {
        let own = ownership();
        let c = |t: &ThreadInfo, cpu| classify(t, cpu, &own);
        assert_eq!(c(&thread(100, 101, "CPU 0/KVM", 2, "2"), 2), Class::Owner);
        assert_eq!(
            c(&thread(100, 101, "CPU 0/KVM", 2, "2"), 3),
            Class::OtherVcpu
        );
        assert_eq!(c(&thread(100, 103, "qemu", 0, "0-1"), 2), Class::Emulator);
        // vhost workers are kernel threads, but they belong to the guest.
        assert_eq!(c(&kthread(900, "vhost-100", 2, "0-3"), 2), Class::Emulator);
        assert_eq!(
            c(&kthread(20, "migration/2", 2, "2"), 2),
            Class::PercpuKthread
        );
        assert_eq!(
            c(&kthread(22, "kworker/u8:1", 2, "0-3"), 2),
            Class::UnboundKthread
        );
        assert_eq!(c(&thread(500, 501, "stress", 2, "0-3"), 2), Class::User);
    }

    #[test]
    fn clean_host_has_no_violations_and_exits_0() {
        let r = snapshot(&guard(), &clean_host(), &ownership(), 0);
        assert_eq!(r.summary.violations, 0, "{}", render(&r));
        assert_eq!(r.summary.warnings, 0, "{}", render(&r));
        assert_eq!(r.exit_code(), exit::OK);
        let cpu2 = &r.cpus[0];
        assert_eq!(cpu2.cpu, 2);
        assert_eq!(cpu2.owners.len(), 1);
        assert_eq!(cpu2.owners[0].tid, 101);
        let tids: Vec<u32> = cpu2.threads.iter().map(|t| t.tid).collect();
        // Listed: the owner, the per-CPU kthread, the stale emulator and the zombie.
        assert_eq!(tids, vec![101, 104, 20, 501], "{}", render(&r));
        let io = cpu2.threads.iter().find(|t| t.tid == 104).unwrap();
        assert_eq!((io.class, io.status), (Class::Emulator, Status::Ok));
        assert!(io.note.contains("no longer includes CPU 2"), "{}", io.note);
        let text = render(&r);
        assert!(
            text.contains("Summary: 0 violation(s), 0 warning(s) on guarded CPUs 2-3."),
            "{text}"
        );
        assert!(!text.contains("VIOLATION"), "{text}");
    }

    #[test]
    fn violations_are_found_and_explained() {
        let mut host = clean_host();
        host.extend([
            // Intruder pinned to a guarded CPU, asleep on it.
            thread(600, 601, "pg-intr", 2, "2"),
            // A user thread allowed everywhere that last ran on CPU 3.
            thread(700, 700, "cron", 3, "0-3"),
            // An unbound kthread that last ran on CPU 2.
            kthread(23, "kworker/u8:2", 2, "0-3"),
        ]);
        // vCPU 1 lost its pin; the main loop may run on guarded CPUs.
        for t in host.iter_mut() {
            if t.tid == 102 {
                t.allowed = set("0-3");
                t.last_cpu = 2;
            }
            if t.tid == 103 {
                t.allowed = set("0-3");
            }
        }
        let r = snapshot(&guard(), &host, &ownership(), 0);
        assert_eq!(r.exit_code(), exit::VIOLATIONS);
        let kinds = |cpu: u32| -> Vec<(Finding, u32)> {
            let c = r.cpus.iter().find(|c| c.cpu == cpu).unwrap();
            let mut v: Vec<_> = c.violations.iter().map(|v| (v.kind, v.tid)).collect();
            v.sort();
            v
        };
        assert_eq!(
            kinds(2),
            vec![
                (Finding::Intruder, 601),
                (Finding::UnboundKthread, 23),
                (Finding::VcpuOffCpu, 102),
                (Finding::EmulatorOnGuarded, 103),
            ],
            "{}",
            render(&r)
        );
        assert_eq!(
            kinds(3),
            vec![
                (Finding::Intruder, 700),
                (Finding::VcpuNotPinned, 102),
                (Finding::EmulatorOnGuarded, 103),
            ],
            "{}",
            render(&r)
        );
        assert_eq!(r.summary.violations, 7);
        // sshd (0-1) is not exposed; nothing else may merely run there.
        assert_eq!(r.summary.exposed, 0);
        // Violations come first in each table.
        let cpu2 = &r.cpus[0];
        let first_ok = cpu2
            .threads
            .iter()
            .position(|t| t.status != Status::Violation)
            .unwrap();
        assert!(
            cpu2.threads[first_ok..]
                .iter()
                .all(|t| t.status != Status::Violation)
        );
        let text = render(&r);
        let line = text.lines().find(|l| l.contains("pg-intr")).unwrap();
        assert!(
            line.contains("601") && line.contains("VIOLATION intruder"),
            "{line}"
        );
        assert!(text.contains("fix intruder"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["mode"], "snapshot");
        assert_eq!(json["guarded"], "2-3");
        assert_eq!(json["summary"]["violations"], 7);
        let v = &json["cpus"][0]["violations"][0];
        assert!(
            v["kind"].is_string() && v["tid"].is_number() && v["comm"].is_string(),
            "{v}"
        );
        let row = json["cpus"][0]["threads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tid"] == 102)
            .unwrap();
        assert_eq!(row["class"], "other_vcpu");
        assert_eq!(row["vm"], "g1");
        assert_eq!(row["vcpu"], 1);
        assert_eq!(row["assigned_cpu"], 3);
        assert_eq!(row["affinity"], "0-3");
        assert_eq!(row["last_cpu"], 2);
    }

    #[test]
    fn default_affinity_is_a_warning_not_a_violation() {
        // The lab machine: no isolcpus, everything allowed everywhere.
        let host = vec![
            thread(500, 500, "sshd", 0, "0-3"),
            thread(501, 501, "bash", 1, "0-3"),
            kthread(22, "kworker/u8:1", 0, "0-3"),
        ];
        let r = snapshot(&guard(), &host, &Ownership::default(), 0);
        assert_eq!(r.summary.violations, 0);
        assert_eq!(r.summary.exposed, 3);
        assert_eq!(r.summary.warnings, 3);
        assert_eq!(r.exit_code(), exit::OK);
        assert!(
            r.warnings[0].starts_with(
                "3 threads may run on guarded CPUs (affinity includes them); isolate with isolcpus="
            ),
            "{:?}",
            r.warnings
        );
        // Each is listed under both guarded CPUs, with its reason.
        for c in &r.cpus {
            assert_eq!(c.threads.len(), 3);
            assert!(
                c.threads
                    .iter()
                    .all(|t| t.finding == Some(Finding::Exposed))
            );
        }
        // An unowned CPU says so.
        assert!(
            render(&r).contains("CPU 2: owner no vCPU assigned; 0 violation(s)"),
            "{}",
            render(&r)
        );
    }

    #[test]
    fn own_threads_are_left_out() {
        let host = vec![
            thread(42, 42, "pinguard", 2, "0-3"),
            thread(42, 43, "pinguard", 2, "0-3"),
        ];
        let r = snapshot(&guard(), &host, &Ownership::default(), 42);
        assert!(r.cpus.iter().all(|c| c.threads.is_empty()));
        assert_eq!(r.summary.violations, 0);
    }

    #[test]
    fn owner_assigned_elsewhere_is_listed_under_its_cpu() {
        // A vCPU pinned to a housekeeping CPU: not on CPU 2 by any measure,
        // but CPU 2 is its CPU, so the audit must say it is not there.
        let host = vec![
            thread(100, 101, "CPU 0/KVM", 0, "0"),
            thread(100, 102, "CPU 1/KVM", 3, "3"),
        ];
        let r = snapshot(&guard(), &host, &ownership(), 0);
        let v = &r.cpus[0].violations;
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].kind, v[0].tid), (Finding::VcpuNotPinned, 101));
        assert_eq!(v[0].vm.as_deref(), Some("g1"));
        assert_eq!(v[0].vcpu, Some(0));
    }

    #[test]
    fn shared_cpus_warn() {
        let mut own = ownership();
        own.add_vcpu(VcpuOwner {
            vm: "g2".into(),
            pid: 200,
            vcpu: 0,
            tid: 201,
            cpu: 2,
            shared: true,
        });
        let r = snapshot(&guard(), &[], &own, 0);
        assert_eq!(r.summary.warnings, 1, "{:?}", r.warnings);
        assert!(
            r.warnings[0].contains("CPU 2 is assigned to 2 vCPUs"),
            "{:?}",
            r.warnings
        );
    }

    fn comm(s: &str) -> [u8; TASK_COMM_LEN] {
        let mut c = [0u8; TASK_COMM_LEN];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    fn stats(tgid: u32, cls: u32, name: &str, run_ns: u64, slices: u64, max: u64) -> ThreadStats {
        ThreadStats {
            run_ns,
            slices,
            max_slice_ns: max,
            tgid,
            class: cls,
            comm: comm(name),
            ..ThreadStats::default()
        }
    }

    fn named(tid: u32) -> Thread {
        Thread {
            tid,
            tgid: tid,
            comm: format!("t{tid}"),
        }
    }

    fn migrate_in(to_cpu: u32, tid: u32, from_cpu: u32) -> KernelEvent {
        KernelEvent::MigrateIn(events::Migration {
            thread: named(tid),
            from_cpu,
            to_cpu,
            at_ns: 0,
        })
    }

    fn owner_away(from_cpu: u32, tid: u32, to_cpu: u32) -> KernelEvent {
        KernelEvent::OwnerAway(events::Migration {
            thread: named(tid),
            from_cpu,
            to_cpu,
            at_ns: 0,
        })
    }

    fn intrusion(cpu: u32, tid: u32) -> KernelEvent {
        KernelEvent::Intrusion(events::Intrusion {
            cpu,
            thread: named(tid),
            cgroup_id: 0,
            start_ns: 0,
            run_ns: 0,
            total_ns: 0,
            slices: 0,
            class: ThreadClass::IntruderUser,
        })
    }

    /// Thread `tid` set the affinity of vCPU thread 77 (owner of `cpu`) to 0-1.
    fn affinity_change(cpu: u32, tid: u32) -> KernelEvent {
        KernelEvent::AffinityChange(events::AffinityChange {
            cpu,
            caller: named(tid),
            target_tid: 77,
            mask: CpuSet::from_cpus([0, 1]),
            at_ns: 0,
        })
    }

    #[test]
    fn map_deltas_cover_only_the_window() {
        let key = ThreadKey { cpu: 2, tid: 7 };
        let mut before = MapSnapshot::default();
        let mut s = CpuStats::default();
        s.run_ns[class::IDLE as usize] = 100;
        before.cpu_stats.insert(2, s);
        before
            .threads
            .push((key, stats(7, class::INTRUDER_USER, "a", 50, 2, 30)));
        before.threads.push((
            ThreadKey { cpu: 2, tid: 8 },
            stats(8, class::INTRUDER_USER, "b", 5, 1, 5),
        ));
        let mut after = before.clone();
        after.cpu_stats.get_mut(&2).unwrap().run_ns[class::IDLE as usize] = 1100;
        after.threads[0].1.run_ns = 80;
        after.threads[0].1.slices = 3;
        after.threads.push((
            ThreadKey { cpu: 3, tid: 9 },
            stats(9, class::INTRUDER_KTHREAD, "c", 9, 1, 9),
        ));
        after.counters.events_lost = 4;
        let d = after.since(&before);
        assert_eq!(d.cpu_stats[&2].run_ns[class::IDLE as usize], 1000);
        let tids: Vec<(u32, u64, u64)> = d
            .threads
            .iter()
            .map(|(k, v)| (k.tid, v.run_ns, v.slices))
            .collect();
        // tid 8 did not run in the window; tid 9 is new.
        assert_eq!(tids, vec![(7, 30, 1), (9, 9, 1)]);
        assert_eq!(d.counters.events_lost, 4);
    }

    #[test]
    fn window_reports_intruders_migrations_and_vcpus_off() {
        let own = ownership();
        let mut obs = Observation {
            elapsed: Duration::from_secs(2),
            ..Observation::default()
        };
        let mut s2 = CpuStats::default();
        s2.run_ns[class::IDLE as usize] = 1_000_000_000;
        s2.run_ns[class::VCPU as usize] = 500_000_000;
        s2.run_ns[class::INTRUDER_USER as usize] = 300_000 + 2_000_000;
        obs.maps.cpu_stats.insert(2, s2);
        obs.maps.cpu_stats.insert(3, CpuStats::default());
        obs.maps.threads = vec![
            (
                ThreadKey { cpu: 2, tid: 601 },
                stats(600, class::INTRUDER_USER, "pg-short", 300_000, 1, 300_000),
            ),
            // vCPU 1 (CPU 3's owner) ran on CPU 2.
            (
                ThreadKey { cpu: 2, tid: 102 },
                stats(
                    100,
                    class::INTRUDER_USER,
                    "CPU 1/KVM",
                    2_000_000,
                    4,
                    900_000,
                ),
            ),
            (
                ThreadKey { cpu: 3, tid: 23 },
                stats(
                    23,
                    class::INTRUDER_KTHREAD,
                    "kworker/u8:2",
                    40_000,
                    2,
                    30_000,
                ),
            ),
        ];
        obs.maps.counters.events_lost = 3;
        obs.events.add(&migrate_in(2, 700, 0));
        obs.events.add(&migrate_in(2, 700, 1));
        obs.events.add(&owner_away(2, 101, 0));
        obs.events.add(&intrusion(2, 601));
        let mut live = BTreeMap::new();
        live.insert(23, kthread(23, "kworker/u8:2", 3, "0-3"));
        let r = window(&guard(), &own, &obs, &live);
        assert_eq!(r.mode, Mode::Window);
        assert_eq!(r.window_ns, Some(2_000_000_000));
        let cpu2 = &r.cpus[0];
        let t = cpu2.time.as_ref().unwrap();
        assert_eq!(t["idle"].ns, 1_000_000_000);
        assert_eq!(t["idle"].pct, 50.0);
        assert_eq!(t["vcpu"].pct, 25.0);
        // 2 s minus what was accounted: a slice still running at the end.
        assert_eq!(t[UNATTRIBUTED].ns, 2_000_000_000 - 1_502_300_000);
        let short = cpu2.threads.iter().find(|t| t.tid == 601).unwrap();
        assert_eq!(
            (short.run_ns, short.slices, short.comm.as_str()),
            (Some(300_000), Some(1), "pg-short")
        );
        assert_eq!(short.affinity, None, "it exited");
        assert!(short.note.contains("exited since"), "{}", short.note);
        let foreign = cpu2.threads.iter().find(|t| t.tid == 102).unwrap();
        assert_eq!(foreign.class, Class::OtherVcpu);
        // The longest runner comes first.
        assert_eq!(cpu2.threads[0].tid, 102);
        let m = &cpu2.migrations.as_ref().unwrap()[0];
        assert_eq!(
            (m.tid, m.count, m.from_cpus.to_string().as_str()),
            (700, 2, "0-1")
        );
        // CPU 2's own vCPU was moved away; CPU 3's ran on CPU 2.
        let off2 = &cpu2.vcpus_off.as_ref().unwrap()[0];
        assert_eq!(
            (off2.tid, off2.moves, off2.moved_to.to_string().as_str()),
            (101, 1, "0")
        );
        let cpu3 = &r.cpus[1];
        let off3 = &cpu3.vcpus_off.as_ref().unwrap()[0];
        assert_eq!(
            (off3.tid, off3.ran_on.to_string().as_str(), off3.ran_ns),
            (102, "2", 2_000_000)
        );
        let mut kinds: Vec<(u32, Finding, u32)> = r
            .cpus
            .iter()
            .flat_map(|c| c.violations.iter().map(|v| (v.cpu, v.kind, v.tid)))
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            vec![
                (2, Finding::Intruder, 102),
                (2, Finding::Intruder, 601),
                (2, Finding::VcpuOffCpu, 101),
                (2, Finding::MigrationIn, 700),
                (3, Finding::UnboundKthread, 23),
                (3, Finding::VcpuOffCpu, 102),
            ]
        );
        assert_eq!(r.exit_code(), exit::VIOLATIONS);
        assert_eq!(r.summary.events_lost, Some(3));
        assert!(
            r.warnings.iter().any(|w| w.contains("3 events were lost")),
            "{:?}",
            r.warnings
        );
        let text = render(&r);
        assert!(
            text.contains("pg-short") && text.contains("300.0µs"),
            "{text}"
        );
        assert!(text.contains("migrations onto CPU 2: 2"), "{text}");
        assert!(text.contains("idle 1.000s (50.0%)"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["mode"], "window");
        assert_eq!(json["summary"]["events_lost"], 3);
        assert_eq!(json["cpus"][0]["time"]["idle"]["pct"], 50.0);
    }

    #[test]
    fn quiet_window_is_clean() {
        let mut obs = Observation {
            elapsed: Duration::from_millis(500),
            ..Observation::default()
        };
        let mut s = CpuStats::default();
        s.run_ns[class::KERNEL as usize] = 1_000;
        s.run_ns[class::IDLE as usize] = 499_999_000;
        obs.maps.cpu_stats.insert(2, s);
        // Someone changed a thread's affinity: worth a warning, not a violation.
        obs.events.add(&affinity_change(2, 55));
        let r = window(&guard(), &ownership(), &obs, &BTreeMap::new());
        assert_eq!(r.summary.violations, 0, "{}", render(&r));
        assert_eq!(r.exit_code(), exit::OK);
        assert!(render(&r).contains("no intruders"));
        // The affinity change is reported as a warning.
        assert_eq!(r.summary.warnings, 1, "{:?}", r.warnings);
    }
}
