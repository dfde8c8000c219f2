//! The planner: facts in, changes out. Pure, so every rule is unit-tested
//! without touching a host. A value that is already right yields no change,
//! which makes a second run a no-op.
use std::collections::BTreeMap;

use super::{
    Action, Change, Compare, IsolateError, Mechanism, Plan, Reboot, ThreadId, Unchanged, What,
    facts::{CpusetV1, CpusetV2, Facts, V1_GUARDED, V1_HOUSEKEEPING, V2_PARTITION},
};
use crate::host::{cpulist::CpuSet, procfs::ThreadInfo};

/// Picks the mechanism: the one asked for, or the best available.
pub fn mechanism(facts: &Facts, wanted: Option<Mechanism>) -> Result<Mechanism, IsolateError> {
    match wanted {
        None if facts.v2.is_some() => Ok(Mechanism::Partition),
        None if facts.v1.is_some() => Ok(Mechanism::Shield),
        None | Some(Mechanism::Affinity) => Ok(Mechanism::Affinity),
        Some(Mechanism::Partition) if facts.v2.is_none() => {
            Err(IsolateError::MechanismUnavailable {
                wanted: Mechanism::Partition,
                why: "no cgroup v2 hierarchy with the cpuset controller is mounted".into(),
            })
        }
        Some(Mechanism::Shield) if facts.v1.is_none() => Err(IsolateError::MechanismUnavailable {
            wanted: Mechanism::Shield,
            why: "no cgroup v1 cpuset hierarchy is mounted".into(),
        }),
        Some(m) => Ok(m),
    }
}

/// An exiting thread: it can neither move nor change affinity.
fn exiting(t: &ThreadInfo) -> bool {
    matches!(t.state, 'Z' | 'X' | 'x')
}

/// A QEMU/KVM vCPU thread ("CPU 0/KVM"): `pinguard pin` places it.
fn is_vcpu(t: &ThreadInfo) -> bool {
    t.comm
        .strip_prefix("CPU ")
        .and_then(|r| r.strip_suffix("/KVM"))
        .is_some_and(|n| n.parse::<u32>().is_ok())
}

fn id(t: &ThreadInfo) -> ThreadId {
    ThreadId {
        tid: t.tid,
        tgid: t.tgid,
        start_time: t.start_time,
        comm: t.comm.clone(),
    }
}

