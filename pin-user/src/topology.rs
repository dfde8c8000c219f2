//! Host CPU topology from sysfs: online and isolated CPUs, nohz_full, SMT
//! siblings, cores, packages and NUMA nodes; and the guarded/housekeeping split.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::cpulist::{CpuListError, CpuSet};

#[derive(Debug, Error)]
pub enum TopologyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot parse {path}: {source}")]
    Parse { path: PathBuf, source: CpuListError },
    #[error(
        "no CPUs to guard: /sys/devices/system/cpu/isolated is empty and --guard was not given.\n\
         Either pass --guard CPULIST (e.g. --guard {example}), or isolate CPUs at boot: add\n  \
         isolcpus={example} nohz_full={example} rcu_nocbs={example}\n\
         to GRUB_CMDLINE_LINUX in /etc/default/grub, run `grub2-mkconfig -o /boot/grub2/grub.cfg`\n\
         (Debian/Ubuntu: `update-grub`) and reboot"
    )]
    NoGuardedCpus { example: String },
    #[error("--guard {guard}: {source}")]
    GuardNotOnline { guard: CpuSet, source: CpuListError },
    #[error(
        "--guard {guard} covers every online CPU ({online}); leave at least one CPU for housekeeping"
    )]
    NoHousekeeping { guard: CpuSet, online: CpuSet },
}

/// Where one logical CPU sits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CpuInfo {
    pub cpu: u32,
    pub core_id: u32,
    pub package_id: u32,
    pub node: u32,
    /// SMT siblings including this CPU (`thread_siblings_list`).
    pub siblings: CpuSet,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Topology {
    pub online: CpuSet,
    pub isolated: CpuSet,
    pub nohz_full: CpuSet,
    pub cpus: BTreeMap<u32, CpuInfo>,
    /// NUMA node -> its online CPUs.
    pub nodes: BTreeMap<u32, CpuSet>,
}

/// The guarded CPUs and the rest (housekeeping: where everything else, including pinguard, runs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Guard {
    pub guarded: CpuSet,
    pub housekeeping: CpuSet,
}

fn read(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_list(path: &Path) -> Result<CpuSet, TopologyError> {
    CpuSet::parse(&read(path)?).map_err(|source| TopologyError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Like `read_list`, but a missing file (kernel without the feature) is the empty set.
fn read_list_opt(path: &Path) -> Result<CpuSet, TopologyError> {
    if path.exists() {
        read_list(path)
    } else {
        Ok(CpuSet::new())
    }
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
        let mut nodes: BTreeMap<u32, CpuSet> = BTreeMap::new();
        for cpu in online.iter() {
            let topo = cpu_dir.join(format!("cpu{cpu}/topology"));
            let num = |name: &str| -> Result<u32, TopologyError> {
                let p = topo.join(name);
                let s = read(&p)?;
                // -1 means "unknown" on some platforms.
                Ok(s.trim().parse::<i64>().unwrap_or(0).max(0) as u32)
            };
            let core_id = if topo.join("core_id").exists() {
                num("core_id")?
            } else {
                cpu
            };
            let package_id = if topo.join("physical_package_id").exists() {
                num("physical_package_id")?
            } else {
                0
            };
            let siblings = if topo.join("thread_siblings_list").exists() {
                read_list(&topo.join("thread_siblings_list"))?
            } else {
                CpuSet::single(cpu)
            };
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
        let node_dir = sys.join("devices/system/node");
        if let Ok(rd) = fs::read_dir(&node_dir) {
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
                for cpu in list.iter() {
                    if let Some(info) = cpus.get_mut(&cpu) {
                        info.node = id;
                    }
                }
                nodes.insert(id, list);
            }
        }
        if nodes.is_empty() {
            nodes.insert(0, online.clone());
        }
        Ok(Self {
            online,
            isolated,
            nohz_full,
            cpus,
            nodes,
        })
    }

    pub fn node_of(&self, cpu: u32) -> u32 {
        self.cpus.get(&cpu).map_or(0, |c| c.node)
    }

    pub fn siblings(&self, cpu: u32) -> CpuSet {
        self.cpus
            .get(&cpu)
            .map_or_else(|| CpuSet::single(cpu), |c| c.siblings.clone())
    }

    /// The guarded set: `requested` (from --guard or config) if given, else the
    /// isolated CPUs. Errors name the problem and how to fix it.
    pub fn guard(&self, requested: Option<&CpuSet>) -> Result<Guard, TopologyError> {
        let guarded = match requested {
            Some(g) => {
                g.check_within(&self.online)
                    .map_err(|source| TopologyError::GuardNotOnline {
                        guard: g.clone(),
                        source,
                    })?;
                g.clone()
            }
            None if !self.isolated.is_empty() => self.isolated.intersection(&self.online),
            None => {
                let example = match self.online.last() {
                    Some(last) if last >= 2 => format!("{}-{last}", last / 2 + 1),
                    Some(last) => last.to_string(),
                    None => "2,3".into(),
                };
                return Err(TopologyError::NoGuardedCpus { example });
            }
        };
        let housekeeping = self.online.difference(&guarded);
        if housekeeping.is_empty() {
            return Err(TopologyError::NoHousekeeping {
                guard: guarded,
                online: self.online.clone(),
            });
        }
        Ok(Guard {
            guarded,
            housekeeping,
        })
    }
}
