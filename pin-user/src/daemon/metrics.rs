//! The metrics the daemon owns (placement, enforcement, discovery, its own
//! health), in one Prometheus registry. What the kernel aggregates (time per
//! class, IRQs, waits, program cost) is read from the maps at scrape time by
//! [`crate::daemon::collector`], registered in the same registry.
//!
//! Names and labels are a contract with dashboards/ and users. Label sets are
//! bounded by CPUs, VMs and fixed enums: no thread ids or command names.
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{config::Mode, daemon::violation::ViolationKind, host::cpulist::CpuSet};

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
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The registry's text exposition, kernel series included (the
    /// collector reads the maps now).
    pub fn render(&self) -> String {
        self.scrapes.inc();
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding error: {e}\n"))
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
}
