//! Host readiness for CPU isolation (`pinguard check`): is the kernel, IRQ,
//! workqueue, scheduler and power configuration keeping the guarded CPUs quiet?
//!
//! Every item says what it found and, when it is not `pass`, the exact command
//! or kernel parameter that fixes it. All reads go through [`Host`], so tests
//! run against fixture trees instead of the live `/proc` and `/sys`. Nothing
//! here changes the host.
use std::{collections::BTreeMap, fmt, fs, io, os::unix::fs::PermissionsExt, path::Path};

use thiserror::Error;

use crate::host::{
    Host,
    cmdline::KernelCmdline,
    cpulist::CpuSet,
    procfs::Proc,
    topology::{Guard, Topology, TopologyError},
};

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

/// An IRQ whose affinity reaches guarded CPUs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IrqFinding {
    pub irq: u32,
    /// Handler names from /proc/interrupts ("ehci_hcd:usb1, i801_smbus").
    pub action: String,
    /// `smp_affinity_list`: where the IRQ may be delivered.
    pub affinity: CpuSet,
    /// `effective_affinity_list`: where it is delivered now (absent on old kernels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective: Option<CpuSet>,
    /// False when the kernel refuses affinity changes (managed or per-CPU IRQs).
    pub movable: bool,
    /// The affinity already excludes guarded CPUs but the effective one does
    /// not yet: the kernel moves it when it next fires.
    pub pending: bool,
    /// Housekeeping CPUs to move it to (those on the device's NUMA node when there are any).
    pub target: CpuSet,
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
}

