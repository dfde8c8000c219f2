//! The host facts a latency run is only comparable with: kernel, preemption
//! model, isolation parameters. Read through [`Host`] so tests use fixtures.
use std::{fs, path::Path};

use crate::host::{Host, cmdline::KernelCmdline};

/// The kernel's preemption model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Preemption {
    /// PREEMPT_RT, PREEMPT_DYNAMIC, PREEMPT, or none (voluntary or no forced preemption).
    pub model: String,
    /// The active PREEMPT_DYNAMIC mode (none, voluntary, full, lazy) when known.
    pub mode: Option<String>,
    /// One line for people, e.g. "PREEMPT_DYNAMIC, mode full".
    pub summary: String,
}

/// Isolation parameters on the kernel command line (absent: `None`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Isolation {
    pub isolcpus: Option<String>,
    pub nohz_full: Option<String>,
    pub rcu_nocbs: Option<String>,
    pub irqaffinity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    /// `uname -r` and `uname -v`.
    pub kernel_release: String,
    pub kernel_version: String,
    pub preemption: Preemption,
    pub isolation: Isolation,
    pub guarded: String,
    pub housekeeping: String,
    /// RT throttling: FIFO threads may use this much of each second (-1: unlimited).
    pub sched_rt_runtime_us: Option<i64>,
    pub cpu_model: Option<String>,
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

impl HostFacts {
    /// Reads everything it can; an unreadable file leaves its field empty.
    pub fn read(host: &Host, guarded: &str, housekeeping: &str) -> Self {
        let kernel = host.proc.join("sys/kernel");
        let version = read(&kernel.join("version")).unwrap_or_default();
        let cmdline = KernelCmdline::parse(&read(&host.proc.join("cmdline")).unwrap_or_default());
        let realtime = read(&host.sys.join("kernel/realtime"));
        let debugfs = read(&host.sys.join("kernel/debug/sched/preempt"));
        let param = |n: &str| cmdline.get(n).map(|v| v.unwrap_or("").to_string());
        Self {
            hostname: read(&kernel.join("hostname")).unwrap_or_default(),
            kernel_release: read(&kernel.join("osrelease")).unwrap_or_default(),
            preemption: preemption(&version, realtime.as_deref(), debugfs.as_deref(), &cmdline),
            kernel_version: version,
            isolation: Isolation {
                isolcpus: param("isolcpus"),
                nohz_full: param("nohz_full"),
                rcu_nocbs: param("rcu_nocbs"),
                irqaffinity: param("irqaffinity"),
            },
            guarded: guarded.to_string(),
            housekeeping: housekeeping.to_string(),
            sched_rt_runtime_us: read(&kernel.join("sched_rt_runtime_us"))
                .and_then(|s| s.parse().ok()),
            cpu_model: read(&host.proc.join("cpuinfo")).and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            }),
        }
    }
}

/// The preemption model from `uname -v` (`version`), `/sys/kernel/realtime`,
/// `/sys/kernel/debug/sched/preempt` ("none voluntary (full)") and `preempt=`.
pub fn preemption(
    version: &str,
    realtime: Option<&str>,
    debugfs: Option<&str>,
    cmdline: &KernelCmdline,
) -> Preemption {
    let has = |w: &str| version.split_whitespace().any(|x| x == w);
    if realtime.is_some_and(|r| r.trim() == "1") || has("PREEMPT_RT") {
        return Preemption {
            model: "PREEMPT_RT".into(),
            mode: None,
            summary: "PREEMPT_RT".into(),
        };
    }
    let active = debugfs.and_then(|s| {
        let start = s.find('(')?;
        let end = s[start..].find(')')? + start;
        Some(s[start + 1..end].to_string())
    });
    if has("PREEMPT_DYNAMIC") {
        let boot = cmdline.get("preempt").flatten().map(str::to_string);
        let (mode, summary) = match (active, boot) {
            (Some(m), _) => (Some(m.clone()), format!("PREEMPT_DYNAMIC, mode {m}")),
            (None, Some(m)) => (
                Some(m.clone()),
                format!("PREEMPT_DYNAMIC, preempt={m} at boot"),
            ),
            (None, None) => (
                None,
                "PREEMPT_DYNAMIC, mode unknown (needs debugfs mounted)".to_string(),
            ),
        };
        return Preemption {
            model: "PREEMPT_DYNAMIC".into(),
            mode,
            summary,
        };
    }
    if has("PREEMPT") {
        return Preemption {
            model: "PREEMPT".into(),
            mode: Some("full".into()),
            summary: "PREEMPT (full)".into(),
        };
    }
    Preemption {
        model: "none".into(),
        mode: None,
        summary: "no forced preemption (voluntary or none)".into(),
    }
}