pub fn plan(facts: &Facts, wanted: Option<Mechanism>) -> Result<Plan, IsolateError> {
    let mechanism = mechanism(facts, wanted)?;
    let g = &facts.guard.guarded;
    let hk = &facts.guard.housekeeping;
    let mut p = Plan {
        guarded: g.clone(),
        housekeeping: hk.clone(),
        mechanism,
        changes: Vec::new(),
        unchanged: Vec::new(),
        reboot: None,
    };

    for s in &facts.sysctls {
        let (after, why) = match s.name {
            "kernel.timer_migration" => (
                "0",
                "idle CPUs hand their timers to busy ones, and a CPU running a vCPU is always busy: 0 keeps each timer on the CPU that armed it",
            ),
            "vm.stat_interval" => (
                "10",
                "the per-CPU VM statistics work wakes every CPU each second; every 10 s disturbs guarded CPUs less (TuneD cpu-partitioning)",
            ),
            _ => continue,
        };
        if s.value.text.trim() != after {
            p.changes.push(Change {
                what: What::Sysctl,
                target: s.name.to_string(),
                action: Action::Write {
                    path: s.value.path.clone(),
                    before: Some(s.value.text.clone()),
                    after: after.into(),
                    compare: Compare::Text,
                },
                why: why.into(),
                may_be_refused: false,
            });
        }
    }

    for wq in &facts.workqueues {
        let Ok(mask) = CpuSet::parse_mask(&wq.text) else {
            continue;
        };
        if !mask.intersects(g) {
            continue;
        }
        let global = wq.path.parent().and_then(|p| p.file_name()) == Some("workqueue".as_ref());
        let (target, why) = if global {
            (
                "unbound workqueues".to_string(),
                "unbound kernel work (kworker/u*) runs only on housekeeping CPUs",
            )
        } else {
            let name = wq
                .path
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (
                format!("workqueue {name}"),
                "this workqueue's work (writeback, ...) runs only on housekeeping CPUs",
            )
        };
        p.changes.push(Change {
            what: What::Workqueue,
            target,
            action: Action::Write {
                path: wq.path.clone(),
                before: Some(wq.text.clone()),
                after: hk.to_mask(),
                compare: Compare::Mask,
            },
            why: why.into(),
            may_be_refused: false,
        });
    }

    if let Some(d) = &facts.default_irq
        && CpuSet::parse_mask(&d.text).is_ok_and(|m| m.intersects(g))
    {
        p.changes.push(Change {
            what: What::DefaultIrqAffinity,
            target: "default IRQ affinity".into(),
            action: Action::Write {
                path: d.path.clone(),
                before: Some(d.text.clone()),
                after: hk.to_mask(),
                compare: Compare::Mask,
            },
            why: "IRQs set up from now on start on housekeeping CPUs".into(),
            may_be_refused: false,
        });
    }

    let mut managed = Vec::new();
    for irq in &facts.irqs {
        // The timer and the PIC cascade stay where the kernel put them.
        if irq.irq == 0 || irq.irq == 2 {
            continue;
        }
        let Ok(mask) = CpuSet::parse_mask(&irq.affinity.text) else {
            continue;
        };
        if !mask.intersects(g) {
            continue;
        }
        let target = format!(
            "IRQ {} ({})",
            irq.irq,
            if irq.name.is_empty() { "?" } else { &irq.name }
        );
        if !irq.writable {
            managed.push(target);
            continue;
        }
        let keep = mask.intersection(hk);
        let after = if keep.is_empty() { hk.clone() } else { keep };
        p.changes.push(Change {
            what: What::Irq,
            target,
            action: Action::Write {
                path: irq.affinity.path.clone(),
                before: Some(irq.affinity.text.clone()),
                after: after.to_mask(),
                compare: Compare::Mask,
            },
            why: "its interrupts are delivered to housekeeping CPUs".into(),
            // Kernel-managed IRQs refuse with EIO even when the file is writable.
            may_be_refused: true,
        });
    }
    for target in managed {
        p.unchanged.push(managed_irq(target, g));
    }

    match mechanism {
        Mechanism::Partition => partition(facts, facts.v2.as_ref().expect("checked"), &mut p),
        Mechanism::Shield => shield(facts, facts.v1.as_ref().expect("checked"), &mut p),
        Mechanism::Affinity => affinities(facts, &mut p),
    }

    if facts.irqbalance_running {
        p.unchanged.push(Unchanged {
            what: What::Irq,
            target: "irqbalance".into(),
            why: format!(
                "irqbalance runs and may move IRQs back onto guarded CPUs: set IRQBALANCE_BANNED_CPULIST={g} in its \
                 configuration (/etc/default/irqbalance or /etc/sysconfig/irqbalance) and restart it (not changed by pinguard)"
            ),
        });
    }

    let mut params = format!("isolcpus=managed_irq,domain,{g}");
    if facts.nohz_full_supported {
        params.push_str(&format!(" nohz_full={g}"));
    }
    params.push_str(&format!(" rcu_nocbs={g} irqaffinity={hk}"));
    p.reboot = Some(Reboot {
        params,
        howto: format!("add them {}", facts.boot.howto()),
        why: format!(
            "kernel-managed IRQs and boot-time kernel threads kept off CPUs {g}, their RCU callbacks moved off{}",
            if facts.nohz_full_supported {
                ", the scheduler tick stopped"
            } else {
                " (no nohz_full=: this kernel lacks CONFIG_NO_HZ_FULL and would ignore it)"
            }
        ),
    });
    Ok(p)
}

fn managed_irq(target: String, g: &CpuSet) -> Unchanged {
    Unchanged {
        what: What::Irq,
        target,
        why: format!(
            "kernel-managed: its affinity cannot change at runtime; isolcpus=managed_irq,domain,{g} at boot keeps it off"
        ),
    }
}

/// A cgroup file write, `before` is `None` inside a cgroup this plan creates.
fn cg_write(
    p: &mut Plan,
    dir: &std::path::Path,
    file: &str,
    before: Option<&str>,
    after: &str,
    compare: Compare,
    why: &str,
) {
    if before.is_some_and(|b| compare.same(b, after)) {
        return;
    }
    p.changes.push(Change {
        what: What::Cgroup,
        target: format!("{}/{file}", dir.display()),
        action: Action::Write {
            path: dir.join(file),
            before: before.map(str::to_string),
            after: after.to_string(),
            compare,
        },
        why: why.into(),
        may_be_refused: false,
    });
}

