//! Facts about the host shared by every feature: CPU lists and topology,
//! `/proc` readers, thread affinity, the kernel command line, IRQ names.
//! Everything reads through a [`Host`] root, so tests can point it at a
//! fixture tree.
use std::path::PathBuf;

pub mod affinity;
pub mod cgroup;
pub mod cmdline;
pub mod cpulist;
pub mod irq;
pub mod procfs;
pub mod topology;

/// Capability numbers pinguard asks about.
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_BPF: u32 = 39;

/// Whether this process holds capability `cap` (its bit in `CapEff`).
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << cap) != 0)
}

/// Where the host's pseudo-filesystems and configuration are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub etc: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Self {
            proc: "/proc".into(),
            sys: "/sys".into(),
            etc: "/etc".into(),
        }
    }
}

impl Host {
    #[cfg(test)]
    /// A tree holding `proc/`, `sys/` and `etc/` (a test fixture).
    pub fn under(root: &std::path::Path) -> Self {
        Self {
            proc: root.join("proc"),
            sys: root.join("sys"),
            etc: root.join("etc"),
        }
    }
}
