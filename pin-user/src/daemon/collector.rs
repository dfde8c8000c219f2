//! The kernel's aggregates as Prometheus series, read from the probe's maps
//! at scrape time (as ebpf_exporter does): per-class time on each guarded
//! CPU, IRQs, softirqs, NMIs, vCPU wait histograms, lost events and the cost
//! of pinguard's own programs.
//!
//! The kernel keeps totals, so the series are the totals: no state between
//! scrapes, nothing that grows with threads or guests ever seen. A map entry
//! that goes (a vCPU that exited) takes its series with it; Prometheus reads
//! the next, smaller total of a series as a counter reset.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use pin_common::{CpuStats, IrqKey, NoiseStat, SoftirqStats, WaitHist};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

use crate::{
    bpf::{
        class::ThreadClass,
        probe::{Counters, Probe, ProbeError, ProgramStats},
    },
    daemon::effects::SharedProbe,
};

/// Labels of one vCPU thread's series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VcpuLabel {
    pub vm: String,
    pub vcpu: u32,
}

/// vCPU tid -> labels, written by the daemon on every re-plan, read at scrape.
#[derive(Debug, Clone, Default)]
pub struct VcpuTable(Arc<RwLock<BTreeMap<u32, VcpuLabel>>>);

impl VcpuTable {
    pub fn replace(&self, table: BTreeMap<u32, VcpuLabel>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = table;
    }