fn mkdir(p: &mut Plan, dir: &std::path::Path, tasks_file: &str, why: &str) {
    p.changes.push(Change {
        what: What::Cgroup,
        target: dir.display().to_string(),
        action: Action::Mkdir {
            path: dir.to_path_buf(),
            tasks_file: tasks_file.into(),
        },
        why: why.into(),
        may_be_refused: false,
    });
}

/// cgroup v2: a partition `isolated` holding the guarded CPUs, which takes
/// them out of every other cgroup's effective CPUs and out of load balancing.
fn partition(facts: &Facts, v2: &CpusetV2, p: &mut Plan) {
    let g = &facts.guard.guarded;
    if !v2.subtree_control.split_whitespace().any(|c| c == "cpuset") {
        p.changes.push(Change {
            what: What::Cgroup,
            target: format!("{}/cgroup.subtree_control", v2.root.display()),
            action: Action::EnableController {
                path: v2.root.join("cgroup.subtree_control"),
                controller: "cpuset".into(),
            },
            why: "child cgroups get the cpuset controller".into(),
            may_be_refused: false,
        });
    }
    let dir = v2.root.join(V2_PARTITION);
    let existing = v2.partition_files.as_ref();
    let file =
        |n: &str| existing.and_then(|f| f.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str()));
    if existing.is_none() {
        mkdir(p, &dir, "cgroup.procs", "the isolated partition");
    }
    fn new(exists: bool, v: Option<&str>) -> Option<&str> {
        exists.then(|| v.unwrap_or(""))
    }
    let exists = existing.is_some();
    cg_write(
        p,
        &dir,
        "cpuset.cpus",
        new(exists, file("cpuset.cpus")),
        &g.to_string(),
        Compare::List,
        "the partition's CPUs are the guarded ones",
    );
    cg_write(
        p,
        &dir,
        "cpuset.cpus.partition",
        new(exists, file("cpuset.cpus.partition")),
        "isolated",
        Compare::Text,
        "an isolated partition: no other cgroup's task runs there, no load balancing",
    );
    let vcpus = facts.threads.iter().filter(|t| is_vcpu(&t.info)).count();
    if vcpus > 0 {
        p.unchanged.push(Unchanged {
            what: What::Task,
            target: format!("{vcpus} vCPU thread(s)"),
            why: format!(
                "cgroup v2 moves whole processes: put each guest's vCPUs in {} through its manager (libvirt, systemd), then `pinguard pin`",
                dir.display()
            ),
        });
    }
}

