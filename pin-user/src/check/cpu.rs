//! What the guarded cores themselves do: frequency scaling and SMT
//! siblings shared with housekeeping work.
use std::collections::BTreeMap;

use super::{Ctx, Item, pass, read_opt, unreadable, warn};
use crate::host::cpulist::CpuSet;

impl Ctx<'_> {
    pub(super) fn cpufreq(&self) -> Item {
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

    pub(super) fn smt(&self) -> Item {
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
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::{Status, check, fixtures::*};
    use crate::host::Host;

    #[test]
    fn siblings_of_housekeeping_cpus_warn_with_whole_cores_as_fix() {
        // Guarding CPU 1 too: it is a housekeeping CPU on this host.
        let report = check(&fixture("intel-2s16c2t"), Some(&set("1-15"))).unwrap();
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
    }

    #[test]
    fn bad_host_scales_frequency_and_shares_its_only_core() {
        let report = check(&fixture("small-2cpu"), Some(&set("1"))).unwrap();
        let freq = report.item("cpufreq").unwrap();
        assert!(freq.message.contains("powersave on 1"), "{}", freq.message);
        assert!(
            freq.fix
                .as_deref()
                .unwrap()
                .contains("cpupower -c 1 frequency-set -g performance")
        );

        let smt = report.item("smt").unwrap();
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
}