    pub fn snapshot(&self) -> BTreeMap<u32, VcpuLabel> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Everything one scrape reads from the maps.
#[derive(Debug, Default)]
pub struct Readings {
    pub cpus: BTreeMap<u32, CpuStats>,
    pub irqs: BTreeMap<IrqKey, NoiseStat>,
    pub softirqs: BTreeMap<u32, SoftirqStats>,
    /// CPU -> NMI count.
    pub nmis: BTreeMap<u32, u64>,
    pub counters: Counters,
    pub programs: Vec<ProgramStats>,
    pub waits: BTreeMap<u32, WaitHist>,
}

impl Readings {
    fn read(probe: &Probe) -> Result<Self, ProbeError> {
        Ok(Self {
            cpus: probe.cpu_stats()?,
            irqs: probe.irq_stats()?,
            softirqs: probe.softirq_stats()?,
            nmis: probe
                .nmi_stats()?
                .into_iter()
                .map(|(cpu, (n, _))| (cpu, n))
                .collect(),
            counters: probe.counters()?,
            programs: probe.program_stats(),
            waits: probe.wait_hists()?,
        })
    }
}

/// Classes of time on a guarded CPU as exported (`class` label): both kinds
/// of intruder are one class here, told apart by `pinguard_intruder_*`.
const CLASSES: [(&str, &[ThreadClass]); 5] = [
    ("vcpu", &[ThreadClass::Vcpu]),
    ("kernel", &[ThreadClass::Kernel]),
    ("allowed", &[ThreadClass::Allowed]),
    (
        "intruder",
        &[ThreadClass::IntruderUser, ThreadClass::IntruderKthread],
    ),
    ("idle", &[ThreadClass::Idle]),
];

const SOURCES: [(&str, ThreadClass); 2] = [
    ("user", ThreadClass::IntruderUser),
    ("kthread", ThreadClass::IntruderKthread),
];

/// Bucket `i` of the kernel's wait histogram holds waits in [2^i, 2^(i+1))
/// ns; buckets below 1 µs are folded into the first exported bound.
const FIRST_WAIT_BUCKET: usize = 9;

/// Names, help and labels of the kernel-side families (one place, so `desc`
/// and `collect` cannot disagree).
const FAMILIES: &[(&str, &str, &[&str])] = &[
    (
        "pinguard_cpu_run_seconds_total",
        "Time on each guarded CPU by class: vcpu (its owner), kernel (per-CPU kernel threads), allowed (allowlisted), intruder, idle",
        &["cpu", "class"],
    ),
    (
        "pinguard_intruder_run_seconds_total",
        "Time intruders ran on a guarded CPU, by source (user threads or unbound kernel threads)",
        &["cpu", "source"],
    ),
    (
        "pinguard_intrusions_total",
        "Run slices of intruders on a guarded CPU",
        &["cpu", "source"],
    ),
    (
        "pinguard_irq_seconds_total",
        "Time in hardware IRQ handlers on guarded CPUs (only IRQs seen there)",
        &["cpu", "irq", "name"],
    ),
    (
        "pinguard_irqs_total",
        "Hardware IRQs handled on guarded CPUs",
        &["cpu", "irq", "name"],
    ),
    (
        "pinguard_softirq_seconds_total",
        "Time in softirqs on guarded CPUs, by vector",
        &["cpu", "vector"],
    ),
    (
        "pinguard_softirqs_total",
        "Softirqs run on guarded CPUs, by vector",
        &["cpu", "vector"],
    ),
    ("pinguard_nmis_total", "NMIs on guarded CPUs", &["cpu"]),
    (
        "pinguard_events_lost_total",
        "Events lost: the kernel could not deliver them (ring buffer full) or userspace could not decode them",
        &[],
    ),
    (
        "pinguard_thread_map_full_total",
        "Intruder slices not tracked per thread because the map was full (still counted per CPU)",
        &[],
    ),
    (
        "pinguard_bpf_program_run_seconds_total",
        "CPU time spent in pinguard's eBPF programs (kernel bpf_stats)",
        &["program"],
    ),
    (
        "pinguard_bpf_program_runs_total",
        "Runs of pinguard's eBPF programs (kernel bpf_stats)",
        &["program"],
    ),
    (
        "pinguard_vcpu_wait_seconds_total",
        "Time vCPU threads were runnable but not running (host-side CPU ready / steal)",
        &["vm", "vcpu"],
    ),
    (
        "pinguard_vcpu_wait_seconds",
        "How long vCPU threads waited from wake-up (or preemption) to running",
        &["vm", "vcpu"],
    ),
];

/// Reads the probe's maps on every scrape.
pub struct KernelCollector {
    probe: SharedProbe,
    vcpus: VcpuTable,
    /// Events userspace read but could not decode (added to `events_lost`).
    undecodable: Arc<AtomicU64>,
    /// IRQ number -> its actions' names, kept for the IRQs in the map only.
    irq_names: Mutex<HashMap<u32, String>>,
    descs: Vec<Desc>,
}

impl KernelCollector {
    pub fn new(probe: SharedProbe, vcpus: VcpuTable, undecodable: Arc<AtomicU64>) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, labels)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
                .expect("metric descriptions are valid")
            })
            .collect();
        Self {
            probe,
            vcpus,
            undecodable,
            irq_names: Mutex::new(HashMap::new()),
            descs,
        }
    }

    fn irq_names(&self, irqs: &BTreeMap<IrqKey, NoiseStat>) -> HashMap<u32, String> {
        let mut names = self.irq_names.lock().unwrap_or_else(|e| e.into_inner());
        names.retain(|irq, _| irqs.keys().any(|k| k.irq == *irq));
        for k in irqs.keys() {
            names
                .entry(k.irq)
                .or_insert_with(|| crate::host::irq::irq_name(k.irq));
        }
        names.clone()
    }
}

impl Collector for KernelCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let readings = match Readings::read(&self.probe.lock()) {
            Ok(r) => r,
            Err(e) => {
                // The scrape still serves the daemon's own series; /healthz says why.
                log::warn!("reading the eBPF maps: {e}");
                return Vec::new();
            }
        };
        let names = self.irq_names(&readings.irqs);
        families(
            &readings,
            &self.vcpus.snapshot(),
            &names,
            self.undecodable.load(Ordering::Relaxed),
        )
    }
}

/// One family, its series built by `fill`.
struct Family {
    mf: MetricFamily,
    labels: &'static [&'static str],
}

