//! Host readiness for CPU isolation (`pinguard check`): is the kernel, IRQ,
//! workqueue, scheduler and power configuration keeping the guarded CPUs quiet?
//!
//! Every item says what it found and, when it is not `pass`, the exact command
//! or kernel parameter that fixes it. All reads go through [`Host`], so tests
//! run against fixture trees instead of the live `/proc` and `/sys`. Nothing
//! here changes the host.
//!
//! One submodule per group of items: [`cmdline`] (boot parameters), [`irqs`]
//! (device IRQ affinity), [`irqbalance`], [`sched`] (workqueues, preemption,
//! RT throttling, timer migration), [`cpu`] (frequency governor, SMT
//! siblings), [`observer`] (what the daemon's configuration leaves out);
//! [`render`] draws the report as a table.
use std::{fmt, fs, io, path::Path};

use thiserror::Error;

use crate::host::{
    Host,
    cmdline::{BootConfig, KernelCmdline},
    cpulist::CpuSet,
    topology::{Guard, Topology, TopologyError},
};

mod cmdline;
mod cpu;
mod irqbalance;
mod irqs;
mod observer;
pub mod render;
mod sched;

pub use irqs::IrqFinding;
pub use observer::culprit_naming;

/// Why the check could not run at all (individual unreadable files only make
/// their item `warn`).
#[derive(Debug, Error)]
pub enum CheckError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One checked aspect of the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Item {
    /// Stable identifier (`isolcpus`, `irqs`, `irqbalance`, ...).
    pub id: &'static str,
    pub status: Status,
    /// What was found (may span lines).
    pub message: String,
    /// The command or kernel parameter that fixes it; `None` when passing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// For `irqs`: every IRQ that may fire on a guarded CPU.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub irqs: Vec<IrqFinding>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

/// The outcome of `pinguard check`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub guarded: CpuSet,
    pub housekeeping: CpuSet,
    pub items: Vec<Item>,
    pub summary: Summary,
    /// Kernel parameters to add when any boot-time item is not passing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_cmdline: Option<String>,
    /// Where this host keeps its kernel command line (for the advice).
    #[serde(skip)]
    pub boot: BootConfig,
}

impl Report {
    #[cfg(test)]
    pub fn item(&self, id: &str) -> Option<&Item> {
        self.items.iter().find(|i| i.id == id)
    }

    /// Adds an item that is not about the host (the daemon's configuration).
    pub fn push(&mut self, item: Item) {
        match item.status {
            Status::Pass => self.summary.pass += 1,
            Status::Warn => self.summary.warn += 1,
            Status::Fail => self.summary.fail += 1,
        }
        self.items.push(item);
    }

    /// `exit::VIOLATIONS` when any item failed, else `exit::OK`.
    pub fn exit_code(&self) -> u8 {
        if self.summary.fail > 0 {
            crate::exit::VIOLATIONS
        } else {
            crate::exit::OK
        }
    }
}

/// Reads the host's topology, resolves the guarded set and checks every item.
pub fn check(host: &Host, requested: Option<&CpuSet>) -> Result<Report, CheckError> {
    let topo = Topology::read_from(&host.sys)?;
    let guard = topo.guard(requested)?;
    Ok(check_guard(host, &topo, &guard))
}

/// Checks every item for an already resolved guarded/housekeeping split.
pub fn check_guard(host: &Host, topo: &Topology, guard: &Guard) -> Report {
    let ctx = Ctx::new(host, topo, guard);
    let items = vec![
        ctx.isolcpus(),
        ctx.nohz_full(),
        ctx.rcu_nocbs(),
        ctx.irqaffinity(),
        ctx.irqs(),
        ctx.workqueue(),
        ctx.preemption(),
        ctx.rt_throttling(),
        ctx.timer_migration(),
        ctx.cpufreq(),
        ctx.smt(),
        ctx.irqbalance(),
    ];
    let mut summary = Summary::default();
    for item in &items {
        match item.status {
            Status::Pass => summary.pass += 1,
            Status::Warn => summary.warn += 1,
            Status::Fail => summary.fail += 1,
        }
    }
    let kernel_cmdline = items
        .iter()
        .any(|i| cmdline::BOOT_ITEMS.contains(&i.id) && i.status != Status::Pass)
        .then(|| cmdline::boot_params(guard, ctx.nohz_full_supported));
    Report {
        guarded: guard.guarded.clone(),
        housekeeping: guard.housekeeping.clone(),
        items,
        summary,
        kernel_cmdline,
        boot: ctx.boot,
    }
}