/// Steal ticks of `cpu` in `/proc/stat` (the 8th value of its `cpuN` line):
/// time a hypervisor ran something else while this CPU wanted to run.
pub fn steal_ticks(stat: &str, cpu: u32) -> Option<u64> {
    let name = format!("cpu{cpu}");
    stat.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some(name.as_str()))
            .then(|| w.nth(7).and_then(|v| v.parse().ok()))
            .flatten()
    })
}

/// Clock ticks per second of `/proc/stat` (USER_HZ).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as u64 } else { 100 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> KernelCmdline {
        KernelCmdline::parse("")
    }

    #[test]
    fn preemption_models() {
        let rt = preemption("#1 SMP PREEMPT_RT Debian 6.1.0-rt", None, None, &none());
        assert_eq!((rt.model.as_str(), rt.mode), ("PREEMPT_RT", None));
        assert_eq!(
            preemption("#1 SMP", Some("1\n"), None, &none()).model,
            "PREEMPT_RT"
        );
        let dynamic = preemption(
            "#1 SMP PREEMPT_DYNAMIC @0",
            Some("0"),
            Some("none voluntary (full) lazy\n"),
            &none(),
        );
        assert_eq!(dynamic.mode.as_deref(), Some("full"));
        assert_eq!(dynamic.summary, "PREEMPT_DYNAMIC, mode full");
        let boot = preemption(
            "#1 SMP PREEMPT_DYNAMIC",
            None,
            None,
            &KernelCmdline::parse("quiet preempt=voluntary"),
        );
        assert_eq!(boot.summary, "PREEMPT_DYNAMIC, preempt=voluntary at boot");
        let unknown = preemption("#1 SMP PREEMPT_DYNAMIC @0", None, None, &none());
        assert_eq!(unknown.mode, None);
        assert!(unknown.summary.contains("mode unknown"));
        assert_eq!(
            preemption("#1 SMP PREEMPT", None, None, &none()).model,
            "PREEMPT"
        );
        assert_eq!(
            preemption("#1 SMP Debian", None, None, &none()).model,
            "none"
        );
    }

    #[test]
    fn reads_host_facts_from_a_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let w = |p: &str, s: &str| {
            let p = dir.path().join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        };
        w("proc/sys/kernel/version", "#1 SMP PREEMPT_RT Debian\n");
        w("proc/sys/kernel/osrelease", "6.1.0-rt-amd64\n");
        w("proc/sys/kernel/hostname", "lab1\n");
        w("proc/sys/kernel/sched_rt_runtime_us", "950000\n");
        w(
            "proc/cmdline",
            "BOOT_IMAGE=/vmlinuz isolcpus=managed_irq,domain,2-3 nohz_full=2-3 rcu_nocbs=2-3 quiet\n",
        );
        w(
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Xeon Test CPU\n",
        );
        let f = HostFacts::read(&Host::under(dir.path()), "2-3", "0-1");
        assert_eq!(f.hostname, "lab1");
        assert_eq!(f.kernel_release, "6.1.0-rt-amd64");
        assert_eq!(f.preemption.model, "PREEMPT_RT");
        assert_eq!(
            f.isolation.isolcpus.as_deref(),
            Some("managed_irq,domain,2-3")
        );
        assert_eq!(f.isolation.nohz_full.as_deref(), Some("2-3"));
        assert_eq!(f.isolation.rcu_nocbs.as_deref(), Some("2-3"));
        assert_eq!(f.isolation.irqaffinity, None);
        assert_eq!(f.sched_rt_runtime_us, Some(950_000));
        assert_eq!(f.cpu_model.as_deref(), Some("Xeon Test CPU"));
        assert_eq!(
            (f.guarded.as_str(), f.housekeeping.as_str()),
            ("2-3", "0-1")
        );
    }

    #[test]
    fn steal_of_one_cpu() {
        let stat =
            "cpu  10 0 10 100 0 0 0 7 0 0\ncpu0 5 0 5 50 0 0 0 3 0 0\ncpu1 5 0 5 50 0 0 0 4 0 0\n";
        assert_eq!(steal_ticks(stat, 1), Some(4));
        assert_eq!(steal_ticks(stat, 0), Some(3));
        assert_eq!(steal_ticks(stat, 2), None);
    }
}