/// cgroup v1: every movable task in a housekeeping cpuset, vCPUs in a
/// guarded one, load balancing off on the guarded CPUs.
fn shield(facts: &Facts, v1: &CpusetV1, p: &mut Plan) {
    let g = &facts.guard.guarded;
    let hk = &facts.guard.housekeeping;
    let hk_dir = v1.root.join(V1_HOUSEKEEPING);
    let g_dir = v1.root.join(V1_GUARDED);
    // Another cpuset (libvirt's machine, ...) spanning guarded CPUs keeps
    // them in a load-balancing domain and forbids an exclusive guarded set.
    let overlapping: Vec<&(String, CpuSet)> = v1
        .children
        .iter()
        .filter(|(_, c)| c.intersects(g))
        .collect();
    for (name, cpus) in &overlapping {
        p.unchanged.push(Unchanged {
            what: What::Cgroup,
            target: format!("{}/{name}", v1.root.display()),
            why: format!(
                "another manager's cpuset spans guarded CPUs ({cpus}): its tasks are left to it, the guarded cpuset is not \
                 exclusive and the guarded CPUs stay in a load-balancing domain"
            ),
        });
    }
    let files = |set: &Option<Vec<(String, String)>>| set.clone();
    for (dir, existing, cpus, why) in [
        (
            &hk_dir,
            files(&v1.housekeeping_files),
            hk,
            "every movable task runs here",
        ),
        (&g_dir, files(&v1.guarded_files), g, "the vCPUs run here"),
    ] {
        if existing.is_none() {
            mkdir(p, dir, "tasks", why);
        }
        let get = |n: &str| {
            existing.as_ref().map(|f| {
                f.iter()
                    .find(|(k, _)| k == n)
                    .map_or("", |(_, v)| v.as_str())
                    .to_string()
            })
        };
        // mems before cpus: the kernel refuses tasks in a cpuset without both.
        cg_write(
            p,
            dir,
            "cpuset.mems",
            get("cpuset.mems").as_deref(),
            &v1.mems,
            Compare::List,
            "memory nodes: the same as the root's",
        );
        cg_write(
            p,
            dir,
            "cpuset.cpus",
            get("cpuset.cpus").as_deref(),
            &cpus.to_string(),
            Compare::List,
            why,
        );
        if dir == &g_dir {
            if overlapping.is_empty() {
                cg_write(
                    p,
                    dir,
                    "cpuset.cpu_exclusive",
                    get("cpuset.cpu_exclusive").as_deref(),
                    "1",
                    Compare::Text,
                    "no sibling cpuset may use the guarded CPUs",
                );
            }
            cg_write(
                p,
                dir,
                "cpuset.sched_load_balance",
                get("cpuset.sched_load_balance").as_deref(),
                "0",
                Compare::Text,
                "the scheduler does not balance load onto the guarded CPUs",
            );
        }
    }
    if overlapping.is_empty()
        && let Some(lb) = &v1.load_balance
    {
        cg_write(
            p,
            &v1.root,
            "cpuset.sched_load_balance",
            Some(lb),
            "0",
            Compare::Text,
            "load-balancing domains come from the child cpusets: the housekeeping CPUs only",
        );
    }

    let mut percpu: BTreeMap<String, usize> = BTreeMap::new();
    let mut elsewhere: BTreeMap<String, usize> = BTreeMap::new();
    let hk_rel = format!("/{V1_HOUSEKEEPING}");
    let g_rel = format!("/{V1_GUARDED}");
    for t in &facts.threads {
        let info = &t.info;
        if info.tgid == facts.self_pid || exiting(info) {
            continue;
        }
        let Some(cs) = &t.cpuset else {
            continue;
        };
        // A guest started after isolate inherits the housekeeping cpuset
        // from its parent: its vCPUs belong on the guarded side.
        if cs == &hk_rel && is_vcpu(info) {
            p.changes.push(Change {
                what: What::Task,
                target: id(info).to_string(),
                action: Action::MoveTask {
                    thread: id(info),
                    root: v1.root.clone(),
                    from: cs.clone(),
                    to: g_rel.clone(),
                    affinity: info.allowed.clone(),
                },
                why: "a vCPU started after isolate: `pinguard pin` gives it its guarded CPU".into(),
                may_be_refused: false,
            });
            continue;
        }
        if cs != "/" {
            if cs != &hk_rel && cs != &g_rel {
                *elsewhere.entry(cs.clone()).or_default() += 1;
            }
            continue;
        }
        if info.no_setaffinity() {
            if info.allowed.intersects(g) {
                *percpu.entry(kthread_family(&info.comm)).or_default() += 1;
            }
            continue;
        }
        if is_kthreadd(info) {
            // Cgroups refuse to move kthreadd; its affinity they do not guard.
            if info.allowed.intersects(g) {
                let keep = info.allowed.difference(g);
                p.changes.push(Change {
                    what: What::Thread,
                    target: id(info).to_string(),
                    action: Action::Affinity {
                        thread: id(info),
                        before: info.allowed.clone(),
                        after: if keep.is_empty() { hk.clone() } else { keep },
                    },
                    why: "the kernel keeps kthreadd in the root cpuset, but its affinity may change: it stays off guarded CPUs".into(),
                    may_be_refused: false,
                });
            }
            continue;
        }
        let (to, why) = if is_vcpu(info) {
            (
                g_rel.clone(),
                "a vCPU: `pinguard pin` gives it its guarded CPU",
            )
        } else {
            (hk_rel.clone(), "runs on housekeeping CPUs only")
        };
        p.changes.push(Change {
            what: What::Task,
            target: id(info).to_string(),
            action: Action::MoveTask {
                thread: id(info),
                root: v1.root.clone(),
                from: cs.clone(),
                to,
                affinity: info.allowed.clone(),
            },
            why: why.into(),
            may_be_refused: false,
        });
    }
    push_percpu(p, percpu);
    for (cs, n) in elsewhere {
        p.unchanged.push(Unchanged {
            what: What::Task,
            target: format!("{n} thread(s) in cpuset {cs}"),
            why: "their cgroup's manager (libvirt, systemd, kubelet) places them; pinguard does not move them out".into(),
        });
    }
}