fn pass(id: &'static str, message: impl Into<String>) -> Item {
    Item {
        id,
        status: Status::Pass,
        message: message.into(),
        fix: None,
        irqs: Vec::new(),
    }
}

fn not_ok(
    id: &'static str,
    status: Status,
    message: impl Into<String>,
    fix: impl Into<String>,
) -> Item {
    Item {
        id,
        status,
        message: message.into(),
        fix: Some(fix.into()),
        irqs: Vec::new(),
    }
}

fn warn(id: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Item {
    not_ok(id, Status::Warn, message, fix)
}

fn fail(id: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Item {
    not_ok(id, Status::Fail, message, fix)
}

/// An item that could not be evaluated: unknown is not a pass.
fn unreadable(id: &'static str, path: &Path, err: &io::Error) -> Item {
    warn(
        id,
        format!("cannot read {}: {err}", path.display()),
        "run `pinguard check` as root on the host itself (not in a container)",
    )
}

/// Reads a file; a missing file is `None`.
fn read_opt(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What every item looks at; each submodule adds the methods for its items.
struct Ctx<'a> {
    host: &'a Host,
    topo: &'a Topology,
    guarded: &'a CpuSet,
    housekeeping: &'a CpuSet,
    possible: CpuSet,
    /// `Err` holds the read error, reported by each cmdline item.
    cmdline: Result<KernelCmdline, String>,
    /// How this host makes a kernel parameter permanent.
    boot: BootConfig,
    /// The kernel honours `nohz_full=` (built with CONFIG_NO_HZ_FULL).
    nohz_full_supported: bool,
}

impl<'a> Ctx<'a> {
    fn new(host: &'a Host, topo: &'a Topology, guard: &'a Guard) -> Self {
        let possible = fs::read_to_string(host.sys.join("devices/system/cpu/possible"))
            .ok()
            .and_then(|s| CpuSet::parse(&s).ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| topo.online.clone());
        let path = host.proc.join("cmdline");
        let cmdline = fs::read_to_string(&path)
            .map(|s| KernelCmdline::parse(&s))
            .map_err(|e| format!("cannot read {}: {e}", path.display()));
        Self {
            host,
            topo,
            guarded: &guard.guarded,
            housekeeping: &guard.housekeeping,
            possible,
            cmdline,
            boot: BootConfig::detect(&host.etc),
            nohz_full_supported: crate::host::cmdline::nohz_full_supported(&host.sys),
        }
    }

    /// "add PARAM to <this host's boot configuration> ... and reboot".
    fn grub_fix(&self, param: String) -> String {
        format!("add {param} {}", self.boot.howto())
    }
}

/// Fixture trees (`pin-user/tests/fixtures`) shared by the tests of every item.
#[cfg(test)]
mod fixtures {
    use std::{fs, path::Path};

    use crate::host::{Host, cpulist::CpuSet};

    fn dir(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    pub fn fixture(name: &str) -> Host {
        Host::under(&dir(name))
    }

    pub fn set(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

    /// Copies a fixture into a temporary directory so a test can change it.
    pub fn copy_fixture(name: &str) -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            fs::create_dir_all(to).unwrap();
            for e in fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                let dest = to.join(e.file_name());
                if e.file_type().unwrap().is_dir() {
                    copy(&e.path(), &dest);
                } else {
                    fs::copy(e.path(), dest).unwrap();
                }
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        copy(&dir(name), tmp.path());
        tmp
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    fn ids(report: &Report) -> Vec<&'static str> {
        report.items.iter().map(|i| i.id).collect()
    }

    const ALL_IDS: [&str; 12] = [
        "isolcpus",
        "nohz_full",
        "rcu_nocbs",
        "irqaffinity",
        "irqs",
        "workqueue",
        "preemption",
        "sched_rt_runtime",
        "timer_migration",
        "cpufreq",
        "smt",
        "irqbalance",
    ];

    #[test]
    fn good_host_passes_everything() {
        let report = check(&fixture("intel-2s16c2t"), None).unwrap();
        assert_eq!(report.guarded, set("2-15,18-31,34-47,50-63"));
        assert_eq!(report.housekeeping, set("0-1,16-17,32-33,48-49"));
        assert_eq!(ids(&report), ALL_IDS);
        for item in &report.items {
            assert_eq!(item.status, Status::Pass, "{item:#?}");
            assert!(item.fix.is_none(), "{item:#?}");
        }
        assert_eq!(
            report.summary,
            Summary {
                pass: 12,
                warn: 0,
                fail: 0
            }
        );
        assert_eq!(report.kernel_cmdline, None);
        assert_eq!(report.exit_code(), crate::exit::OK);
    }

    #[test]
    fn good_host_with_wider_guard_fails_where_it_should() {
        // Guarding CPU 1 too: it is a housekeeping CPU on this host.
        let report = check(&fixture("intel-2s16c2t"), Some(&set("1-15"))).unwrap();
        let status = |id| report.item(id).unwrap().status;
        assert_eq!(status("isolcpus"), Status::Fail);
        assert_eq!(status("irqs"), Status::Fail);
        assert_eq!(status("workqueue"), Status::Fail);
        assert_eq!(status("irqbalance"), Status::Fail);
        assert_eq!(status("nohz_full"), Status::Warn);
        assert_eq!(status("irqaffinity"), Status::Warn);
        assert_eq!(status("cpufreq"), Status::Pass);
        assert_eq!(status("smt"), Status::Warn);
        assert_eq!(report.exit_code(), crate::exit::VIOLATIONS);
    }

    #[test]
    fn bad_host_fails_or_warns_every_item() {
        let report = check(&fixture("small-2cpu"), Some(&set("1"))).unwrap();
        assert_eq!(ids(&report), ALL_IDS);
        let expect = [
            ("isolcpus", Status::Fail),
            ("nohz_full", Status::Warn),
            ("rcu_nocbs", Status::Warn),
            ("irqaffinity", Status::Warn),
            ("irqs", Status::Fail),
            ("workqueue", Status::Fail),
            ("preemption", Status::Warn),
            ("sched_rt_runtime", Status::Warn),
            ("timer_migration", Status::Warn),
            ("cpufreq", Status::Warn),
            ("smt", Status::Warn),
            ("irqbalance", Status::Fail),
        ];
        for (id, status) in expect {
            let item = report.item(id).unwrap();
            assert_eq!(item.status, status, "{item:#?}");
            let fix = item.fix.as_deref().unwrap_or("");
            assert!(!fix.is_empty(), "{id} must say how to fix it");
        }
        assert_eq!(
            report.summary,
            Summary {
                pass: 0,
                warn: 8,
                fail: 4
            }
        );
        assert_eq!(report.exit_code(), crate::exit::VIOLATIONS);
        assert_eq!(
            report.kernel_cmdline.as_deref(),
            Some("isolcpus=managed_irq,domain,1 rcu_nocbs=1 irqaffinity=0")
        );
    }

    #[test]
    fn json_shape() {
        let report = check(&fixture("small-2cpu"), Some(&set("1"))).unwrap();
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["guarded"], "1");
        assert_eq!(v["housekeeping"], "0");
        assert_eq!(v["summary"]["fail"], 4);
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), 12);
        let irqs = items.iter().find(|i| i["id"] == "irqs").unwrap();
        assert_eq!(irqs["status"], "fail");
        assert_eq!(irqs["irqs"][0]["irq"], 1);
        assert_eq!(irqs["irqs"][0]["affinity"], "0-1");
        assert_eq!(irqs["irqs"][0]["effective"], "1");
        assert_eq!(irqs["irqs"][0]["movable"], true);
        // Passing items carry no fix and no empty lists.
        let good = check(&fixture("intel-2s16c2t"), None).unwrap();
        let v = serde_json::to_value(&good).unwrap();
        assert!(v["items"][0].get("fix").is_none());
        assert!(v["items"][4].get("irqs").is_none());
        assert!(v.get("kernel_cmdline").is_none());
    }

    #[test]
    fn guard_errors_propagate() {
        let e = check(&fixture("small-2cpu"), Some(&set("7"))).unwrap_err();
        assert!(e.to_string().contains("online CPUs: 0-1"), "{e}");
        let e = check(&fixture("small-2cpu"), None).unwrap_err();
        assert!(e.to_string().contains("grub2-mkconfig"), "{e}");
    }

    #[test]
    fn runs_on_this_host() {
        let topo = Topology::read().unwrap();
        let Some(last) = topo.online.last().filter(|l| *l > 0) else {
            return;
        };
        let report = check(&Host::default(), Some(&CpuSet::single(last))).unwrap();
        assert_eq!(report.items.len(), 12);
        let s = report.summary;
        assert_eq!(s.pass + s.warn + s.fail, 12);
    }
}