impl Family {
    fn new(name: &str, kind: MetricType) -> Self {
        let (name, help, labels) = FAMILIES
            .iter()
            .find(|(n, _, _)| *n == name)
            .expect("every family is described");
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Self { mf, labels }
    }

    fn metric(&self, values: &[&str]) -> proto::Metric {
        let mut pairs: Vec<proto::LabelPair> = self
            .labels
            .iter()
            .zip(values)
            .map(|(n, v)| {
                let mut p = proto::LabelPair::default();
                p.set_name(n.to_string());
                p.set_value(v.to_string());
                p
            })
            .collect();
        pairs.sort_by(|a, b| a.name().cmp(b.name()));
        let mut m = proto::Metric::default();
        m.set_label(pairs);
        m
    }

    fn counter(&mut self, values: &[&str], v: f64) {
        let mut c = proto::Counter::default();
        c.set_value(v);
        let mut m = self.metric(values);
        m.set_counter(c);
        self.mf.mut_metric().push(m);
    }

    fn histogram(&mut self, values: &[&str], h: &WaitHist) {
        let mut buckets = Vec::new();
        let mut cumulative = 0u64;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            if (FIRST_WAIT_BUCKET..pin_common::WAIT_BUCKETS - 1).contains(&i) {
                let mut b = proto::Bucket::default();
                b.set_upper_bound((1u64 << (i + 1)) as f64 / 1e9);
                b.set_cumulative_count(cumulative);
                buckets.push(b);
            }
        }
        let mut p = proto::Histogram::default();
        p.set_bucket(buckets);
        p.set_sample_count(h.count);
        p.set_sample_sum(h.total_ns as f64 / 1e9);
        let mut m = self.metric(values);
        m.set_histogram(p);
        self.mf.mut_metric().push(m);
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The families of one scrape's readings (pure, for tests).
pub fn families(
    r: &Readings,
    vcpus: &BTreeMap<u32, VcpuLabel>,
    irq_names: &HashMap<u32, String>,
    undecodable: u64,
) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, HISTOGRAM};
    let mut run = Family::new("pinguard_cpu_run_seconds_total", COUNTER);
    let mut intr = Family::new("pinguard_intruder_run_seconds_total", COUNTER);
    let mut slices = Family::new("pinguard_intrusions_total", COUNTER);
    for (cpu, s) in &r.cpus {
        let cpu = cpu.to_string();
        for (label, classes) in CLASSES {
            let ns = classes.iter().map(|c| s.run_ns[c.index()]).sum();
            run.counter(&[&cpu, label], secs(ns));
        }
        for (source, c) in SOURCES {
            intr.counter(&[&cpu, source], secs(s.run_ns[c.index()]));
            slices.counter(&[&cpu, source], s.slices[c.index()] as f64);
        }
    }
    let mut irq_s = Family::new("pinguard_irq_seconds_total", COUNTER);
    let mut irqs = Family::new("pinguard_irqs_total", COUNTER);
    for (k, stat) in &r.irqs {
        let (cpu, irq) = (k.cpu.to_string(), k.irq.to_string());
        let name = irq_names.get(&k.irq).map_or("", String::as_str);
        irq_s.counter(&[&cpu, &irq, name], secs(stat.ns));
        irqs.counter(&[&cpu, &irq, name], stat.count as f64);
    }
    let mut sirq_s = Family::new("pinguard_softirq_seconds_total", COUNTER);
    let mut sirqs = Family::new("pinguard_softirqs_total", COUNTER);
    for (cpu, s) in &r.softirqs {
        let cpu = cpu.to_string();
        for (stat, vector) in s.vec.iter().zip(pin_common::SOFTIRQ_NAMES) {
            sirq_s.counter(&[&cpu, vector], secs(stat.ns));
            sirqs.counter(&[&cpu, vector], stat.count as f64);
        }
    }
    let mut nmis = Family::new("pinguard_nmis_total", COUNTER);
    for (cpu, n) in &r.nmis {
        nmis.counter(&[&cpu.to_string()], *n as f64);
    }
    let mut lost = Family::new("pinguard_events_lost_total", COUNTER);
    lost.counter(&[], (r.counters.events_lost + undecodable) as f64);
    let mut full = Family::new("pinguard_thread_map_full_total", COUNTER);
    full.counter(&[], r.counters.thread_map_full as f64);
    let mut bpf_s = Family::new("pinguard_bpf_program_run_seconds_total", COUNTER);
    let mut bpf_n = Family::new("pinguard_bpf_program_runs_total", COUNTER);
    for p in &r.programs {
        bpf_s.counter(&[p.name], p.run_time.as_secs_f64());
        bpf_n.counter(&[p.name], p.run_count as f64);
    }
    // Per (vm, vcpu): two threads can carry one label set for a moment (a
    // guest restarted under its name), and a series must appear once. Every
    // known vCPU has one, at 0 until it first waits on its CPU (a guest
    // started paused, a vCPU that only runs elsewhere): dashboards show 0,
    // not "No data".
    let mut waits: BTreeMap<&VcpuLabel, WaitHist> = BTreeMap::new();
    for (tid, label) in vcpus {
        let sum = waits.entry(label).or_default();
        if let Some(h) = r.waits.get(tid) {
            for (a, b) in sum.buckets.iter_mut().zip(h.buckets) {
                *a += b;
            }
            sum.count += h.count;
            sum.total_ns += h.total_ns;
        }
    }
    let mut wait_total = Family::new("pinguard_vcpu_wait_seconds_total", COUNTER);
    let mut wait_hist = Family::new("pinguard_vcpu_wait_seconds", HISTOGRAM);
    for (label, h) in &waits {
        let vcpu = label.vcpu.to_string();
        wait_total.counter(&[&label.vm, &vcpu], secs(h.total_ns));
        wait_hist.histogram(&[&label.vm, &vcpu], h);
    }
    [
        run, intr, slices, irq_s, irqs, sirq_s, sirqs, nmis, lost, full, bpf_s, bpf_n, wait_total,
        wait_hist,
    ]
    .into_iter()
    .map(|f| f.mf)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::TextEncoder;

    fn text(r: &Readings, vcpus: &BTreeMap<u32, VcpuLabel>) -> String {
        let mut fams = families(r, vcpus, &HashMap::from([(24, "virtio0".into())]), 3);
        fams.retain(|f| !f.get_metric().is_empty());
        TextEncoder::new().encode_to_string(&fams).unwrap()
    }

    #[test]
    fn every_described_family_is_collected_once() {
        let fams = families(&Readings::default(), &BTreeMap::new(), &HashMap::new(), 0);
        let names: Vec<&str> = fams.iter().map(|f| f.name()).collect();
        let described: Vec<&str> = FAMILIES.iter().map(|f| f.0).collect();
        assert_eq!(names.len(), described.len());
        for n in described {
            assert!(names.contains(&n), "{n} is described but not collected");
        }
    }

    #[test]
    fn totals_are_exported_as_they_are_in_the_kernel() {
        let mut s = CpuStats::default();
        s.run_ns[ThreadClass::Vcpu.index()] = 1_500_000_000;
        s.run_ns[ThreadClass::IntruderUser.index()] = 200_000_000;
        s.run_ns[ThreadClass::IntruderKthread.index()] = 100_000_000;
        s.slices[ThreadClass::IntruderUser.index()] = 4;
        let mut r = Readings::default();
        r.cpus.insert(1, s);
        r.irqs.insert(
            IrqKey { cpu: 1, irq: 24 },
            NoiseStat {
                count: 7,
                ns: 7000,
                max_ns: 2000,
            },
        );
        r.counters.events_lost = 2;
        let t = text(&r, &BTreeMap::new());
        for line in [
            "pinguard_cpu_run_seconds_total{class=\"vcpu\",cpu=\"1\"} 1.5",
            "pinguard_cpu_run_seconds_total{class=\"intruder\",cpu=\"1\"} 0.3",
            "pinguard_cpu_run_seconds_total{class=\"idle\",cpu=\"1\"} 0",
            "pinguard_intruder_run_seconds_total{cpu=\"1\",source=\"kthread\"} 0.1",
            "pinguard_intrusions_total{cpu=\"1\",source=\"user\"} 4",
            "pinguard_irqs_total{cpu=\"1\",irq=\"24\",name=\"virtio0\"} 7",
            // kernel-lost plus undecodable
            "pinguard_events_lost_total 5",
        ] {
            assert!(t.contains(line), "{line} missing from:\n{t}");
        }
    }

    #[test]
    fn wait_histogram_is_cumulative_and_labelled_by_vcpu() {
        let mut h = WaitHist::default();
        h.buckets[3] = 2; // < 1 µs: folded into the first bound
        h.buckets[12] = 5; // [4.096 µs, 8.192 µs)
        h.buckets[20] = 1;
        h.count = 8;
        h.total_ns = 2_000_000;
        let mut r = Readings::default();
        r.waits.insert(42, h);
        r.waits.insert(43, h); // not a vCPU any more: no series
        let vcpus = BTreeMap::from([(
            42,
            VcpuLabel {
                vm: "we\"b".into(),
                vcpu: 0,
            },
        )]);
        let t = text(&r, &vcpus);
        assert!(
            t.contains("# TYPE pinguard_vcpu_wait_seconds histogram"),
            "{t}"
        );
        assert!(
            t.contains(
                "pinguard_vcpu_wait_seconds_bucket{vcpu=\"0\",vm=\"we\\\"b\",le=\"0.000001024\"} 2"
            ),
            "{t}"
        );
        assert!(t.contains("le=\"0.000008192\"} 7"), "{t}");
        assert!(t.contains("le=\"+Inf\"} 8"), "{t}");
        assert!(
            t.contains("pinguard_vcpu_wait_seconds_count{vcpu=\"0\",vm=\"we\\\"b\"} 8"),
            "{t}"
        );
        assert!(
            t.contains("pinguard_vcpu_wait_seconds_total{vcpu=\"0\",vm=\"we\\\"b\"} 0.002"),
            "{t}"
        );
        assert_eq!(t.matches("pinguard_vcpu_wait_seconds_count").count(), 1);
    }

    /// A vCPU that never waited on its CPU (a guest started paused) has its
    /// wait series at 0 from the start, every bucket included.
    #[test]
    fn a_known_vcpu_without_waits_has_zero_wait_series() {
        let vcpus = BTreeMap::from([(
            42,
            VcpuLabel {
                vm: "paused".into(),
                vcpu: 3,
            },
        )]);
        let t = text(&Readings::default(), &vcpus);
        let labels = "vcpu=\"3\",vm=\"paused\"";
        for line in [
            format!("pinguard_vcpu_wait_seconds_total{{{labels}}} 0"),
            format!("pinguard_vcpu_wait_seconds_bucket{{{labels},le=\"0.000001024\"}} 0"),
            format!("pinguard_vcpu_wait_seconds_bucket{{{labels},le=\"+Inf\"}} 0"),
            format!("pinguard_vcpu_wait_seconds_sum{{{labels}}} 0"),
            format!("pinguard_vcpu_wait_seconds_count{{{labels}}} 0"),
        ] {
            assert!(t.contains(&line), "{line} missing from:\n{t}");
        }
    }

    /// A VM name is whatever the guest's owner chose: it must not break the
    /// exposition or forge a series.
    #[test]
    fn a_hostile_vm_name_is_escaped_not_injected() {
        let mut r = Readings::default();
        r.waits.insert(42, WaitHist::default());
        let vcpus = BTreeMap::from([(
            42,
            VcpuLabel {
                vm: "evil\nINJECTED_metric 1".into(),
                vcpu: 0,
            },
        )]);
        let t = text(&r, &vcpus);
        assert!(!t.lines().any(|l| l.starts_with("INJECTED")), "{t}");
        assert!(t.contains("vm=\"evil\\nINJECTED_metric 1\""), "{t}");
    }
}