/// The kernel thread that creates the others: cgroups refuse to move it.
fn is_kthreadd(t: &ThreadInfo) -> bool {
    t.is_kthread() && t.tgid == 2
}

/// "ksoftirqd/1" -> "ksoftirqd", "kworker/1:0H-events" -> "kworker".
fn kthread_family(comm: &str) -> String {
    comm.split('/').next().unwrap_or(comm).to_string()
}

fn push_percpu(p: &mut Plan, percpu: BTreeMap<String, usize>) {
    if percpu.is_empty() {
        return;
    }
    let names: Vec<String> = percpu.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    p.unchanged.push(Unchanged {
        what: What::Thread,
        target: format!("kernel threads ({})", names.join(", ")),
        why: "placed by the kernel itself (PF_NO_SETAFFINITY): per-CPU threads run only when their CPU has work for them, \
              workqueue workers follow the workqueue cpumask".into(),
    });
}

/// No usable cpuset: every thread that allows it loses the guarded CPUs.
fn affinities(facts: &Facts, p: &mut Plan) {
    let g = &facts.guard.guarded;
    let hk = &facts.guard.housekeeping;
    let mut percpu: BTreeMap<String, usize> = BTreeMap::new();
    let mut vcpus = 0;
    for t in &facts.threads {
        let info: &ThreadInfo = &t.info;
        if info.tgid == facts.self_pid || exiting(info) || !info.allowed.intersects(g) {
            continue;
        }
        if info.no_setaffinity() {
            *percpu.entry(kthread_family(&info.comm)).or_default() += 1;
            continue;
        }
        if is_vcpu(info) {
            vcpus += 1;
            continue;
        }
        let keep = info.allowed.difference(g);
        let after = if keep.is_empty() { hk.clone() } else { keep };
        p.changes.push(Change {
            what: What::Thread,
            target: id(info).to_string(),
            action: Action::Affinity {
                thread: id(info),
                before: info.allowed.clone(),
                after,
            },
            why: "runs on housekeeping CPUs only (threads it creates inherit that)".into(),
            may_be_refused: false,
        });
    }
    push_percpu(p, percpu);
    if vcpus > 0 {
        p.unchanged.push(Unchanged {
            what: What::Thread,
            target: format!("{vcpus} vCPU thread(s)"),
            why: "placed by `pinguard pin`".into(),
        });
    }
}

/// A thread for tests that build facts by hand.
#[cfg(test)]
pub fn thread(
    tid: u32,
    tgid: u32,
    comm: &str,
    flags: u32,
    allowed: &str,
    cpuset: Option<&str>,
) -> super::facts::ThreadFact {
    super::facts::ThreadFact {
        info: ThreadInfo {
            tgid,
            tid,
            comm: comm.into(),
            state: 'S',
            flags,
            last_cpu: 0,
            allowed: CpuSet::parse(allowed).unwrap(),
            start_time: u64::from(tid) * 10,
            sched: None,
        },
        cpuset: cpuset.map(str::to_string),
    }
}

#[cfg(test)]
pub mod tests_support {
    use std::path::PathBuf;

    use pin_common::{PF_KTHREAD, PF_NO_SETAFFINITY};

    use super::*;
    use crate::{
        host::{cmdline::BootConfig, topology::Guard},
        isolate::facts::{IrqFact, Sysctl, ThreadFact, Value},
    };

