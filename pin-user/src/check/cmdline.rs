//! Boot-time isolation: the `isolcpus`, `nohz_full`, `rcu_nocbs` and
//! `irqaffinity` kernel parameters, compared with what the kernel applied.
use crate::host::{cpulist::CpuSet, topology::Guard};

use super::{Ctx, Item, fail, pass, read_opt, unreadable, warn};

/// The items a kernel parameter fixes: when any of them is not passing, the
/// report suggests [`boot_params`].
pub(super) const BOOT_ITEMS: [&str; 4] = ["isolcpus", "nohz_full", "rcu_nocbs", "irqaffinity"];

/// `isolcpus=` as pinguard recommends it: out of load balancing, and
/// kernel-managed device IRQs kept off too.
pub(super) fn isolcpus_param(guarded: &CpuSet) -> String {
    format!("isolcpus=managed_irq,domain,{guarded}")
}

/// Every boot parameter for this split, all at once: only those the running
/// kernel honours (`nohz_full=` needs CONFIG_NO_HZ_FULL).
pub(super) fn boot_params(guard: &Guard, nohz_full_supported: bool) -> String {
    let g = &guard.guarded;
    let nohz = if nohz_full_supported {
        format!(" nohz_full={g}")
    } else {
        String::new()
    };
    format!(
        "{}{nohz} rcu_nocbs={g} irqaffinity={}",
        isolcpus_param(g),
        guard.housekeeping
    )
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

impl Ctx<'_> {
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

    pub(super) fn isolcpus(&self) -> Item {
        const ID: &str = "isolcpus";
        let g = self.guarded;
        let fix = self.grub_fix(isolcpus_param(g));
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

    pub(super) fn nohz_full(&self) -> Item {
        const ID: &str = "nohz_full";
        let g = self.guarded;
        let effective = &self.topo.nohz_full;
        let supported = self.nohz_full_supported;
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
            // The kernel would ignore the parameter: advising it is wrong.
            _ if !supported => warn(
                ID,
                format!(
                    "this kernel was built without CONFIG_NO_HZ_FULL (no /sys/devices/system/cpu/nohz_full), so it ignores nohz_full=: the scheduler tick interrupts guarded CPUs {missing} up to HZ times a second"
                ),
                format!(
                    "nothing to add on this kernel; to stop the tick, boot a kernel built with CONFIG_NO_HZ_FULL=y (most distribution kernels are) and then add nohz_full={g} {}",
                    self.boot.howto()
                ),
            ),
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

    pub(super) fn rcu_nocbs(&self) -> Item {
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

    pub(super) fn irqaffinity(&self) -> Item {
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
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::{
        super::{Status, check, fixtures::*},
        *,
    };
    use crate::host::Host;

    #[test]
    fn good_host_names_the_parameters() {
        let report = check(&fixture("intel-2s16c2t"), None).unwrap();
        let rcu = report.item("rcu_nocbs").unwrap();
        assert!(rcu.message.contains("rcu_nocbs=2-15"), "{rcu:?}");
    }

    #[test]
    fn bad_host_gets_boot_parameters() {
        let report = check(&fixture("small-2cpu"), Some(&set("1"))).unwrap();
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
        // This kernel lacks CONFIG_NO_HZ_FULL: adding nohz_full= would do nothing.
        let nohz = item("nohz_full");
        assert!(
            nohz.message.contains("built without CONFIG_NO_HZ_FULL"),
            "{}",
            nohz.message
        );
        let fix = nohz.fix.as_deref().unwrap();
        assert!(fix.starts_with("nothing to add on this kernel"), "{fix}");
        assert!(fix.contains("CONFIG_NO_HZ_FULL=y"), "{fix}");
        assert!(
            !report
                .kernel_cmdline
                .as_deref()
                .unwrap()
                .contains("nohz_full"),
            "{:?}",
            report.kernel_cmdline
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
    }

    #[test]
    fn boot_advice_names_the_boot_loader_the_host_has() {
        let dir = copy_fixture("small-2cpu");
        fs::remove_file(dir.path().join("etc/default/grub")).unwrap();
        let report = check(&Host::under(dir.path()), Some(&set("1"))).unwrap();
        let fix = report.item("isolcpus").unwrap().fix.clone().unwrap();
        assert!(!fix.contains("grub2-mkconfig"), "{fix}");
        assert!(fix.contains("neither /etc/default/grub"), "{fix}");
        fs::create_dir_all(dir.path().join("etc/kernel")).unwrap();
        fs::write(dir.path().join("etc/kernel/cmdline"), "root=/dev/vda1\n").unwrap();
        let report = check(&Host::under(dir.path()), Some(&set("1"))).unwrap();
        let fix = report.item("rcu_nocbs").unwrap().fix.clone().unwrap();
        assert!(fix.contains("rcu_nocbs=1 to /etc/kernel/cmdline"), "{fix}");
        assert!(!fix.contains("grub2-mkconfig"), "{fix}");
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
}
