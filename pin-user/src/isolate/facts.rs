//! What the planner needs to know about the host, read once through a
//! [`Host`] root (fixture trees in tests).
use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use crate::host::{
    Host,
    cmdline::{BootConfig, nohz_full_supported},
    cpulist::CpuSet,
    irq,
    procfs::{Proc, ThreadInfo},
    topology::Guard,
};

use super::IsolateError;

/// A kernel file and what it holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub path: PathBuf,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqFact {
    pub irq: u32,
    pub name: String,
    /// `smp_affinity`.
    pub affinity: Value,
    /// The kernel makes `smp_affinity` read-only for IRQs it refuses to move.
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    pub name: &'static str,
    pub value: Value,
}

/// A cgroup v1 cpuset hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpusetV1 {
    pub root: PathBuf,
    pub mems: String,
    pub load_balance: Option<String>,
    /// Child cpusets of the root: name -> cpus.
    pub children: Vec<(String, CpuSet)>,
    /// Our own cpusets when they exist: file name -> text.
    pub housekeeping_files: Option<Vec<(String, String)>>,
    pub guarded_files: Option<Vec<(String, String)>>,
}

/// A cgroup v2 hierarchy with the cpuset controller available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpusetV2 {
    pub root: PathBuf,
    pub subtree_control: String,
    /// Our partition's files when it exists.
    pub partition_files: Option<Vec<(String, String)>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadFact {
    pub info: ThreadInfo,
    /// The thread's cgroup v1 cpuset, relative to the hierarchy's root
    /// ("/", "/machine/..."); `None` when unknown.
    pub cpuset: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub guard: Guard,
    pub self_pid: u32,
    pub sysctls: Vec<Sysctl>,
    pub workqueues: Vec<Value>,
    pub default_irq: Option<Value>,
    pub irqs: Vec<IrqFact>,
    pub v1: Option<CpusetV1>,
    pub v2: Option<CpusetV2>,
    pub threads: Vec<ThreadFact>,
    pub irqbalance_running: bool,
    pub nohz_full_supported: bool,
    pub boot: BootConfig,
}

/// Our cgroup names: one place, so undo and a second run find them.
pub const V1_HOUSEKEEPING: &str = "pinguard-housekeeping";
pub const V1_GUARDED: &str = "pinguard-guarded";
pub const V2_PARTITION: &str = "pinguard.isolated";

/// The sysctls set, in the order they are applied.
pub const SYSCTLS: [&str; 2] = ["kernel.timer_migration", "vm.stat_interval"];

fn read(path: &Path) -> Result<Option<String>, IsolateError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IsolateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn value(path: PathBuf) -> Result<Option<Value>, IsolateError> {
    Ok(read(&path)?.map(|text| Value {
        path,
        text: text.trim().to_string(),
    }))
}

/// A mount point as seen from the host root (`/sys/...` -> `<sys>/...`).
fn under_host(host: &Host, mount_point: &str) -> PathBuf {
    if let Some(rest) = mount_point.strip_prefix("/sys/") {
        host.sys.join(rest)
    } else if let Some(rest) = mount_point.strip_prefix("/proc/") {
        host.proc.join(rest)
    } else {
        PathBuf::from(mount_point)
    }
}

/// The files of one of our cgroups, when it exists.
fn cgroup_files(dir: &Path, names: &[&str]) -> Result<Option<Vec<(String, String)>>, IsolateError> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for n in names {
        if let Some(t) = read(&dir.join(n))? {
            out.push((n.to_string(), t.trim().to_string()));
        }
    }
    Ok(Some(out))
}

pub const V1_FILES: [&str; 4] = [
    "cpuset.cpus",
    "cpuset.mems",
    "cpuset.cpu_exclusive",
    "cpuset.sched_load_balance",
];

fn read_v1(root: PathBuf) -> Result<CpusetV1, IsolateError> {
    let mems = read(&root.join("cpuset.mems"))?.unwrap_or_default();
    let load_balance = read(&root.join("cpuset.sched_load_balance"))?.map(|s| s.trim().into());
    let mut children = Vec::new();
    if let Ok(rd) = fs::read_dir(&root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !e.path().is_dir() || name == V1_HOUSEKEEPING || name == V1_GUARDED {
                continue;
            }
            let cpus = read(&e.path().join("cpuset.cpus"))?
                .and_then(|t| CpuSet::parse(&t).ok())
                .unwrap_or_default();
            children.push((name, cpus));
        }
    }
    children.sort();
    Ok(CpusetV1 {
        housekeeping_files: cgroup_files(&root.join(V1_HOUSEKEEPING), &V1_FILES)?,
        guarded_files: cgroup_files(&root.join(V1_GUARDED), &V1_FILES)?,
        root,
        mems: mems.trim().to_string(),
        load_balance,
        children,
    })
}

