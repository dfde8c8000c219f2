//! Host CPU topology from sysfs: online and isolated CPUs, nohz_full, SMT
//! siblings, cores, packages and NUMA nodes; and the guarded/housekeeping split.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::host::cpulist::{CpuListError, CpuSet};

#[derive(Debug, Error)]
pub enum TopologyError {
    // The underlying errors are part of the message rather than `source()`,
    // so `{:#}` chains (anyhow) do not print them twice.
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: io::Error },
    #[error("cannot parse {path}: {error}")]
    Parse { path: PathBuf, error: CpuListError },
    #[error("cannot parse {path}: {value:?} is not a number")]
    BadNumber { path: PathBuf, value: String },
    #[error(
        "no CPUs to guard: /sys/devices/system/cpu/isolated is empty and --guard was not given.\n\
         Either pass --guard CPULIST (e.g. --guard {example}), or isolate CPUs at boot: add\n  \
         isolcpus=managed_irq,domain,{example} nohz_full={example} rcu_nocbs={example} irqaffinity={housekeeping}\n\
         to GRUB_CMDLINE_LINUX in /etc/default/grub, run `grub2-mkconfig -o /boot/grub2/grub.cfg`\n\
         (Debian/Ubuntu: `update-grub`) and reboot"
    )]
    NoGuardedCpus {
        /// A suggested guarded set: every core except the first of each package.
        example: CpuSet,
        /// What would be left for housekeeping with `example`.
        housekeeping: CpuSet,
    },
    #[error(
        "the isolated CPUs ({isolated}, /sys/devices/system/cpu/isolated) are all offline \
         (online CPUs: {online}); pass --guard CPULIST with online CPUs"
    )]
    IsolatedOffline { isolated: CpuSet, online: CpuSet },
    #[error("--guard {guard}: {error}")]
    GuardNotOnline { guard: CpuSet, error: CpuListError },
    #[error("--guard is empty: give at least one CPU, e.g. --guard 2,3")]
    EmptyGuard,
    #[error(
        "--guard {guard} covers every online CPU ({online}); leave at least one CPU for housekeeping"
    )]
    NoHousekeeping { guard: CpuSet, online: CpuSet },
    #[error(
        "the isolated CPUs ({isolated}) cover every online CPU ({online}); pass --guard CPULIST \
         to guard a subset and leave at least one CPU for housekeeping"
    )]
    IsolatedCoversAll { isolated: CpuSet, online: CpuSet },
}

/// Where one logical CPU sits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CpuInfo {
    pub cpu: u32,
    /// `topology/core_id`: unique only within a package, and not contiguous on many Intel parts.
    pub core_id: u32,
    pub package_id: u32,
    pub node: u32,
    /// Online SMT siblings including this CPU (`thread_siblings_list`).
    pub siblings: CpuSet,
}

/// The host's CPUs as sysfs describes them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Topology {
    pub online: CpuSet,
    /// Domain-isolated CPUs (`isolcpus=`); may name offline CPUs.
    pub isolated: CpuSet,
    /// Adaptive-tick CPUs; empty when the kernel lacks CONFIG_NO_HZ_FULL.
    pub nohz_full: CpuSet,
    /// Online CPUs only.
    pub cpus: BTreeMap<u32, CpuInfo>,
    /// NUMA node -> its online CPUs. Nodes without online CPUs (memory-only,
    /// CXL) are left out; a host without `node/` is one node 0.
    pub nodes: BTreeMap<u32, CpuSet>,
}

/// The guarded CPUs and the rest (housekeeping: where everything else, including pinguard, runs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Guard {
    pub guarded: CpuSet,
    pub housekeeping: CpuSet,
}

fn read(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path).map_err(|error| TopologyError::Read {
        path: path.to_owned(),
        error,
    })
}

fn read_list(path: &Path) -> Result<CpuSet, TopologyError> {
    let text = read(path)?;
    // An unset cpumask pointer prints as "(null)" (nohz_full on kernels
    // with CONFIG_NO_HZ_FULL booted without nohz_full=).
    if text.trim() == "(null)" {
        return Ok(CpuSet::new());
    }
    CpuSet::parse(&text).map_err(|error| TopologyError::Parse {
        path: path.to_owned(),
        error,
    })
}