    pub fn set(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

    fn value(path: &str, text: &str) -> Value {
        Value {
            path: PathBuf::from(path),
            text: text.into(),
        }
    }

    pub const ME: u32 = 900;

    /// A 2-CPU host guarding CPU 1 with nothing isolated yet.
    pub fn host(v1: bool, v2: bool) -> Facts {
        Facts {
            guard: Guard {
                guarded: set("1"),
                housekeeping: set("0"),
            },
            self_pid: ME,
            sysctls: vec![
                Sysctl {
                    name: "kernel.timer_migration",
                    value: value("/proc/sys/kernel/timer_migration", "1"),
                },
                Sysctl {
                    name: "vm.stat_interval",
                    value: value("/proc/sys/vm/stat_interval", "1"),
                },
            ],
            workqueues: vec![
                value("/sys/devices/virtual/workqueue/cpumask", "3"),
                value("/sys/devices/virtual/workqueue/writeback/cpumask", "3"),
            ],
            default_irq: Some(value("/proc/irq/default_smp_affinity", "3")),
            irqs: vec![
                IrqFact {
                    irq: 24,
                    name: "ttyS0".into(),
                    affinity: value("/proc/irq/24/smp_affinity", "3"),
                    writable: true,
                },
                IrqFact {
                    irq: 36,
                    name: "virtio1-req.0".into(),
                    affinity: value("/proc/irq/36/smp_affinity", "3"),
                    writable: false,
                },
                IrqFact {
                    irq: 40,
                    name: "already-off".into(),
                    affinity: value("/proc/irq/40/smp_affinity", "1"),
                    writable: true,
                },
            ],
            v1: v1.then(|| CpusetV1 {
                root: "/sys/fs/cgroup/cpuset".into(),
                mems: "0".into(),
                load_balance: Some("1".into()),
                children: vec![],
                housekeeping_files: None,
                guarded_files: None,
            }),
            v2: v2.then(|| CpusetV2 {
                root: "/sys/fs/cgroup".into(),
                subtree_control: "memory".into(),
                partition_files: None,
            }),
            threads: vec![
                thread(1, 1, "systemd", 0, "0-1", Some("/")),
                thread(2, 2, "kthreadd", PF_KTHREAD, "0-1", Some("/")),
                thread(
                    20,
                    20,
                    "ksoftirqd/1",
                    PF_KTHREAD | PF_NO_SETAFFINITY,
                    "1",
                    Some("/"),
                ),
                thread(30, 30, "rcu_preempt", PF_KTHREAD, "0-1", Some("/")),
                thread(100, 100, "qemu-system-x86", 0, "0-1", Some("/")),
                thread(101, 100, "CPU 0/KVM", 0, "0-1", Some("/")),
                thread(200, 200, "pinned", 0, "1", Some("/")),
                thread(300, 300, "libvirt-guest", 0, "0-1", Some("/machine/vm1")),
                thread(ME, ME, "pinguard", 0, "0", Some("/")),
                ThreadFact {
                    info: ThreadInfo {
                        state: 'Z',
                        ..thread(400, 400, "zombie", 0, "0-1", Some("/")).info
                    },
                    cpuset: Some("/".into()),
                },
            ],
            irqbalance_running: false,
            nohz_full_supported: false,
            boot: BootConfig::Grub,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{tests_support::*, *};
    use crate::host::cmdline::BootConfig;

    fn targets(p: &Plan, what: What) -> Vec<String> {
        p.changes
            .iter()
            .filter(|c| c.what == what)
            .map(|c| c.target.clone())
            .collect()
    }

    fn write_after(p: &Plan, target: &str) -> String {
        match &p
            .changes
            .iter()
            .find(|c| c.target == target)
            .unwrap()
            .action
        {
            Action::Write { after, .. } => after.clone(),
            a => panic!("{target}: expected a write, got {a:?}"),
        }
    }

    #[test]
    fn irqs_workqueues_sysctls_go_to_housekeeping() {
        let p = plan(&host(false, false), None).unwrap();
        assert_eq!(p.mechanism, Mechanism::Affinity);
        assert_eq!(
            targets(&p, What::Sysctl),
            ["kernel.timer_migration", "vm.stat_interval"]
        );
        assert_eq!(write_after(&p, "kernel.timer_migration"), "0");
        assert_eq!(write_after(&p, "unbound workqueues"), "1", "a hex mask");
        assert_eq!(write_after(&p, "workqueue writeback"), "1");
        assert_eq!(write_after(&p, "default IRQ affinity"), "1");
        // IRQ 40 is already off CPU 1; IRQ 36 is kernel-managed: listed, not changed.
        assert_eq!(targets(&p, What::Irq), ["IRQ 24 (ttyS0)"]);
        assert_eq!(write_after(&p, "IRQ 24 (ttyS0)"), "1");
        let managed = p
            .unchanged
            .iter()
            .find(|u| u.target.contains("IRQ 36"))
            .unwrap();
        assert!(managed.why.contains("managed_irq"), "{managed:?}");
        assert!(p.changes.iter().all(|c| !c.why.is_empty()));
    }

    #[test]
    fn reboot_lists_only_what_this_kernel_honours() {
        let mut f = host(false, false);
        let r = plan(&f, None).unwrap().reboot.unwrap();
        assert_eq!(
            r.params,
            "isolcpus=managed_irq,domain,1 rcu_nocbs=1 irqaffinity=0"
        );
        assert!(r.why.contains("CONFIG_NO_HZ_FULL"), "{}", r.why);
        assert!(r.howto.contains("/etc/default/grub"), "{}", r.howto);
        f.nohz_full_supported = true;
        f.boot = BootConfig::Unknown;
        let r = plan(&f, None).unwrap().reboot.unwrap();
        assert!(r.params.contains(" nohz_full=1 "), "{}", r.params);
        assert!(!r.howto.contains("grub2-mkconfig"), "{}", r.howto);
    }

    #[test]
    fn affinity_fallback_moves_every_thread_that_allows_it() {
        let p = plan(&host(false, false), Some(Mechanism::Affinity)).unwrap();
        let moved: Vec<(u32, CpuSet)> = p
            .changes
            .iter()
            .filter_map(|c| match &c.action {
                Action::Affinity { thread, after, .. } => Some((thread.tid, after.clone())),
                _ => None,
            })
            .collect();
        // Not ksoftirqd/1 (per-CPU), not the vCPU (pin places it), not pinguard.
        // kthreadd is an unbound kernel thread: it may move. A thread allowed
        // only CPU 1 goes to the housekeeping CPUs.
        assert_eq!(
            moved,
            vec![
                (1, set("0")),
                (2, set("0")),
                (30, set("0")),
                (100, set("0")),
                (200, set("0")),
                (300, set("0")),
            ]
        );
        assert!(
            p.unchanged
                .iter()
                .any(|u| u.target.contains("ksoftirqd x1"))
        );
        assert!(p.unchanged.iter().any(|u| u.target == "1 vCPU thread(s)"));
    }

    #[test]
    fn v1_shield_moves_root_tasks_and_puts_vcpus_on_the_guarded_side() {
        let f = host(true, false);
        let p = plan(&f, None).unwrap();
        assert_eq!(p.mechanism, Mechanism::Shield);
        let cg = targets(&p, What::Cgroup);
        assert_eq!(
            cg,
            [
                "/sys/fs/cgroup/cpuset/pinguard-housekeeping",
                "/sys/fs/cgroup/cpuset/pinguard-housekeeping/cpuset.mems",
                "/sys/fs/cgroup/cpuset/pinguard-housekeeping/cpuset.cpus",
                "/sys/fs/cgroup/cpuset/pinguard-guarded",
                "/sys/fs/cgroup/cpuset/pinguard-guarded/cpuset.mems",
                "/sys/fs/cgroup/cpuset/pinguard-guarded/cpuset.cpus",
                "/sys/fs/cgroup/cpuset/pinguard-guarded/cpuset.cpu_exclusive",
                "/sys/fs/cgroup/cpuset/pinguard-guarded/cpuset.sched_load_balance",
                "/sys/fs/cgroup/cpuset/cpuset.sched_load_balance",
            ]
        );
        let moves: Vec<(u32, String)> = p
            .changes
            .iter()
            .filter_map(|c| match &c.action {
                Action::MoveTask { thread, to, .. } => Some((thread.tid, to.clone())),
                _ => None,
            })
            .collect();
        let hk = "/pinguard-housekeeping".to_string();
        assert_eq!(
            moves,
            vec![
                (1, hk.clone()),
                (30, hk.clone()),
                (100, hk.clone()),
                (101, "/pinguard-guarded".into()),
                (200, hk),
            ]
        );
        let why: Vec<&str> = p.unchanged.iter().map(|u| u.target.as_str()).collect();
        assert!(
            why.contains(&"1 thread(s) in cpuset /machine/vm1"),
            "{why:?}"
        );
        // kthreadd cannot change cpuset, but its affinity can.
        assert_eq!(targets(&p, What::Thread), ["tid 2 (kthreadd)"]);
    }

    #[test]
    fn v1_shield_moves_vcpus_of_guests_started_after_isolate() {
        let mut f = host(true, false);
        for t in &mut f.threads {
            if t.info.tgid == 100 {
                t.cpuset = Some("/pinguard-housekeeping".into());
            }
        }
        let p = plan(&f, None).unwrap();
        let moves: Vec<(u32, String, String)> = p
            .changes
            .iter()
            .filter_map(|c| match &c.action {
                Action::MoveTask {
                    thread, from, to, ..
                } if thread.tgid == 100 => Some((thread.tid, from.clone(), to.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            moves,
            vec![(
                101,
                "/pinguard-housekeeping".to_string(),
                "/pinguard-guarded".to_string()
            )]
        );
    }

    #[test]
    fn v1_shield_beside_another_managers_cpuset_is_not_exclusive() {
        let mut f = host(true, false);
        f.v1.as_mut().unwrap().children = vec![("machine".into(), set("0-1"))];
        let p = plan(&f, None).unwrap();
        let cg = targets(&p, What::Cgroup);
        assert!(!cg.iter().any(|t| t.ends_with("cpu_exclusive")), "{cg:?}");
        assert!(
            !cg.contains(&"/sys/fs/cgroup/cpuset/cpuset.sched_load_balance".to_string()),
            "{cg:?}"
        );
        assert!(p.unchanged.iter().any(|u| u.target.ends_with("/machine")));
    }

    #[test]
    fn second_run_changes_nothing() {
        let mut f = host(true, false);
        for s in &mut f.sysctls {
            s.value.text = if s.name == "vm.stat_interval" {
                "10"
            } else {
                "0"
            }
            .into();
        }
        for w in &mut f.workqueues {
            w.text = "00000001".into();
        }
        f.default_irq.as_mut().unwrap().text = "1".into();
        f.irqs[0].affinity.text = "1".into();
        let v1 = f.v1.as_mut().unwrap();
        v1.load_balance = Some("0".into());
        let files = |cpus: &str, excl: &str, lb: &str| {
            Some(vec![
                ("cpuset.cpus".to_string(), cpus.to_string()),
                ("cpuset.mems".to_string(), "0".to_string()),
                ("cpuset.cpu_exclusive".to_string(), excl.to_string()),
                ("cpuset.sched_load_balance".to_string(), lb.to_string()),
            ])
        };
        v1.housekeeping_files = files("0", "0", "1");
        v1.guarded_files = files("1", "1", "0");
        for t in &mut f.threads {
            if t.cpuset.as_deref() == Some("/") && t.info.tid != ME && !t.info.no_setaffinity() {
                t.cpuset = Some(if t.info.comm == "CPU 0/KVM" {
                    "/pinguard-guarded".into()
                } else {
                    "/pinguard-housekeeping".into()
                });
            }
        }
        // kthreadd stays in the root cpuset, as the kernel insists, its affinity narrowed.
        f.threads[1].cpuset = Some("/".into());
        f.threads[1].info.allowed = set("0");
        let p = plan(&f, None).unwrap();
        assert!(p.changes.is_empty(), "{:#?}", p.changes);
    }

    #[test]
    fn v2_partition_plan() {
        let p = plan(&host(true, true), None).unwrap();
        assert_eq!(p.mechanism, Mechanism::Partition);
        let cg: Vec<(String, String)> = p
            .changes
            .iter()
            .filter(|c| c.what == What::Cgroup)
            .map(|c| (c.target.clone(), c.before_after()))
            .collect();
        assert_eq!(
            cg,
            vec![
                (
                    "/sys/fs/cgroup/cgroup.subtree_control".into(),
                    "+cpuset".into()
                ),
                (
                    "/sys/fs/cgroup/pinguard.isolated".into(),
                    "(absent) -> created".into()
                ),
                (
                    "/sys/fs/cgroup/pinguard.isolated/cpuset.cpus".into(),
                    "(new) -> 1".into()
                ),
                (
                    "/sys/fs/cgroup/pinguard.isolated/cpuset.cpus.partition".into(),
                    "(new) -> isolated".into()
                ),
            ]
        );
        // No task moves: the partition takes the CPUs from everyone else.
        assert!(targets(&p, What::Task).is_empty());
        assert!(p.unchanged.iter().any(|u| u.target == "1 vCPU thread(s)"));
    }

    #[test]
    fn unavailable_mechanism_is_refused_by_name() {
        let e = plan(&host(false, false), Some(Mechanism::Shield)).unwrap_err();
        assert!(
            e.to_string().contains("no cgroup v1 cpuset hierarchy"),
            "{e}"
        );
        let e = plan(&host(true, false), Some(Mechanism::Partition)).unwrap_err();
        assert!(e.to_string().contains("cgroup v2"), "{e}");
        assert_eq!(
            plan(&host(true, true), Some(Mechanism::Shield))
                .unwrap()
                .mechanism,
            Mechanism::Shield
        );
    }
}