/// Reads everything the planner looks at. `guard` must be validated.
pub fn gather(host: &Host, guard: &Guard) -> Result<Facts, IsolateError> {
    let mut sysctls = Vec::new();
    for name in SYSCTLS {
        let path = host.proc.join("sys").join(name.replace('.', "/"));
        if let Some(value) = value(path)? {
            sysctls.push(Sysctl { name, value });
        }
    }

    let wq = host.sys.join("devices/virtual/workqueue");
    let mut workqueues = Vec::new();
    if let Some(v) = value(wq.join("cpumask"))? {
        workqueues.push(v);
    }
    if let Ok(rd) = fs::read_dir(&wq) {
        let mut dirs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in dirs {
            if let Some(v) = value(d.join("cpumask"))? {
                workqueues.push(v);
            }
        }
    }

    let irq_dir = host.proc.join("irq");
    let default_irq = value(irq_dir.join("default_smp_affinity"))?;
    let mut numbers: Vec<u32> = fs::read_dir(&irq_dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    numbers.sort_unstable();
    let mut irqs = Vec::new();
    for n in numbers {
        let dir = irq_dir.join(n.to_string());
        let path = dir.join("smp_affinity");
        let Some(affinity) = value(path.clone())? else {
            continue;
        };
        let writable = fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o200 != 0)
            .unwrap_or(false);
        irqs.push(IrqFact {
            irq: n,
            name: irq::actions(&dir).join(","),
            affinity,
            writable,
        });
    }

    // cgroup mounts: a v1 hierarchy with the cpuset controller, a v2 one.
    let mounts = read(&host.proc.join("mounts"))?.unwrap_or_default();
    let mut v1 = None;
    let mut v2 = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, mp, fstype, opts, ..] = f.as_slice() else {
            continue;
        };
        if *fstype == "cgroup" && opts.split(',').any(|o| o == "cpuset") && v1.is_none() {
            v1 = Some(read_v1(under_host(host, mp))?);
        } else if *fstype == "cgroup2" && v2.is_none() {
            let root = under_host(host, mp);
            let controllers = read(&root.join("cgroup.controllers"))?.unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "cpuset") {
                v2 = Some(CpusetV2 {
                    subtree_control: read(&root.join("cgroup.subtree_control"))?
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                    partition_files: cgroup_files(
                        &root.join(V2_PARTITION),
                        &["cpuset.cpus", "cpuset.cpus.partition"],
                    )?,
                    root,
                });
            }
        }
    }

    let proc = Proc::new(&host.proc);
    let all = proc.all_threads().map_err(|source| IsolateError::Read {
        path: host.proc.clone(),
        source,
    })?;
    let mut threads = Vec::with_capacity(all.len());
    let mut irqbalance_running = false;
    for info in all {
        irqbalance_running |= info.comm == "irqbalance";
        let cpuset = v1.as_ref().and_then(|_| {
            let path = host
                .proc
                .join(info.tgid.to_string())
                .join("task")
                .join(info.tid.to_string())
                .join("cgroup");
            fs::read_to_string(path).ok().and_then(|t| v1_cpuset_of(&t))
        });
        threads.push(ThreadFact { info, cpuset });
    }

    Ok(Facts {
        guard: guard.clone(),
        self_pid: std::process::id(),
        sysctls,
        workqueues,
        default_irq,
        irqs,
        v1,
        v2,
        threads,
        irqbalance_running,
        nohz_full_supported: nohz_full_supported(&host.sys),
        boot: BootConfig::detect(&host.etc),
    })
}

/// The cpuset path in a `/proc/<tid>/cgroup` text ("3:cpuset:/machine").
pub fn v1_cpuset_of(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == "cpuset")
            .then(|| path.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolate::{Mechanism, plan::plan};

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// A cgroup v2 host (cpuset controller available, our partition half
    /// there from an interrupted run) as a fixture tree.
    #[test]
    fn v2_partition_from_a_fixture_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        put(
            r,
            "proc/mounts",
            "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n",
        );
        put(
            r,
            "sys/fs/cgroup/cgroup.controllers",
            "cpuset cpu io memory pids\n",
        );
        put(
            r,
            "sys/fs/cgroup/cgroup.subtree_control",
            "cpuset cpu memory\n",
        );
        put(r, "sys/fs/cgroup/pinguard.isolated/cpuset.cpus", "1\n");
        put(
            r,
            "sys/fs/cgroup/pinguard.isolated/cpuset.cpus.partition",
            "member\n",
        );
        put(r, "proc/irq/24/smp_affinity", "3\n");
        put(r, "proc/irq/default_smp_affinity", "1\n");
        put(r, "proc/sys/kernel/timer_migration", "0\n");
        put(r, "sys/devices/virtual/workqueue/cpumask", "1\n");
        fs::create_dir_all(r.join("etc/kernel")).unwrap();
        put(r, "etc/kernel/cmdline", "root=/dev/vda\n");
        let host = Host::under(r);
        let guard = Guard {
            guarded: CpuSet::single(1),
            housekeeping: CpuSet::single(0),
        };
        let facts = gather(&host, &guard).unwrap();
        assert!(facts.v1.is_none());
        let v2 = facts.v2.as_ref().unwrap();
        assert_eq!(v2.root, r.join("sys/fs/cgroup"));
        assert_eq!(facts.boot, BootConfig::KernelInstall);
        assert!(!facts.nohz_full_supported);
        let p = plan(&facts, None).unwrap();
        assert_eq!(p.mechanism, Mechanism::Partition);
        // Only the partition type is wrong; the controller is on, the CPUs are right.
        let targets: Vec<String> = p
            .changes
            .iter()
            .map(|c| format!("{} {}", c.target, c.before_after()))
            .collect();
        let part = r.join("sys/fs/cgroup/pinguard.isolated");
        assert_eq!(
            targets,
            vec![
                "IRQ 24 (?) 3 -> 1".to_string(),
                format!(
                    "{}/cpuset.cpus.partition member -> isolated",
                    part.display()
                ),
            ]
        );
    }

    #[test]
    fn cpuset_line() {
        let t = "12:pids:/\n3:cpuset:/machine/qemu-1.libvirt-qemu/vcpu0\n0::/init.scope\n";
        assert_eq!(
            v1_cpuset_of(t).as_deref(),
            Some("/machine/qemu-1.libvirt-qemu/vcpu0")
        );
        assert_eq!(v1_cpuset_of("0::/\n"), None);
    }
}