/// Like `read_list`, but a missing file (kernel without the feature) is the empty set.
fn read_list_opt(path: &Path) -> Result<CpuSet, TopologyError> {
    match read_list(path) {
        Err(TopologyError::Read { error, .. }) if error.kind() == io::ErrorKind::NotFound => {
            Ok(CpuSet::new())
        }
        other => other,
    }
}

/// Reads a numeric topology attribute; a missing file is `None`. Negative
/// values ("-1": unknown on some platforms) count as 0.
fn read_num_opt(path: &Path) -> Result<Option<u32>, TopologyError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(TopologyError::Read {
                path: path.to_owned(),
                error,
            });
        }
    };
    let value = text.trim();
    let n: i64 = value.parse().map_err(|_| TopologyError::BadNumber {
        path: path.to_owned(),
        value: value.to_string(),
    })?;
    Ok(Some(u32::try_from(n.max(0)).unwrap_or(u32::MAX)))
}

impl Topology {
    /// Reads the running host.
    pub fn read() -> Result<Self, TopologyError> {
        Self::read_from(Path::new("/sys"))
    }

    /// Reads a sysfs tree rooted at `sys` (a fixture in tests).
    pub fn read_from(sys: &Path) -> Result<Self, TopologyError> {
        let cpu_dir = sys.join("devices/system/cpu");
        let online = read_list(&cpu_dir.join("online"))?;
        let isolated = read_list_opt(&cpu_dir.join("isolated"))?;
        let nohz_full = read_list_opt(&cpu_dir.join("nohz_full"))?;
        let mut cpus = BTreeMap::new();
        for cpu in online.iter() {
            let topo = cpu_dir.join(format!("cpu{cpu}/topology"));
            // Without topology files (some VMs, containers) every CPU is its own core.
            let core_id = read_num_opt(&topo.join("core_id"))?.unwrap_or(cpu);
            let package_id = read_num_opt(&topo.join("physical_package_id"))?.unwrap_or(0);
            let mut siblings =
                read_list_opt(&topo.join("thread_siblings_list"))?.intersection(&online);
            siblings.insert(cpu);
            cpus.insert(
                cpu,
                CpuInfo {
                    cpu,
                    core_id,
                    package_id,
                    node: 0,
                    siblings,
                },
            );
        }
        let mut nodes: BTreeMap<u32, CpuSet> = BTreeMap::new();
        let node_dir = sys.join("devices/system/node");
        match fs::read_dir(&node_dir) {
            Ok(rd) => {
                for entry in rd.filter_map(|e| e.ok()) {
                    let name = entry.file_name();
                    let Some(id) = name
                        .to_str()
                        .and_then(|n| n.strip_prefix("node"))
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let list = read_list(&entry.path().join("cpulist"))?.intersection(&online);
                    if list.is_empty() {
                        continue;
                    }
                    for cpu in list.iter() {
                        if let Some(info) = cpus.get_mut(&cpu) {
                            info.node = id;
                        }
                    }
                    nodes.insert(id, list);
                }
            }
            // No NUMA support (CONFIG_NUMA=n, many small VMs): one node.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(TopologyError::Read {
                    path: node_dir,
                    error,
                });
            }
        }
        // CPUs no node claims (no NUMA, or a node directory without them) are on node 0.
        let claimed = nodes.values().fold(CpuSet::new(), |acc, s| acc.union(s));
        let unclaimed = online.difference(&claimed);
        if !unclaimed.is_empty() {
            let node0 = nodes.entry(0).or_default();
            *node0 = node0.union(&unclaimed);
        }
        Ok(Self {
            online,
            isolated,
            nohz_full,
            cpus,
            nodes,
        })
    }

    /// NUMA node of an online CPU (0 for unknown CPUs).
    #[cfg(test)]
    /// `n` online CPUs on one node, without SMT (unit tests elsewhere).
    pub fn flat(n: u32) -> Self {
        let online: CpuSet = (0..n).collect();
        let cpus = (0..n)
            .map(|cpu| {
                let info = CpuInfo {
                    cpu,
                    core_id: cpu,
                    package_id: 0,
                    node: 0,
                    siblings: CpuSet::single(cpu),
                };
                (cpu, info)
            })
            .collect();
        Self {
            isolated: CpuSet::new(),
            nohz_full: CpuSet::new(),
            cpus,
            nodes: BTreeMap::from([(0, online.clone())]),
            online,
        }
    }

    pub fn node_of(&self, cpu: u32) -> u32 {
        self.cpus.get(&cpu).map_or(0, |c| c.node)
    }

    /// SMT siblings of a CPU including itself (just the CPU when unknown).
    pub fn siblings(&self, cpu: u32) -> CpuSet {
        self.cpus
            .get(&cpu)
            .map_or_else(|| CpuSet::single(cpu), |c| c.siblings.clone())
    }

    /// A sensible set to guard on this host, for error messages: every online
    /// CPU except the first core (with its SMT siblings) of each package, so
    /// each socket keeps housekeeping and no guarded CPU shares a core with it.
    pub fn suggested_guard(&self) -> CpuSet {
        let mut first_core: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
        for info in self.cpus.values() {
            let key = (info.core_id, info.cpu);
            first_core
                .entry(info.package_id)
                .and_modify(|k| *k = (*k).min(key))
                .or_insert(key);
        }
        let mut keep = CpuSet::new();
        for (_, cpu) in first_core.values() {
            keep = keep.union(&self.siblings(*cpu));
        }
        let suggestion = self.online.difference(&keep);
        if !suggestion.is_empty() {
            return suggestion;
        }
        // One core per package: leave just the first CPU.
        let mut rest = self.online.clone();
        if let Some(first) = rest.first() {
            rest.remove(first);
        }
        rest
    }

    /// The guarded set: `requested` (from --guard or config) if given, else the
    /// isolated CPUs that are online. Errors name the problem and how to fix it.
    pub fn guard(&self, requested: Option<&CpuSet>) -> Result<Guard, TopologyError> {
        let guarded = match requested {
            Some(g) if g.is_empty() => return Err(TopologyError::EmptyGuard),
            Some(g) => {
                g.check_within(&self.online)
                    .map_err(|error| TopologyError::GuardNotOnline {
                        guard: g.clone(),
                        error,
                    })?;
                g.clone()
            }
            None if self.isolated.is_empty() => {
                let example = self.suggested_guard();
                return Err(TopologyError::NoGuardedCpus {
                    housekeeping: self.online.difference(&example),
                    example,
                });
            }
            None => {
                let guarded = self.isolated.intersection(&self.online);
                if guarded.is_empty() {
                    return Err(TopologyError::IsolatedOffline {
                        isolated: self.isolated.clone(),
                        online: self.online.clone(),
                    });
                }
                guarded
            }
        };
        let housekeeping = self.online.difference(&guarded);
        if housekeeping.is_empty() {
            return Err(match requested {
                Some(_) => TopologyError::NoHousekeeping {
                    guard: guarded,
                    online: self.online.clone(),
                },
                None => TopologyError::IsolatedCoversAll {
                    isolated: self.isolated.clone(),
                    online: self.online.clone(),
                },
            });
        }
        Ok(Guard {
            guarded,
            housekeeping,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
            .join("sys")
    }

    fn set(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

    #[test]
    fn two_socket_smt_machine() {
        let t = Topology::read_from(&fixture("intel-2s16c2t")).unwrap();
        assert_eq!(t.online, set("0-63"));
        assert_eq!(t.cpus.len(), 64);
        assert_eq!(t.isolated, set("2-15,18-31,34-47,50-63"));
        assert_eq!(t.nohz_full, set("2-15,18-31,34-47,50-63"));
        // Intel enumerates the second hardware thread of every core after all first threads.
        assert_eq!(t.siblings(5), set("5,37"));
        assert_eq!(t.siblings(37), set("5,37"));
        assert_eq!(t.siblings(16), set("16,48"));
        assert_eq!(t.cpus[&37].core_id, t.cpus[&5].core_id);
        assert_eq!(t.cpus[&37].package_id, 0);
        assert_eq!(t.cpus[&48].package_id, 1);
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[&0], set("0-15,32-47"));
        assert_eq!(t.nodes[&1], set("16-31,48-63"));
        assert_eq!(t.node_of(0), 0);
        assert_eq!(t.node_of(33), 0);
        assert_eq!(t.node_of(17), 1);
        assert_eq!(t.node_of(63), 1);
        // Core ids repeat across packages: a core is (package, core_id).
        assert_eq!(t.cpus[&0].core_id, t.cpus[&16].core_id);
        assert_ne!(t.cpus[&0].package_id, t.cpus[&16].package_id);
    }

    #[test]
    fn two_socket_guard_defaults_to_isolated() {
        let t = Topology::read_from(&fixture("intel-2s16c2t")).unwrap();
        let g = t.guard(None).unwrap();
        assert_eq!(g.guarded, set("2-15,18-31,34-47,50-63"));
        assert_eq!(g.housekeeping, set("0-1,16-17,32-33,48-49"));
        // --guard overrides the isolated set.
        let g = t.guard(Some(&set("4-7,36-39"))).unwrap();
        assert_eq!(g.guarded, set("4-7,36-39"));
        assert_eq!(g.housekeeping, set("0-3,8-35,40-63"));
    }

    #[test]
    fn two_socket_suggestion_keeps_first_core_of_each_socket() {
        let t = Topology::read_from(&fixture("intel-2s16c2t")).unwrap();
        assert_eq!(t.suggested_guard(), set("1-15,17-31,33-47,49-63"));
    }

    #[test]
    fn small_machine_without_numa() {
        let sys = fixture("small-2cpu");
        assert!(!sys.join("devices/system/node").exists());
        let t = Topology::read_from(&sys).unwrap();
        assert_eq!(t.online, set("0-1"));
        assert!(t.isolated.is_empty());
        assert!(t.nohz_full.is_empty(), "no nohz_full file means none");
        assert_eq!(t.nodes.len(), 1);
        assert_eq!(t.nodes[&0], set("0-1"));
        assert_eq!(t.node_of(1), 0);
        assert_eq!(t.siblings(1), set("0-1"));
        // One core: the suggestion still leaves CPU 0 for housekeeping.
        assert_eq!(t.suggested_guard(), set("1"));
    }

    #[test]
    fn guard_override_on_small_machine() {
        let t = Topology::read_from(&fixture("small-2cpu")).unwrap();
        let g = t.guard(Some(&set("1"))).unwrap();
        assert_eq!(g.guarded, set("1"));
        assert_eq!(g.housekeeping, set("0"));
    }

    #[test]
    fn offline_guard_names_online_range() {
        let t = Topology::read_from(&fixture("small-2cpu")).unwrap();
        let e = t.guard(Some(&set("7"))).unwrap_err();
        assert!(matches!(e, TopologyError::GuardNotOnline { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("--guard 7"), "{msg}");
        assert!(msg.contains("CPU 7 is not online"), "{msg}");
        assert!(msg.contains("online CPUs: 0-1"), "{msg}");
    }

    #[test]
    fn nothing_isolated_and_no_guard_explains_grub() {
        let t = Topology::read_from(&fixture("small-2cpu")).unwrap();
        let e = t.guard(None).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("--guard 1"), "{msg}");
        assert!(
            msg.contains("isolcpus=managed_irq,domain,1 nohz_full=1 rcu_nocbs=1 irqaffinity=0"),
            "{msg}"
        );
        assert!(msg.contains("GRUB_CMDLINE_LINUX"), "{msg}");
        assert!(
            msg.contains("grub2-mkconfig -o /boot/grub2/grub.cfg"),
            "{msg}"
        );
        assert!(msg.contains("update-grub"), "{msg}");

        // The suggestion on a big machine spares the first core of each socket.
        let mut big = Topology::read_from(&fixture("intel-2s16c2t")).unwrap();
        big.isolated = CpuSet::new();
        let msg = big.guard(None).unwrap_err().to_string();
        assert!(
            msg.contains("isolcpus=managed_irq,domain,1-15,17-31,33-47,49-63"),
            "{msg}"
        );
        assert!(msg.contains("irqaffinity=0,16,32,48"), "{msg}");
    }

    #[test]
    fn guard_covering_everything_is_rejected() {
        let t = Topology::read_from(&fixture("small-2cpu")).unwrap();
        let msg = t.guard(Some(&set("0-1"))).unwrap_err().to_string();
        assert!(msg.contains("covers every online CPU (0-1)"), "{msg}");
        assert!(msg.contains("housekeeping"), "{msg}");

        let mut all = Topology::read_from(&fixture("intel-2s16c2t")).unwrap();
        all.isolated = set("0-63");
        let e = all.guard(None).unwrap_err();
        assert!(
            matches!(e, TopologyError::IsolatedCoversAll { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("--guard"), "{e}");

        assert!(matches!(
            t.guard(Some(&CpuSet::new())),
            Err(TopologyError::EmptyGuard)
        ));
    }

    /// Writes a small sysfs tree for edge cases the committed fixtures do not cover.
    fn write_tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        dir
    }

    #[test]
    fn tolerates_null_nohz_offline_cpus_and_memory_only_nodes() {
        let dir = write_tree(&[
            ("devices/system/cpu/online", "0-2\n"),
            // CPU 3 is offline but still isolated (isolcpus names possible CPUs).
            ("devices/system/cpu/isolated", "2-3\n"),
            ("devices/system/cpu/nohz_full", "(null)\n"),
            ("devices/system/cpu/cpu0/topology/core_id", "0\n"),
            (
                "devices/system/cpu/cpu0/topology/physical_package_id",
                "-1\n",
            ),
            ("devices/system/node/node0/cpulist", "0-3\n"),
            // A CXL/memory-only node has no CPUs.
            ("devices/system/node/node1/cpulist", "\n"),
            ("devices/system/node/possible", "0-1\n"),
        ]);
        let t = Topology::read_from(dir.path()).unwrap();
        assert!(t.nohz_full.is_empty());
        assert_eq!(t.cpus[&0].package_id, 0);
        // No topology directory: the CPU is its own core.
        assert_eq!(t.cpus[&2].core_id, 2);
        assert_eq!(t.siblings(2), set("2"));
        assert_eq!(t.nodes.keys().copied().collect::<Vec<_>>(), vec![0]);
        assert_eq!(t.nodes[&0], set("0-2"));
        let g = t.guard(None).unwrap();
        assert_eq!(g.guarded, set("2"), "offline isolated CPUs are not guarded");
        assert_eq!(g.housekeeping, set("0-1"));
    }

    #[test]
    fn isolated_but_all_offline_is_an_error() {
        let dir = write_tree(&[
            ("devices/system/cpu/online", "0-1\n"),
            ("devices/system/cpu/isolated", "4-5\n"),
        ]);
        let t = Topology::read_from(dir.path()).unwrap();
        let msg = t.guard(None).unwrap_err().to_string();
        assert!(msg.contains("4-5"), "{msg}");
        assert!(msg.contains("online CPUs: 0-1"), "{msg}");
    }

    #[test]
    fn bad_files_name_the_path() {
        let dir = write_tree(&[
            ("devices/system/cpu/online", "0-1\n"),
            ("devices/system/cpu/cpu1/topology/core_id", "one\n"),
        ]);
        let msg = Topology::read_from(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("cpu1/topology/core_id"), "{msg}");
        assert!(msg.contains("\"one\""), "{msg}");

        let dir = write_tree(&[("devices/system/cpu/online", "0-x\n")]);
        let msg = Topology::read_from(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("devices/system/cpu/online"), "{msg}");

        let dir = write_tree(&[]);
        let msg = Topology::read_from(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("cannot read"), "{msg}");
        assert!(msg.contains("devices/system/cpu/online"), "{msg}");
    }

    #[test]
    fn reads_this_host() {
        let t = Topology::read().unwrap();
        assert!(!t.online.is_empty());
        assert_eq!(t.cpus.len(), t.online.len());
        let all = t.nodes.values().fold(CpuSet::new(), |a, s| a.union(s));
        assert_eq!(all, t.online, "every online CPU is on exactly one node");
    }
}
