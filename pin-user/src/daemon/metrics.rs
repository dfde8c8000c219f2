//! The metrics the daemon owns (placement, enforcement, discovery, its own
//! health), in one Prometheus registry. What the kernel aggregates (time per
//! class, IRQs, waits, program cost) is read from the maps at scrape time by
//! [`crate::daemon::collector`], registered in the same registry.
//!
//! Names and labels are a contract with dashboards/ and users. Label sets are
//! bounded by CPUs, VMs and fixed enums: no thread ids or command names.
use std::collections::BTreeSet;

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder, core::Collector,
};

use crate::{config::Mode, daemon::violation::ViolationKind, host::cpulist::CpuSet};

/// One counter value a restart carries over (`/run/pinguard/counters.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Carried {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: u64,
}

/// The `action` label of `pinguard_enforcement_errors_total`: what the
/// daemon (`daemon::state`) tried, placing a new guest, re-pinning a drifted
/// vCPU or evicting an intruder.
pub const ENFORCEMENT_ACTIONS: [&str; 3] = ["pin", "repin", "evict"];

/// The `errno` values an enforcement can fail with that are known in
/// advance (`AffinityError::errno_name`): refused for lack of privilege,
/// refused CPUs (offline, outside the cpuset), accepted but read back
/// different, refused by the guest's manager (libvirt). A rarer errno still
/// gets its own series when it happens; ESRCH is a vanished task, not an
/// error (`pinguard_tasks_vanished_total`).
pub const ENFORCEMENT_ERRNOS: [&str; 4] = ["EPERM", "EINVAL", "MISMATCH", "MANAGER"];