impl Report {
    #[cfg(test)]
    pub fn item(&self, id: &str) -> Option<&Item> {
        self.items.iter().find(|i| i.id == id)
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

/// How to make a kernel parameter permanent.
const GRUB_HOWTO: &str = "to GRUB_CMDLINE_LINUX in /etc/default/grub (replacing any old value), then \
     `grub2-mkconfig -o /boot/grub2/grub.cfg` (Debian/Ubuntu: `update-grub`) and reboot";

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
    let boot_items = ["isolcpus", "nohz_full", "rcu_nocbs", "irqaffinity"];
    let kernel_cmdline = items
        .iter()
        .any(|i| boot_items.contains(&i.id) && i.status != Status::Pass)
        .then(|| {
            let g = &guard.guarded;
            format!(
                "isolcpus=managed_irq,domain,{g} nohz_full={g} rcu_nocbs={g} irqaffinity={}",
                guard.housekeeping
            )
        });
    Report {
        guarded: guard.guarded.clone(),
        housekeeping: guard.housekeeping.clone(),
        items,
        summary,
        kernel_cmdline,
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

/// Parses a CPU list from a kernel parameter, which also allows `all` and
/// `N` (the last possible CPU).
fn parse_param_list(value: &str, possible: &CpuSet) -> Result<CpuSet, String> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("all") {
        return Ok(possible.clone());
    }
    let last = possible.last().unwrap_or(0).to_string();
    let expanded = value
        .split(',')
        .map(|part| {
            let (range, stride) = match part.split_once(':') {
                Some((r, s)) => (r, Some(s)),
                None => (part, None),
            };
            let range = range
                .split('-')
                .map(|t| if t.trim() == "N" { last.as_str() } else { t })
                .collect::<Vec<_>>()
                .join("-");
            match stride {
                Some(s) => format!("{range}:{s}"),
                None => range,
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    CpuSet::parse(&expanded).map_err(|e| e.to_string())
}

/// `isolcpus=[flag,...,]cpulist`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Isolcpus {
    flags: Vec<String>,
    cpus: CpuSet,
}

impl Isolcpus {
    fn parse(value: &str, possible: &CpuSet) -> Result<Self, String> {
        let mut flags = Vec::new();
        let mut rest = value.trim();
        // As the kernel does: leading alphabetic words followed by ',' are flags.
        while let Some((head, tail)) = rest.split_once(',') {
            if !head.is_empty()
                && head.chars().all(|c| c.is_ascii_alphabetic() || c == '_')
                && head != "N"
                && !head.eq_ignore_ascii_case("all")
            {
                flags.push(head.to_string());
                rest = tail;
            } else {
                break;
            }
        }
        Ok(Self {
            flags,
            cpus: parse_param_list(rest, possible)?,
        })
    }

    /// Without flags isolcpus means scheduler-domain isolation.
    fn domain(&self) -> bool {
        self.flags.is_empty() || self.flags.iter().any(|f| f == "domain")
    }

    fn managed_irq(&self) -> bool {
        self.flags.iter().any(|f| f == "managed_irq")
    }
}

/// IRQ number -> handler names, from /proc/interrupts.
fn parse_interrupts(text: &str) -> BTreeMap<u32, String> {
    let mut lines = text.lines();
    let ncpu = lines.next().map_or(0, |h| {
        h.split_whitespace()
            .filter(|w| w.starts_with("CPU"))
            .count()
    });
    let mut out = BTreeMap::new();
    for line in lines {
        let Some((irq, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(irq) = irq.trim().parse::<u32>() else {
            // LOC, NMI, ...: per-CPU vectors without /proc/irq directories.
            continue;
        };
        let mut words = rest.split_whitespace().skip(ncpu);
        // Then: chip name, hwirq (x86 glues the flow name on: "9-fasteoi"),
        // an optional "Level"/"Edge" and "-name", then the actions.
        let _chip = words.next();
        let _hwirq = words.next();
        let rest: Vec<&str> = words
            .skip_while(|w| matches!(*w, "Level" | "Edge") || w.starts_with('-'))
            .collect();
        out.insert(irq, rest.join(" "));
    }
    out
}

/// Sorted subdirectory names: /proc/irq/N/ has one per registered action.
fn subdirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Shell-style `KEY=value` lines (irqbalance's /etc/default and /etc/sysconfig files).
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            out.insert(k.trim().to_string(), v.to_string());
        }
    }
    out
}

/// Which CPUs irqbalance keeps IRQs off, following its own precedence:
/// IRQBALANCE_BANNED_CPUS (hex), then IRQBALANCE_BANNED_CPULIST, else the
/// isolated and nohz_full CPUs.
fn irqbalance_banned(env: &BTreeMap<String, String>, topo: &Topology) -> (CpuSet, String) {
    if let Some(mask) = env.get("IRQBALANCE_BANNED_CPUS").filter(|v| !v.is_empty()) {
        return match CpuSet::parse_mask(mask) {
            Ok(set) => (
                set,
                format!(
                    "IRQBALANCE_BANNED_CPUS={mask} (deprecated: use IRQBALANCE_BANNED_CPULIST)"
                ),
            ),
            Err(e) => (
                CpuSet::new(),
                format!("unparsable IRQBALANCE_BANNED_CPUS: {e}"),
            ),
        };
    }
    if let Some(list) = env
        .get("IRQBALANCE_BANNED_CPULIST")
        .filter(|v| !v.is_empty())
    {
        return match CpuSet::parse(list) {
            Ok(set) => (set, format!("IRQBALANCE_BANNED_CPULIST={list}")),
            Err(e) => (
                CpuSet::new(),
                format!("unparsable IRQBALANCE_BANNED_CPULIST: {e}"),
            ),
        };
    }
    let auto = topo.isolated.union(&topo.nohz_full);
    let how = if auto.is_empty() {
        "no IRQBALANCE_BANNED_CPULIST and nothing isolated or nohz_full, so no CPU is banned"
            .to_string()
    } else {
        format!("no IRQBALANCE_BANNED_CPULIST: it bans the isolated and nohz_full CPUs {auto}")
    };
    (auto, how)
}

/// Lists up to `max` lines, then how many were left out.
fn capped(lines: &[String], max: usize) -> String {
    let mut out: Vec<String> = lines.iter().take(max).cloned().collect();
    if lines.len() > max {
        out.push(format!("... and {} more (see --json)", lines.len() - max));
    }
    out.join("\n")
}

struct Ctx<'a> {
    host: &'a Host,
    topo: &'a Topology,
    guarded: &'a CpuSet,
    housekeeping: &'a CpuSet,
    possible: CpuSet,
    /// `Err` holds the read error, reported by each cmdline item.
    cmdline: Result<KernelCmdline, String>,
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
        }
    }

    /// A CPU-list kernel parameter: `Ok(None)` when absent, `Some(empty)` when given bare.
    fn param_list(&self, name: &str) -> Result<Option<(String, CpuSet)>, String> {
        let cmdline = self.cmdline.as_ref().map_err(Clone::clone)?;
        match cmdline.get(name) {
            None => Ok(None),
            Some(None) => Ok(Some((name.to_string(), CpuSet::new()))),
            Some(Some(v)) => parse_param_list(v, &self.possible)
                .map(|set| Some((format!("{name}={v}"), set)))
                .map_err(|e| format!("cannot parse {name}={v} on the kernel command line: {e}")),
        }
    }

    fn grub_fix(&self, param: String) -> String {
        format!("add {param} {GRUB_HOWTO}")
    }

    fn isolcpus(&self) -> Item {
        const ID: &str = "isolcpus";
        let g = self.guarded;
        let fix = self.grub_fix(format!("isolcpus=managed_irq,domain,{g}"));
        let raw = match &self.cmdline {
            Ok(c) => c.get("isolcpus").map(|v| v.unwrap_or("")),
            Err(e) => return warn(ID, e.clone(), fix),
        };
        let parsed = raw.map(|v| Isolcpus::parse(v, &self.possible));
        let cpuset_path = self.host.sys.join("fs/cgroup/cpuset.cpus.isolated");
        let cpuset_isolated = read_opt(&cpuset_path)
            .ok()
            .flatten()
            .and_then(|s| CpuSet::parse(&s).ok())
            .unwrap_or_default();
        let isolated = &self.topo.isolated;
        if g.is_subset(isolated) {
            let mut msg = format!(
                "guarded CPUs {g} are isolated from scheduler load balancing (isolated: {isolated}"
            );
            if let Some(v) = raw {
                msg.push_str(&format!(", isolcpus={v}"));
            }
            msg.push(')');
            if let Some(Ok(iso)) = &parsed
                && !iso.managed_irq()
            {
                msg.push_str(
                    "; add the managed_irq flag to also keep kernel-managed device IRQs off them",
                );
            }
            let spare = isolated.intersection(&self.topo.online).difference(g);
            if !spare.is_empty() {
                msg.push_str(&format!(
                    "; CPUs {spare} are isolated but not guarded: nothing balances work onto them"
                ));
            }
            return pass(ID, msg);
        }
        if g.is_subset(&isolated.union(&cpuset_isolated)) {
            return pass(
                ID,
                format!(
                    "guarded CPUs {g} are isolated (cgroup cpuset partition: cpuset.cpus.isolated={cpuset_isolated}, isolcpus: {isolated})"
                ),
            );
        }
        let missing = g.difference(&isolated.union(&cpuset_isolated));
        let why = match (raw, parsed) {
            (None, _) => "isolcpus= is not on the kernel command line".to_string(),
            (Some(v), Some(Err(e))) => format!("isolcpus={v} cannot be parsed: {e}"),
            (Some(v), Some(Ok(iso))) if !iso.domain() => {
                format!(
                    "isolcpus={v} lacks the domain flag, so no CPU is taken out of load balancing"
                )
            }
            (Some(v), _) => format!("isolcpus={v} leaves out guarded CPUs {missing}"),
        };
        fail(
            ID,
            format!(
                "{why}: the scheduler may place any task on guarded CPUs {missing}, and pinguard can only evict it afterwards"
            ),
            fix,
        )
    }

    fn nohz_full(&self) -> Item {
        const ID: &str = "nohz_full";
        let g = self.guarded;
        let effective = &self.topo.nohz_full;
        let supported = self.host.sys.join("devices/system/cpu/nohz_full").exists();
        let mut fix = self.grub_fix(format!("nohz_full={g}"));
        if g.contains(0) {
            fix.push_str(
                " (CPU 0 keeps the timekeeping tick and cannot be nohz_full: guard other CPUs)",
            );
        }
        if g.is_subset(effective) {
            return pass(
                ID,
                format!(
                    "the scheduler tick stops on guarded CPUs {g} while one task runs (nohz_full: {effective})"
                ),
            );
        }
        let missing = g.difference(effective);
        let cmd = match self.param_list("nohz_full") {
            Ok(c) => c,
            Err(e) => return warn(ID, e, fix),
        };
        match cmd {
            Some((text, set)) if g.is_subset(&set) => {
                let why = if supported {
                    format!("the kernel applied only {effective}")
                } else {
                    "this kernel was built without CONFIG_NO_HZ_FULL".to_string()
                };
                warn(
                    ID,
                    format!(
                        "{text} is on the kernel command line but {why}: the tick still interrupts guarded CPUs {missing}"
                    ),
                    "boot a kernel built with CONFIG_NO_HZ_FULL=y (most distribution kernels are)",
                )
            }
            other => {
                let what = match other {
                    Some((text, _)) => format!("{text} leaves out guarded CPUs {missing}"),
                    None => "nohz_full= is not on the kernel command line".to_string(),
                };
                warn(
                    ID,
                    format!(
                        "{what}: the scheduler tick interrupts guarded CPUs {missing} up to HZ times a second even while a single vCPU runs"
                    ),
                    fix,
                )
            }
        }
    }

    fn rcu_nocbs(&self) -> Item {
        const ID: &str = "rcu_nocbs";
        let g = self.guarded;
        let fix = self.grub_fix(format!("rcu_nocbs={g}"));
        let (text, listed) = match self.param_list("rcu_nocbs") {
            Ok(Some((t, s))) => (Some(t), s),
            Ok(None) => (None, CpuSet::new()),
            Err(e) => return warn(ID, e, fix),
        };
        // nohz_full CPUs are offloaded as if listed in rcu_nocbs=.
        let nohz = &self.topo.nohz_full;
        let offloaded = listed.union(nohz);
        if g.is_subset(&offloaded) {
            let how = match &text {
                Some(t) if g.is_subset(&listed) => t.clone(),
                _ => format!("implied by nohz_full={nohz}"),
            };
            return pass(
                ID,
                format!("RCU callbacks of guarded CPUs {g} run in rcuo kthreads elsewhere ({how})"),
            );
        }
        let missing = g.difference(&offloaded);
        let what = match text {
            Some(t) => format!("{t} leaves out guarded CPUs {missing}"),
            None => "rcu_nocbs= is not on the kernel command line".into(),
        };
        warn(
            ID,
            format!(
                "{what}: RCU callbacks of guarded CPUs {missing} run in softirq context on those CPUs"
            ),
            fix,
        )
    }

    fn irqaffinity(&self) -> Item {
        const ID: &str = "irqaffinity";
        let g = self.guarded;
        let hk = self.housekeeping;
        let boot_fix = self.grub_fix(format!("irqaffinity={hk}"));
        let cmd = match self.param_list("irqaffinity") {
            Ok(c) => c,
            Err(e) => return warn(ID, e, boot_fix),
        };
        let path = self.host.proc.join("irq/default_smp_affinity");
        let default = match read_opt(&path) {
            Ok(Some(s)) => CpuSet::parse_mask(&s).ok(),
            Ok(None) => None,
            Err(e) => return unreadable(ID, &path, &e),
        };
        let cmd_ok = cmd
            .as_ref()
            .is_some_and(|(_, set)| !set.is_empty() && !set.intersects(g));
        let cmd_text = match &cmd {
            None => "irqaffinity= is not on the kernel command line".to_string(),
            Some((t, set)) if set.intersects(g) => {
                format!("{t} includes guarded CPUs {}", set.intersection(g))
            }
            Some((t, _)) => t.clone(),
        };
        match default {
            Some(d) if d.intersects(g) => warn(
                ID,
                format!(
                    "new IRQs default to CPUs {d} (/proc/irq/default_smp_affinity), including guarded CPUs {} ({cmd_text})",
                    d.intersection(g)
                ),
                format!(
                    "`echo {} > /proc/irq/default_smp_affinity` now; to keep it, {boot_fix}",
                    hk.to_mask()
                ),
            ),
            Some(d) if !cmd_ok => warn(
                ID,
                format!(
                    "new IRQs default to housekeeping CPUs {d} until reboot, but {cmd_text}: after a reboot they may land on guarded CPUs {g}"
                ),
                boot_fix,
            ),
            Some(d) => pass(
                ID,
                format!("new IRQs default to housekeeping CPUs {d} ({cmd_text})"),
            ),
            None if cmd_ok => pass(
                ID,
                format!("new IRQs default to housekeeping CPUs ({cmd_text})"),
            ),
            None => warn(
                ID,
                format!("{cmd_text}: new IRQs may default to guarded CPUs {g}"),
                boot_fix,
            ),
        }
    }

    fn irqs(&self) -> Item {
        const ID: &str = "irqs";
        let g = self.guarded;
        let irq_dir = self.host.proc.join("irq");
        let interrupts_path = self.host.proc.join("interrupts");
        let interrupts = match read_opt(&interrupts_path) {
            Ok(Some(t)) => Some(parse_interrupts(&t)),
            Ok(None) => None,
            Err(e) => return unreadable(ID, &interrupts_path, &e),
        };
        let mut numbers: Vec<u32> = match fs::read_dir(&irq_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect(),
            Err(e) => return unreadable(ID, &irq_dir, &e),
        };
        numbers.sort_unstable();
        let mut findings = Vec::new();
        let mut checked = 0;
        for irq in numbers {
            // The system timer and the PIC cascade stay where the kernel put them.
            if irq == 0 || irq == 2 {
                continue;
            }
            let dir = irq_dir.join(irq.to_string());
            let action = match interrupts.as_ref().and_then(|m| m.get(&irq)) {
                Some(a) => a.clone(),
                None => subdirs(&dir).join(", "),
            };
            let listed = interrupts.as_ref().is_some_and(|m| m.contains_key(&irq));
            if !listed && action.is_empty() {
                // Allocated without a handler: it cannot fire.
                continue;
            }
            let list_path = dir.join("smp_affinity_list");
            let Ok(Some(text)) = read_opt(&list_path) else {
                // Freed while we looked.
                continue;
            };
            let Ok(affinity) = CpuSet::parse(&text) else {
                continue;
            };
            checked += 1;
            let effective = read_opt(&dir.join("effective_affinity_list"))
                .ok()
                .flatten()
                .and_then(|t| CpuSet::parse(&t).ok());
            let reach = affinity.union(effective.as_ref().unwrap_or(&CpuSet::new()));
            if !reach.intersects(g) {
                continue;
            }
            // Kernels that refuse affinity changes (managed, per-CPU) make the file read-only.
            let movable = fs::metadata(&list_path)
                .map(|m| m.permissions().mode() & 0o200 != 0)
                .unwrap_or(true);
            let node: Option<u32> = read_opt(&dir.join("node"))
                .ok()
                .flatten()
                .and_then(|t| t.trim().parse().ok());
            let target = node
                .and_then(|n| self.topo.nodes.get(&n))
                .map(|cpus| cpus.intersection(self.housekeeping))
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| self.housekeeping.clone());
            // x86 IO-APIC and similar defer a move until the IRQ next fires.
            let pending = !affinity.intersects(g);
            findings.push(IrqFinding {
                pending,
                irq,
                action: if action.is_empty() {
                    "?".into()
                } else {
                    action
                },
                affinity,
                effective,
                movable,
                target,
            });
        }
        let describe = |f: &IrqFinding| {
            let eff = f
                .effective
                .as_ref()
                .map(|e| format!(", effective {e}"))
                .unwrap_or_default();
            let note = if !f.movable {
                " [kernel-managed: cannot be moved]"
            } else if f.pending {
                " [move pending: happens at its next interrupt]"
            } else {
                ""
            };
            format!(
                "IRQ {} ({}): affinity {}{eff}{note}",
                f.irq, f.action, f.affinity
            )
        };
        let numbers = |v: &[&IrqFinding]| {
            let s: Vec<String> = v.iter().map(|f| f.irq.to_string()).collect();
            format!(
                "{} {}",
                if v.len() == 1 { "IRQ" } else { "IRQs" },
                s.join(" ")
            )
        };
        let to_move: Vec<&IrqFinding> = findings
            .iter()
            .filter(|f| f.movable && !f.pending)
            .collect();
        let managed: Vec<&IrqFinding> = findings.iter().filter(|f| !f.movable).collect();
        let pending: Vec<&IrqFinding> =
            findings.iter().filter(|f| f.movable && f.pending).collect();
        if findings.is_empty() {
            return pass(
                ID,
                format!(
                    "none of the {checked} device IRQs may fire on guarded CPUs {g} (IRQ 0, 2 and per-CPU vectors are not movable and not counted)"
                ),
            );
        }
        // One command per target set, grouping IRQs that go to the same CPUs.
        let mut by_target: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for f in &to_move {
            by_target
                .entry(f.target.to_string())
                .or_default()
                .push(f.irq);
        }
        let mut fixes: Vec<String> = by_target
            .iter()
            .map(|(target, irqs)| match irqs.as_slice() {
                [one] => format!("echo {target} > /proc/irq/{one}/smp_affinity_list"),
                many => format!(
                    "for irq in {}; do echo {target} > /proc/irq/$irq/smp_affinity_list; done",
                    many.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            })
            .collect();
        if !managed.is_empty() {
            fixes.push(format!(
                "kernel-managed {} cannot be moved at runtime: {}",
                numbers(&managed),
                self.grub_fix(format!("isolcpus=managed_irq,domain,{g}"))
            ));
        }
        if !pending.is_empty() {
            fixes.push(format!(
                "{}: affinity already excludes guarded CPUs, the kernel moves each at its next interrupt (nothing to do)",
                numbers(&pending)
            ));
        }
        let lines: Vec<String> = findings.iter().map(describe).collect();
        let message = format!(
            "{} of {checked} IRQs may fire on guarded CPUs {g}:\n{}",
            findings.len(),
            capped(&lines, 20)
        );
        // Only IRQs a command can move right now make this a failure.
        let status = if to_move.is_empty() {
            Status::Warn
        } else {
            Status::Fail
        };
        let mut item = not_ok(ID, status, message, fixes.join("\n"));
        item.irqs = findings;
        item
    }

    fn workqueue(&self) -> Item {
        const ID: &str = "workqueue";
        let g = self.guarded;
        let hk = self.housekeeping;
        let path = self.host.sys.join("devices/virtual/workqueue/cpumask");
        let fix = format!(
            "`echo {} > /sys/devices/virtual/workqueue/cpumask`; to keep it across reboots add workqueue.unbound_cpus={hk} (Linux 6.6+) {GRUB_HOWTO}",
            hk.to_mask()
        );
        let text = match read_opt(&path) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return warn(
                    ID,
                    format!(
                        "{} is missing: cannot tell where unbound workqueue workers run",
                        path.display()
                    ),
                    "mount sysfs at /sys; kernels since 4.2 have this file",
                );
            }
            Err(e) => return unreadable(ID, &path, &e),
        };
        let mask = match CpuSet::parse_mask(&text) {
            Ok(m) => m,
            Err(e) => {
                return warn(ID, format!("cannot parse {}: {e}", path.display()), fix);
            }
        };
        if mask.intersects(g) {
            fail(
                ID,
                format!(
                    "unbound workqueue workers (kworker/u*) may run on guarded CPUs {} (cpumask {} = CPUs {mask})",
                    mask.intersection(g),
                    text.trim()
                ),
                fix,
            )
        } else {
            pass(
                ID,
                format!("unbound workqueue workers run on CPUs {mask} only"),
            )
        }
    }

    fn preemption(&self) -> Item {
        const ID: &str = "preemption";
        let realtime = read_opt(&self.host.sys.join("kernel/realtime"))
            .ok()
            .flatten()
            .is_some_and(|s| s.trim() == "1");
        let version = read_opt(&self.host.proc.join("sys/kernel/version"))
            .ok()
            .flatten()
            .unwrap_or_default();
        let version = version.trim();
        let has_word = |w: &str| version.split_whitespace().any(|x| x == w);
        if realtime || has_word("PREEMPT_RT") {
            let how = if realtime {
                "/sys/kernel/realtime = 1"
            } else {
                "uname -v"
            };
            return pass(
                ID,
                format!(
                    "PREEMPT_RT kernel ({how}): host-side latency for real-time guests is bounded"
                ),
            );
        }
        // PREEMPT_DYNAMIC kernels report the active mode as "none (voluntary) full".
        let debugfs = read_opt(&self.host.sys.join("kernel/debug/sched/preempt"))
            .ok()
            .flatten()
            .and_then(|s| {
                let start = s.find('(')?;
                let end = s[start..].find(')')? + start;
                Some(s[start + 1..end].to_string())
            });
        let boot = self
            .cmdline
            .as_ref()
            .ok()
            .and_then(|c| c.get("preempt").flatten().map(str::to_string));
        let dynamic = has_word("PREEMPT_DYNAMIC");
        let (model, mode) = match (debugfs, boot) {
            (Some(m), _) => (format!("PREEMPT_DYNAMIC, mode {m}"), Some(m)),
            (None, Some(m)) => (format!("PREEMPT_DYNAMIC, preempt={m} at boot"), Some(m)),
            (None, None) if dynamic => (
                "PREEMPT_DYNAMIC, mode unknown: `mount -t debugfs none /sys/kernel/debug` to read /sys/kernel/debug/sched/preempt"
                    .to_string(),
                None,
            ),
            (None, None) if has_word("PREEMPT") => ("CONFIG_PREEMPT (full)".to_string(), Some("full".into())),
            (None, None) => ("voluntary or no preemption".to_string(), None),
        };
        let mut fix = "for real-time guests boot a PREEMPT_RT kernel (Debian: `apt install linux-image-rt-amd64`; RHEL: kernel-rt)".to_string();
        if dynamic && mode.as_deref() != Some("full") {
            fix.push_str(&format!(
                "; otherwise at least add preempt=full {GRUB_HOWTO}"
            ));
        }
        warn(
            ID,
            format!(
                "not a PREEMPT_RT kernel ({model}): fine for general-purpose guests, but host kernel paths can delay a real-time guest's vCPU for milliseconds"
            ),
            fix,
        )
    }

    fn rt_throttling(&self) -> Item {
        const ID: &str = "sched_rt_runtime";
        let path = self.host.proc.join("sys/kernel/sched_rt_runtime_us");
        let text = match read_opt(&path) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return pass(
                    ID,
                    "no RT throttling sysctl on this kernel (kernel.sched_rt_runtime_us is absent)",
                );
            }
            Err(e) => return unreadable(ID, &path, &e),
        };
        let Ok(runtime) = text.trim().parse::<i64>() else {
            return warn(
                ID,
                format!("cannot parse {}: {:?}", path.display(), text.trim()),
                "`sysctl kernel.sched_rt_runtime_us` to inspect it",
            );
        };
        if runtime < 0 {
            return pass(
                ID,
                "RT throttling is off (kernel.sched_rt_runtime_us = -1): a SCHED_FIFO vCPU may use all of its guarded CPU; \
                 the trade-off is that a runaway real-time task can starve that CPU's kernel threads, so keep IRQs, \
                 RCU callbacks and workqueues off guarded CPUs",
            );
        }
        let period = read_opt(&self.host.proc.join("sys/kernel/sched_rt_period_us"))
            .ok()
            .flatten()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(1_000_000);
        warn(
            ID,
            format!(
                "RT throttling is on (kernel.sched_rt_runtime_us = {runtime} of {period} us): a SCHED_FIFO vCPU is descheduled for {} us every period. \
                 -1 turns throttling off, at the cost of no safety net against a runaway real-time task (fine when nothing else needs the guarded CPUs; \
                 irrelevant for SCHED_OTHER vCPUs)",
                (period - runtime).max(0)
            ),
            "`sysctl -w kernel.sched_rt_runtime_us=-1`; to keep it: `echo kernel.sched_rt_runtime_us=-1 > /etc/sysctl.d/90-pinguard.conf`",
        )
    }

    fn timer_migration(&self) -> Item {
        const ID: &str = "timer_migration";
        let path = self.host.proc.join("sys/kernel/timer_migration");
        let text = match read_opt(&path) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return pass(
                    ID,
                    "no kernel.timer_migration on this kernel (built without NO_HZ_COMMON): timers stay on the CPU that armed them",
                );
            }
            Err(e) => return unreadable(ID, &path, &e),
        };
        match text.trim() {
            "0" => pass(
                ID,
                "kernel.timer_migration = 0: timers fire on the CPU that armed them",
            ),
            v => warn(
                ID,
                format!(
                    "kernel.timer_migration = {v}: idle CPUs hand their timers to busy CPUs, and a CPU running a vCPU is always busy, \
                     so housekeeping timers can fire on guarded CPUs {}{}; 0 keeps each timer on the CPU that armed it \
                     (at the cost of more wakeups of idle housekeeping CPUs)",
                    self.guarded,
                    if self.guarded.is_subset(&self.topo.nohz_full) {
                        " (less so here: kernels avoid nohz_full CPUs as timer targets)"
                    } else {
                        ""
                    }
                ),
                "`sysctl -w kernel.timer_migration=0`; to keep it: `echo kernel.timer_migration=0 > /etc/sysctl.d/90-pinguard.conf`",
            ),
        }
    }

    fn cpufreq(&self) -> Item {
        const ID: &str = "cpufreq";
        let g = self.guarded;
        let mut by_governor: BTreeMap<String, CpuSet> = BTreeMap::new();
        let mut none = CpuSet::new();
        for cpu in g.iter() {
            let path = self.host.sys.join(format!(
                "devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"
            ));
            match read_opt(&path) {
                Ok(Some(t)) => {
                    by_governor
                        .entry(t.trim().to_string())
                        .or_default()
                        .insert(cpu);
                }
                Ok(None) => {
                    none.insert(cpu);
                }
                Err(e) => return unreadable(ID, &path, &e),
            }
        }
        if by_governor.is_empty() {
            return pass(
                ID,
                format!("no cpufreq (VM or fixed frequency) on guarded CPUs {g}"),
            );
        }
        let summary = by_governor
            .iter()
            .map(|(gov, cpus)| format!("{gov} on {cpus}"))
            .chain((!none.is_empty()).then(|| format!("no cpufreq on {none}")))
            .collect::<Vec<_>>()
            .join(", ");
        let slow: CpuSet = by_governor
            .iter()
            .filter(|(gov, _)| gov.as_str() != "performance")
            .fold(CpuSet::new(), |acc, (_, cpus)| acc.union(cpus));
        if slow.is_empty() {
            return pass(ID, format!("governor {summary}"));
        }
        warn(
            ID,
            format!(
                "governor {summary}: guarded CPUs {slow} change frequency with load, so a vCPU waking from idle runs slowly at first"
            ),
            format!(
                "`cpupower -c {slow} frequency-set -g performance` (or write performance to /sys/devices/system/cpu/cpuN/cpufreq/scaling_governor); \
                 to keep it, use a tuned profile such as cpu-partitioning or a systemd unit"
            ),
        )
    }

    fn smt(&self) -> Item {
        const ID: &str = "smt";
        let g = self.guarded;
        // A hardware thread shares its core's execution units and caches with
        // its siblings: housekeeping work on a sibling slows the guarded one.
        let shared: CpuSet = g
            .iter()
            .filter(|c| self.topo.siblings(*c).intersects(self.housekeeping))
            .collect();
        if shared.is_empty() {
            let smt = g.iter().any(|c| self.topo.siblings(c).len() > 1);
            return pass(
                ID,
                if smt {
                    format!(
                        "guarded CPUs {g} are whole cores: no SMT sibling does housekeeping work"
                    )
                } else {
                    format!("guarded CPUs {g} have no SMT siblings")
                },
            );
        }
        let whole: CpuSet = g
            .iter()
            .fold(CpuSet::new(), |acc, c| acc.union(&self.topo.siblings(c)));
        let partners = whole.difference(g);
        let alternative = if whole.len() < self.topo.online.len() {
            format!("guard whole cores (--guard {whole}) or ")
        } else {
            String::new()
        };
        warn(
            ID,
            format!(
                "guarded CPUs {shared} share cores with housekeeping CPUs {partners}: work there competes for the same core and caches"
            ),
            format!(
                "{alternative}turn SMT off: `echo off > /sys/devices/system/cpu/smt/control` (nosmt on the kernel command line to keep it)"
            ),
        )
    }

    fn irqbalance(&self) -> Item {
        const ID: &str = "irqbalance";
        let g = self.guarded;
        let proc = Proc::new(&self.host.proc);
        let pids = match proc.pids() {
            Ok(p) => p,
            Err(e) => return unreadable(ID, &self.host.proc, &e),
        };
        let running: Vec<u32> = pids
            .into_iter()
            .filter(|pid| {
                proc.comm(*pid, *pid)
                    .ok()
                    .flatten()
                    .is_some_and(|c| c == "irqbalance")
            })
            .collect();
        let config = ["default/irqbalance", "sysconfig/irqbalance"]
            .iter()
            .map(|p| self.host.etc.join(p))
            .find(|p| p.exists());
        let config_name = config.as_ref().map_or_else(
            || {
                "/etc/default/irqbalance (Debian/Ubuntu) or /etc/sysconfig/irqbalance (RHEL)"
                    .to_string()
            },
            |p| {
                format!(
                    "/etc/{}",
                    p.strip_prefix(&self.host.etc).unwrap_or(p).display()
                )
            },
        );
        let config_env = config
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .map(|t| parse_env_file(&t));
        let fix = format!(
            "set IRQBALANCE_BANNED_CPULIST={g} in {config_name} and `systemctl restart irqbalance`, \
             or stop it: `systemctl disable --now irqbalance`"
        );
        if running.is_empty() {
            return pass(ID, "irqbalance is not running");
        }
        let mut worst = Status::Pass;
        let mut notes = Vec::new();
        for pid in &running {
            let (env, source) = match proc.environ(*pid) {
                Ok(Some(vars)) => (
                    vars.into_iter().collect::<BTreeMap<_, _>>(),
                    "its environment",
                ),
                Ok(None) => continue,
                Err(_) => match &config_env {
                    // Reading another user's environ needs root; the config is the next best thing.
                    Some(c) => (
                        c.clone(),
                        "the config file (cannot read its environment: run as root)",
                    ),
                    None => (
                        BTreeMap::new(),
                        "defaults (cannot read its environment: run as root)",
                    ),
                },
            };
            let (banned, how) = irqbalance_banned(&env, self.topo);
            let exposed = g.difference(&banned);
            let status = if exposed.is_empty() {
                Status::Pass
            } else {
                Status::Fail
            };
            worst = worst.max(status);
            let mut note = if exposed.is_empty() {
                format!(
                    "irqbalance (pid {pid}) keeps IRQs off guarded CPUs {g}: {how} (read from {source})"
                )
            } else {
                format!(
                    "irqbalance (pid {pid}) may move IRQs onto guarded CPUs {exposed} and undo manual IRQ affinity: {how} (read from {source})"
                )
            };
            let keys = ["IRQBALANCE_BANNED_CPUS", "IRQBALANCE_BANNED_CPULIST"];
            if let Some(cfg) = &config_env
                && source == "its environment"
                && keys.iter().any(|k| {
                    cfg.get(*k).filter(|v| !v.is_empty()) != env.get(*k).filter(|v| !v.is_empty())
                })
            {
                note.push_str(&format!(
                    " ({config_name} differs from what it started with: `systemctl restart irqbalance`)"
                ));
            }
            notes.push(note);
        }
        if notes.is_empty() {
            return pass(ID, "irqbalance is not running");
        }
        let message = notes.join("\n");
        match worst {
            Status::Pass => pass(ID, message),
            status => not_ok(ID, status, message, fix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Host {
        Host::under(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
    }

    fn set(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

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
        // The unused IRQ 200 (affinity 0-63, no handler) and IRQ 0 are not counted.
        let irqs = report.item("irqs").unwrap();
        assert!(
            irqs.message.contains("none of the 6 device IRQs"),
            "{}",
            irqs.message
        );
        assert!(
            report
                .item("rcu_nocbs")
                .unwrap()
                .message
                .contains("rcu_nocbs=2-15"),
            "{:?}",
            report.item("rcu_nocbs")
        );
        assert!(
            report
                .item("preemption")
                .unwrap()
                .message
                .contains("PREEMPT_RT")
        );
        assert!(
            report
                .item("irqbalance")
                .unwrap()
                .message
                .contains("IRQBALANCE_BANNED_CPULIST=2-15,18-31,34-47,50-63")
        );
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
        let smt = report.item("smt").unwrap();
        assert!(
            smt.message
                .contains("guarded CPUs 1-15 share cores with housekeeping CPUs 33-47"),
            "{}",
            smt.message
        );
        assert!(
            smt.fix
                .as_deref()
                .unwrap()
                .starts_with("guard whole cores (--guard 1-15,33-47)"),
            "{:?}",
            smt.fix
        );
        let irqs = report.item("irqs").unwrap();
        let found: Vec<u32> = irqs.irqs.iter().map(|f| f.irq).collect();
        // 9 and 121 (effective CPU 1), plus 8 and 120 whose affinity includes CPU 1.
        assert_eq!(found, vec![8, 9, 120, 121]);
        // Device IRQs move to housekeeping CPUs on their own NUMA node.
        let f120 = irqs.irqs.iter().find(|f| f.irq == 120).unwrap();
        assert_eq!(f120.target, set("0,32-47"));
        assert_eq!(f120.action, "mlx5_comp0@pci:0000:3b:00.0");
        let fix = irqs.fix.as_deref().unwrap();
        assert!(
            fix.contains(
                "for irq in 120 121; do echo 0,32-47 > /proc/irq/$irq/smp_affinity_list; done"
            ),
            "{fix}"
        );
        assert!(
            fix.contains(
                "for irq in 8 9; do echo 0,16-63 > /proc/irq/$irq/smp_affinity_list; done"
            ),
            "{fix}"
        );
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
            Some("isolcpus=managed_irq,domain,1 nohz_full=1 rcu_nocbs=1 irqaffinity=0")
        );

        let item = |id| report.item(id).unwrap();
        // Parameters after "--" belong to init and must not count.
        assert!(
            item("isolcpus")
                .message
                .contains("isolcpus= is not on the kernel command line")
        );
        assert!(
            item("isolcpus")
                .fix
                .as_deref()
                .unwrap()
                .contains("grub2-mkconfig -o /boot/grub2/grub.cfg")
        );
        assert!(item("nohz_full").message.contains("nohz_full= is not on"));
        assert!(
            item("nohz_full")
                .fix
                .as_deref()
                .unwrap()
                .contains("nohz_full=1 ")
        );
        assert!(
            item("rcu_nocbs")
                .fix
                .as_deref()
                .unwrap()
                .contains("rcu_nocbs=1 ")
        );
        assert!(
            item("irqaffinity")
                .fix
                .as_deref()
                .unwrap()
                .contains("echo 1 > /proc/irq/default_smp_affinity")
        );
        assert!(
            item("irqaffinity")
                .fix
                .as_deref()
                .unwrap()
                .contains("irqaffinity=0 ")
        );

        let irqs = item("irqs");
        let found: Vec<(u32, &str)> = irqs
            .irqs
            .iter()
            .map(|f| (f.irq, f.action.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                (1, "i8042"),
                (9, "acpi"),
                (16, "ehci_hcd:usb1, i801_smbus"),
                (24, "virtio0-input.0"),
            ]
        );
        assert!(
            irqs.message
                .contains("IRQ 16 (ehci_hcd:usb1, i801_smbus): affinity 0-1, effective 1"),
            "{}",
            irqs.message
        );
        assert_eq!(
            irqs.fix.as_deref(),
            Some("for irq in 1 9 16 24; do echo 0 > /proc/irq/$irq/smp_affinity_list; done")
        );

        let wq = item("workqueue");
        assert!(
            wq.message.contains("guarded CPUs 1 (cpumask 3 = CPUs 0-1)"),
            "{}",
            wq.message
        );
        assert!(
            wq.fix
                .as_deref()
                .unwrap()
                .contains("echo 1 > /sys/devices/virtual/workqueue/cpumask")
        );

        let pre = item("preemption");
        assert!(
            pre.message.contains("PREEMPT_DYNAMIC, mode voluntary"),
            "{}",
            pre.message
        );
        assert!(pre.fix.as_deref().unwrap().contains("preempt=full"));

        let rt = item("sched_rt_runtime");
        assert!(
            rt.message.contains("950000 of 1000000 us"),
            "{}",
            rt.message
        );
        assert!(
            rt.message.contains("50000 us every period"),
            "{}",
            rt.message
        );
        assert!(
            rt.fix
                .as_deref()
                .unwrap()
                .contains("sysctl -w kernel.sched_rt_runtime_us=-1")
        );

        assert!(
            item("timer_migration")
                .fix
                .as_deref()
                .unwrap()
                .contains("sysctl -w kernel.timer_migration=0")
        );

        let freq = item("cpufreq");
        assert!(freq.message.contains("powersave on 1"), "{}", freq.message);
        assert!(
            freq.fix
                .as_deref()
                .unwrap()
                .contains("cpupower -c 1 frequency-set -g performance")
        );

        let smt = item("smt");
        assert!(
            smt.message
                .contains("guarded CPUs 1 share cores with housekeeping CPUs 0"),
            "{}",
            smt.message
        );
        // Guarding the whole core would leave nothing: only turning SMT off helps.
        assert_eq!(
            smt.fix.as_deref(),
            Some(
                "turn SMT off: `echo off > /sys/devices/system/cpu/smt/control` (nosmt on the kernel command line to keep it)"
            )
        );

        let irqb = item("irqbalance");
        assert!(irqb.message.contains("pid 812"), "{}", irqb.message);
        assert!(
            irqb.message.contains("no CPU is banned"),
            "{}",
            irqb.message
        );
        assert!(
            irqb.fix
                .as_deref()
                .unwrap()
                .contains("IRQBALANCE_BANNED_CPULIST=1 in /etc/default/irqbalance"),
            "{:?}",
            irqb.fix
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

    /// Copies a fixture into a temporary directory so a test can change it.
    fn copy_fixture(name: &str) -> tempfile::TempDir {
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
        let dir = tempfile::tempdir().unwrap();
        copy(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
            dir.path(),
        );
        dir
    }

    #[test]
    fn managed_irqs_only_warn() {
        let dir = copy_fixture("small-2cpu");
        let root = dir.path();
        let read_only = |irq: u32| root.join(format!("proc/irq/{irq}/smp_affinity_list"));
        fs::set_permissions(read_only(24), fs::Permissions::from_mode(0o444)).unwrap();
        // Movable IRQs still fail; the managed one gets the boot-time fix.
        let report = check(&Host::under(root), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        assert_eq!(irqs.status, Status::Fail, "{irqs:#?}");
        let fix = irqs.fix.as_deref().unwrap();
        assert!(
            fix.starts_with(
                "for irq in 1 9 16; do echo 0 > /proc/irq/$irq/smp_affinity_list; done\n"
            ),
            "{fix}"
        );
        assert!(
            fix.contains("kernel-managed IRQ 24 cannot be moved at runtime: add isolcpus=managed_irq,domain,1 "),
            "{fix}"
        );
        assert!(
            irqs.message
                .contains("IRQ 24 (virtio0-input.0): affinity 1, effective 1 [kernel-managed"),
            "{}",
            irqs.message
        );
        // Every IRQ on CPU 1 is kernel-managed: read-only affinity files.
        for irq in [1, 9, 16, 24] {
            let p = root.join(format!("proc/irq/{irq}/smp_affinity_list"));
            fs::set_permissions(&p, fs::Permissions::from_mode(0o444)).unwrap();
        }
        let report = check(&Host::under(root), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        assert_eq!(irqs.status, Status::Warn, "{irqs:#?}");
        assert!(irqs.irqs.iter().all(|f| !f.movable));
        assert!(irqs.message.contains("cannot be moved"), "{}", irqs.message);
        assert!(
            irqs.fix
                .as_deref()
                .unwrap()
                .contains("isolcpus=managed_irq,domain,1")
        );
    }

    #[test]
    fn pending_moves_only_warn() {
        let dir = copy_fixture("small-2cpu");
        let root = dir.path();
        // Written but not yet effective: IO-APIC IRQs move when they next fire.
        fs::write(root.join("proc/irq/16/smp_affinity_list"), "0\n").unwrap();
        let report = check(&Host::under(root), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        assert_eq!(irqs.status, Status::Fail);
        let f16 = irqs.irqs.iter().find(|f| f.irq == 16).unwrap();
        assert!(f16.pending && f16.movable);
        let fix = irqs.fix.as_deref().unwrap();
        assert!(
            fix.starts_with(
                "for irq in 1 9 24; do echo 0 > /proc/irq/$irq/smp_affinity_list; done\n"
            ),
            "{fix}"
        );
        assert!(
            fix.contains("IRQ 16: affinity already excludes guarded CPUs"),
            "{fix}"
        );
        assert!(irqs.message.contains("[move pending"), "{}", irqs.message);

        for irq in [1, 9, 24] {
            fs::write(
                root.join(format!("proc/irq/{irq}/smp_affinity_list")),
                "0\n",
            )
            .unwrap();
        }
        let report = check(&Host::under(root), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        assert_eq!(irqs.status, Status::Warn, "{irqs:#?}");
        // IRQ 9 was already delivered to CPU 0, so it is fully moved.
        let found: Vec<u32> = irqs.irqs.iter().map(|f| f.irq).collect();
        assert_eq!(found, vec![1, 16, 24]);
        assert!(irqs.irqs.iter().all(|f| f.pending));
        assert!(
            !irqs.fix.as_deref().unwrap().contains("echo"),
            "{:?}",
            irqs.fix
        );
    }

    #[test]
    fn no_cpufreq_passes_with_note() {
        let dir = copy_fixture("small-2cpu");
        fs::remove_dir_all(dir.path().join("sys/devices/system/cpu/cpu1/cpufreq")).unwrap();
        let report = check(&Host::under(dir.path()), Some(&set("1"))).unwrap();
        let item = report.item("cpufreq").unwrap();
        assert_eq!(item.status, Status::Pass);
        assert!(
            item.message.contains("no cpufreq (VM or fixed frequency)"),
            "{}",
            item.message
        );
    }

    #[test]
    fn irqbalance_bans_isolated_cpus_by_default_and_config_drift_is_noted() {
        let dir = copy_fixture("intel-2s16c2t");
        let root = dir.path();
        // Started without the variable: irqbalance bans isolated+nohz_full itself.
        fs::write(root.join("proc/1042/environ"), b"PATH=/usr/bin\0").unwrap();
        let report = check(&Host::under(root), None).unwrap();
        let item = report.item("irqbalance").unwrap();
        assert_eq!(item.status, Status::Pass, "{item:#?}");
        assert!(
            item.message
                .contains("bans the isolated and nohz_full CPUs"),
            "{}",
            item.message
        );
        assert!(
            item.message.contains("systemctl restart irqbalance"),
            "{}",
            item.message
        );

        // A stale hex mask that misses CPU 63 wins over the default.
        fs::write(
            root.join("proc/1042/environ"),
            b"IRQBALANCE_BANNED_CPUS=7ffcfffc,fffcfffc\0",
        )
        .unwrap();
        let report = check(&Host::under(root), None).unwrap();
        let item = report.item("irqbalance").unwrap();
        assert_eq!(item.status, Status::Fail, "{item:#?}");
        assert!(item.message.contains("guarded CPUs 63"), "{}", item.message);
        assert!(
            item.fix
                .as_deref()
                .unwrap()
                .contains("/etc/sysconfig/irqbalance")
        );

        // Not running at all.
        fs::write(root.join("proc/1042/task/1042/comm"), "bash\n").unwrap();
        let report = check(&Host::under(root), None).unwrap();
        assert_eq!(report.item("irqbalance").unwrap().status, Status::Pass);
        assert!(
            report
                .item("irqbalance")
                .unwrap()
                .message
                .contains("not running")
        );
    }

    #[test]
    fn nohz_full_given_but_not_applied() {
        let dir = copy_fixture("intel-2s16c2t");
        fs::remove_file(dir.path().join("sys/devices/system/cpu/nohz_full")).unwrap();
        let report = check(&Host::under(dir.path()), None).unwrap();
        let item = report.item("nohz_full").unwrap();
        assert_eq!(item.status, Status::Warn);
        assert!(
            item.message.contains("without CONFIG_NO_HZ_FULL"),
            "{}",
            item.message
        );
        // rcu_nocbs= still covers them explicitly.
        assert_eq!(report.item("rcu_nocbs").unwrap().status, Status::Pass);
    }

    #[test]
    fn unreadable_file_warns_instead_of_passing() {
        let dir = copy_fixture("small-2cpu");
        let p = dir.path().join("proc/sys/kernel/timer_migration");
        fs::remove_file(&p).unwrap();
        // A directory where a file should be: read_to_string fails with EISDIR.
        fs::create_dir(&p).unwrap();
        let report = check(&Host::under(dir.path()), Some(&set("1"))).unwrap();
        let item = report.item("timer_migration").unwrap();
        assert_eq!(item.status, Status::Warn);
        assert!(item.message.contains("cannot read"), "{}", item.message);
    }

    #[test]
    fn isolcpus_flags_and_special_lists() {
        let possible = set("0-7");
        let i = Isolcpus::parse("domain,managed_irq,2-3", &possible).unwrap();
        assert_eq!(i.flags, vec!["domain", "managed_irq"]);
        assert_eq!(i.cpus, set("2-3"));
        assert!(i.domain() && i.managed_irq());
        let i = Isolcpus::parse("2-3,6", &possible).unwrap();
        assert!(i.flags.is_empty() && i.domain() && !i.managed_irq());
        assert_eq!(i.cpus, set("2-3,6"));
        let i = Isolcpus::parse("nohz,4-N", &possible).unwrap();
        assert!(!i.domain());
        assert_eq!(i.cpus, set("4-7"));
        assert_eq!(parse_param_list("all", &possible).unwrap(), possible);
        assert_eq!(parse_param_list("1,N", &possible).unwrap(), set("1,7"));
        assert_eq!(
            parse_param_list("0-N:2", &possible).unwrap(),
            set("0,2,4,6")
        );
        assert!(parse_param_list("x", &possible).is_err());
    }

    #[test]
    fn interrupts_parsing() {
        let text = "           CPU0       CPU1\n\
                      0:         40          0   IO-APIC   2-edge      timer\n\
                     16:          0        603   IO-APIC  16-fasteoi   ehci_hcd:usb1, i801_smbus\n\
                     30:          1          2   GICv3  30 Level     arch_timer\n\
                     44:          0          0  PCI-MSI 1-edge\n\
                    NMI:          0          0   Non-maskable interrupts\n\
                    ERR:          0\n";
        let m = parse_interrupts(text);
        assert_eq!(m[&0], "timer");
        assert_eq!(m[&16], "ehci_hcd:usb1, i801_smbus");
        assert_eq!(m[&30], "arch_timer");
        assert_eq!(m[&44], "");
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn env_files() {
        let m = parse_env_file(
            "# comment\n#IRQBALANCE_BANNED_CPULIST=9\nIRQBALANCE_BANNED_CPULIST=\"2-3\"\nexport IRQBALANCE_ARGS='--foo'\n",
        );
        assert_eq!(m["IRQBALANCE_BANNED_CPULIST"], "2-3");
        assert_eq!(m["IRQBALANCE_ARGS"], "--foo");
        assert_eq!(m.len(), 2);
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