/// The `result` label of `pinguard_config_reloads_total`.
pub const RELOAD_RESULTS: [&str; 2] = ["success", "failure"];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub mode: IntGaugeVec,
    pub cpu_guarded: IntGaugeVec,
    pub violations: IntCounterVec,
    pub vms: IntGauge,
    pub vcpu_info: IntGaugeVec,
    pub vcpu_pinned: IntGaugeVec,
    pub repins: IntCounterVec,
    pub evictions: IntCounterVec,
    pub enforcement_errors: IntCounterVec,
    pub tasks_vanished: IntCounter,
    pub discovery_errors: IntCounter,
    pub discovery_scans: IntCounter,
    pub config_reloads: IntCounterVec,
    pub scrapes: IntCounter,
    pub isolation_active: IntGaugeVec,
    pub isolation_repairs: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let m = Self {
            build_info: reg!(IntGaugeVec::new(
                opts("pinguard_build_info", "pinguard version (always 1)"),
                &["version"]
            )),
            mode: reg!(IntGaugeVec::new(
                opts(
                    "pinguard_mode",
                    "Enforcement mode in effect (1 for the active mode)"
                ),
                &["mode"]
            )),
            cpu_guarded: reg!(IntGaugeVec::new(
                opts(
                    "pinguard_cpu_guarded",
                    "1 for each CPU pinguard guards (0 while it is offline)"
                ),
                &["cpu"]
            )),
            violations: reg!(IntCounterVec::new(
                opts(
                    "pinguard_violations_total",
                    "Isolation violations by kind: intruder, migration_in, vcpu_drift, affinity_changed, shared_cpu"
                ),
                &["cpu", "kind"]
            )),
            vms: reg!(IntGauge::with_opts(opts(
                "pinguard_vms",
                "Guests (QEMU/KVM processes) currently known"
            ))),
            vcpu_info: reg!(IntGaugeVec::new(
                opts(
                    "pinguard_vcpu_info",
                    "vCPU placement: the guarded CPU each vCPU is assigned (always 1)"
                ),
                &["vm", "vcpu", "cpu"]
            )),
            vcpu_pinned: reg!(IntGaugeVec::new(
                opts(
                    "pinguard_vcpu_pinned",
                    "1 when the vCPU's affinity equals its assigned CPU, else 0"
                ),
                &["vm", "vcpu"]
            )),
            repins: reg!(IntCounterVec::new(
                opts(
                    "pinguard_repins_total",
                    "vCPU threads pinned back to their CPU"
                ),
                &["vm"]
            )),
            evictions: reg!(IntCounterVec::new(
                opts(
                    "pinguard_evictions_total",
                    "Intruder threads moved off a guarded CPU"
                ),
                &["cpu"]
            )),
            enforcement_errors: reg!(IntCounterVec::new(
                opts(
                    "pinguard_enforcement_errors_total",
                    "Failed enforcement actions (repin, evict, pin) by errno"
                ),
                &["action", "errno"]
            )),
            tasks_vanished: reg!(IntCounter::with_opts(opts(
                "pinguard_tasks_vanished_total",
                "Threads or processes that exited while pinguard was acting on them (ESRCH)"
            ))),
            discovery_scans: reg!(IntCounter::with_opts(opts(
                "pinguard_discovery_scans_total",
                "Full scans of /proc for guests (start-up, reload, periodic, after a QEMU exec)"
            ))),
            discovery_errors: reg!(IntCounter::with_opts(opts(
                "pinguard_discovery_errors_total",
                "Errors while discovering guests (e.g. an unreadable QMP socket)"
            ))),
            config_reloads: reg!(IntCounterVec::new(
                opts(
                    "pinguard_config_reloads_total",
                    "Configuration reloads (SIGHUP) by result"
                ),
                &["result"]
            )),
            scrapes: reg!(IntCounter::with_opts(opts(
                "pinguard_scrapes_total",
                "Requests served on /metrics"
            ))),
            isolation_active: reg!(IntGaugeVec::new(
                opts(
                    "pinguard_isolation_active",
                    "1 for each guarded CPU the runtime isolation (isolation = \"runtime\") keeps, by mechanism: partition, shield, affinity"
                ),
                &["cpu", "mechanism"]
            )),
            isolation_repairs: reg!(IntCounterVec::new(
                opts(
                    "pinguard_isolation_repairs_total",
                    "Runtime isolation settings found changed and put back, by what: sysctl, workqueue, default_irq_affinity, irq, cgroup, task, thread"
                ),
                &["what"]
            )),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Counters of events whose labels are known in advance exist from
        // the start at 0: a dashboard then shows 0 where nothing happened
        // (not "No data"), and rate()/increase() see the first event.
        for action in ENFORCEMENT_ACTIONS {
            for errno in ENFORCEMENT_ERRNOS {
                m.enforcement_errors
                    .with_label_values(&[action, errno])
                    .inc_by(0);
            }
        }
        for result in RELOAD_RESULTS {
            m.config_reloads.with_label_values(&[result]).inc_by(0);
        }
        // Also with `isolation = "off"`: the panel and alert then read 0.
        for what in crate::isolate::What::ALL {
            m.isolation_repairs
                .with_label_values(&[what.label()])
                .inc_by(0);
        }
        m
    }

    /// The daemon's own counters that a restart carries over (with the
    /// kernel side it adopts), as (name, labels, value). Per-VM series are
    /// not among them: they leave with their guest.
    pub fn carried(&self) -> Vec<Carried> {
        let mut out = Vec::new();
        for (name, vec) in self.carried_vecs() {
            for mf in vec.collect() {
                for m in mf.get_metric() {
                    let labels = m
                        .get_label()
                        .iter()
                        .map(|l| (l.name().to_string(), l.value().to_string()))
                        .collect();
                    let value = m.get_counter().get_value() as u64;
                    if value > 0 {
                        out.push(Carried { name: name.into(), labels, value });
                    }
                }
            }
        }
        for (name, c) in self.carried_singles() {
            if c.get() > 0 {
                out.push(Carried { name: name.into(), labels: Default::default(), value: c.get() });
            }
        }
        out
    }

    /// Adds what a previous daemon counted ([`Self::carried`]); entries
    /// this daemon does not carry, or with other labels, are skipped.
    pub fn carry_over(&self, saved: &[Carried]) -> usize {
        let mut n = 0;
        for s in saved {
            let labels: std::collections::HashMap<&str, &str> =
                s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            if let Some((_, vec)) = self.carried_vecs().into_iter().find(|(name, _)| *name == s.name)
                && let Ok(c) = vec.get_metric_with(&labels)
            {
                c.inc_by(s.value);
                n += 1;
            } else if let Some((_, c)) =
                self.carried_singles().into_iter().find(|(name, _)| *name == s.name)
                && labels.is_empty()
            {
                c.inc_by(s.value);
                n += 1;
            }
        }
        n
    }

    fn carried_vecs(&self) -> [(&'static str, &IntCounterVec); 5] {
        [
            ("pinguard_violations_total", &self.violations),
            ("pinguard_evictions_total", &self.evictions),
            ("pinguard_enforcement_errors_total", &self.enforcement_errors),
            ("pinguard_config_reloads_total", &self.config_reloads),
            ("pinguard_isolation_repairs_total", &self.isolation_repairs),
        ]
    }

    fn carried_singles(&self) -> [(&'static str, &IntCounter); 3] {
        [
            ("pinguard_tasks_vanished_total", &self.tasks_vanished),
            ("pinguard_discovery_errors_total", &self.discovery_errors),
            ("pinguard_discovery_scans_total", &self.discovery_scans),
        ]
    }

    /// The registry's text exposition, kernel series included (the
    /// collector reads the maps now).
    pub fn render(&self) -> String {
        self.scrapes.inc();
        self.zero_vm_series();
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding error: {e}\n"))
    }

    /// `pinguard_repins_total` at 0 for every VM with a vCPU in
    /// `pinguard_vcpu_info`, and no zero-valued series for a VM that left.
    ///
    /// Done at scrape time from the placement series (which the daemon
    /// keeps current) rather than where VMs come and go, so the zeros follow
    /// the VMs without a second bookkeeping. The daemon removes a departed
    /// VM's series on its own thread; a scrape racing it can re-create a
    /// zero for it, which the next scrape removes. Non-zero counts are never
    /// removed here: they leave with the VM, as before.
    fn zero_vm_series(&self) {
        let mut vms = BTreeSet::new();
        for family in self.vcpu_info.collect() {
            for metric in family.get_metric() {
                if let Some(vm) = metric.get_label().iter().find(|l| l.name() == "vm") {
                    vms.insert(vm.value().to_string());
                }
            }
        }
        for family in self.repins.collect() {
            for metric in family.get_metric() {
                let vm = metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "vm")
                    .map(|l| l.value());
                if let Some(vm) = vm
                    && !vms.contains(vm)
                    && metric.get_counter().get_value() == 0.0
                {
                    let _ = self.repins.remove_label_values(&[vm]);
                }
            }
        }
        for vm in &vms {
            self.repins.with_label_values(&[vm]).inc_by(0);
        }
    }

    /// `pinguard_cpu_guarded` is 1 for a guarded CPU that is online, 0 while
    /// it is offline (hotplug).
    pub fn publish_online(&self, guarded: &CpuSet, offline: &CpuSet) {
        for cpu in guarded.iter() {
            self.cpu_guarded
                .with_label_values(&[&cpu.to_string()])
                .set(i64::from(!offline.contains(cpu)));
        }
    }

    /// The series fixed by the configuration: the guarded CPUs, the mode.
    pub fn publish_static(&self, guarded: &CpuSet, mode: Mode) {
        self.cpu_guarded.reset();
        for cpu in guarded.iter() {
            let cpu = cpu.to_string();
            self.cpu_guarded.with_label_values(&[&cpu]).set(1);
            // Every kind from the start, so dashboards and rate() see zeros, not gaps.
            for kind in ViolationKind::ALL {
                self.violations
                    .with_label_values(&[&cpu, kind.as_str()])
                    .inc_by(0);
            }
            self.evictions.with_label_values(&[&cpu]).inc_by(0);
        }
        self.mode.reset();
        self.mode.with_label_values(&[mode.as_str()]).set(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_names() {
        let m = Metrics::new();
        m.publish_static(&CpuSet::single(1), Mode::Enforce);
        m.repins.with_label_values(&["web"]).inc();
        let text = m.render();
        for name in [
            "pinguard_build_info",
            "pinguard_cpu_guarded",
            "pinguard_vms",
            "pinguard_scrapes_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains("pinguard_mode{mode=\"enforce\"} 1"), "{text}");
        assert!(
            text.contains("pinguard_repins_total{vm=\"web\"} 1"),
            "{text}"
        );
    }

    /// Samples of `name` in `text`: (label text, value).
    fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, &'a str)> {
        text.lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|rest| rest.strip_prefix('{').map(|r| r.rsplit_once("} ")))
            .flatten()
            .collect()
    }

    /// What dashboards need before anything happened: every counter whose
    /// labels are known in advance, at 0.
    #[test]
    fn counters_with_known_labels_exist_at_zero_from_the_start() {
        let m = Metrics::new();
        m.publish_static(&"1-2".parse().unwrap(), Mode::Observe);
        let text = m.render();

        let errors = samples(&text, "pinguard_enforcement_errors_total");
        assert_eq!(
            errors.len(),
            ENFORCEMENT_ACTIONS.len() * ENFORCEMENT_ERRNOS.len(),
            "{text}"
        );
        for action in ENFORCEMENT_ACTIONS {
            for errno in ENFORCEMENT_ERRNOS {
                let labels = format!("action=\"{action}\",errno=\"{errno}\"");
                assert!(errors.contains(&(labels.as_str(), "0")), "{labels}: {text}");
            }
        }
        let reloads = samples(&text, "pinguard_config_reloads_total");
        assert_eq!(
            reloads,
            [("result=\"failure\"", "0"), ("result=\"success\"", "0")],
            "{text}"
        );
        let evictions = samples(&text, "pinguard_evictions_total");
        assert_eq!(
            evictions,
            [("cpu=\"1\"", "0"), ("cpu=\"2\"", "0")],
            "{text}"
        );
        let violations = samples(&text, "pinguard_violations_total");
        assert_eq!(violations.len(), 2 * ViolationKind::ALL.len(), "{text}");
        assert!(violations.iter().all(|(_, v)| *v == "0"), "{text}");
        // No VM known yet: no per-VM series at all.
        assert!(samples(&text, "pinguard_repins_total").is_empty(), "{text}");
    }

    /// The fixed errno labels are the ones the daemon's errors produce.
    #[test]
    fn fixed_errno_labels_are_what_affinity_errors_are_named() {
        use crate::host::affinity::AffinityError;
        let cpus = CpuSet::single(1);
        let named: Vec<String> = [
            AffinityError::NotPermitted { tid: 7 },
            AffinityError::Invalid {
                tid: 7,
                cpus: cpus.clone(),
            },
            AffinityError::Mismatch {
                tid: 7,
                wanted: cpus.clone(),
                actual: cpus,
            },
            AffinityError::Manager {
                tid: 7,
                detail: "refused".into(),
            },
        ]
        .iter()
        .map(AffinityError::errno_name)
        .collect();
        assert_eq!(named, ENFORCEMENT_ERRNOS);
    }

    /// Per-VM counters follow the VMs placed: 0 while the VM is known,
    /// gone with it; a count is kept until the daemon removes it.
    #[test]
    fn repins_are_zero_for_each_known_vm_and_leave_with_it() {
        let m = Metrics::new();
        m.publish_static(&CpuSet::single(1), Mode::Observe);
        m.vcpu_info.with_label_values(&["web", "0", "1"]).set(1);
        m.vcpu_info.with_label_values(&["web", "1", "1"]).set(1);
        m.vcpu_info.with_label_values(&["db", "0", "1"]).set(1);
        m.repins.with_label_values(&["db"]).inc();
        let text = m.render();
        assert_eq!(
            samples(&text, "pinguard_repins_total"),
            [("vm=\"db\"", "1"), ("vm=\"web\"", "0")],
            "{text}"
        );

        // Both leave; a scrape racing the daemon re-created web's zero.
        for (vm, vcpu) in [("web", "0"), ("web", "1"), ("db", "0")] {
            m.vcpu_info.remove_label_values(&[vm, vcpu, "1"]).unwrap();
        }
        let text = m.render();
        assert_eq!(
            samples(&text, "pinguard_repins_total"),
            [("vm=\"db\"", "1")],
            "a zero for a departed VM is dropped, a count stays for the daemon to remove: {text}"
        );
    }

    #[test]
    fn counters_carry_over_to_the_next_daemon_but_per_vm_series_do_not() {
        let old = Metrics::new();
        old.violations.with_label_values(&["1", "intruder"]).inc_by(7);
        old.evictions.with_label_values(&["1"]).inc_by(3);
        old.discovery_scans.inc_by(5);
        old.repins.with_label_values(&["gone-vm"]).inc();
        let saved = old.carried();
        let json = serde_json::to_string(&saved).unwrap();
        let new = Metrics::new();
        new.violations.with_label_values(&["1", "intruder"]).inc();
        let back: Vec<Carried> = serde_json::from_str(&json).unwrap();
        assert_eq!(new.carry_over(&back), 3);
        assert_eq!(new.violations.with_label_values(&["1", "intruder"]).get(), 8);
        assert_eq!(new.evictions.with_label_values(&["1"]).get(), 3);
        assert_eq!(new.discovery_scans.get(), 5);
        assert!(!new.render().contains("gone-vm"), "a gone guest's series came back");
        // A saved entry this daemon does not know is skipped, not a panic.
        let odd = Carried { name: "pinguard_violations_total".into(), labels: [("x".into(), "y".into())].into(), value: 1 };
        assert_eq!(new.carry_over(&[odd]), 0);
    }

}
