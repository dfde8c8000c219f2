//! The latency report: one JSON document with stable field names (so runs can
//! be compared later, on another kernel) and its terminal rendering
//! (`compare` lays reports out side by side).
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use pin_common::{
    CpuStats, IrqKey, NoiseStat, SOFTIRQ_NAMES, SoftirqStats, ThreadKey, ThreadStats,
};

use super::{
    CyclictestHistogram, CyclictestJson, LatencyError, SchedPolicy,
    attribution::{Cause, CauseTally, NoiseOverlap, Recorded, Timeline, WorstEpisode},
    guest::GuestRun,
    host::{HostFacts, Preemption},
    mode, percentile,
};
use crate::bpf::{class::ThreadClass, probe::comm_str};

/// Value of the report's `format` field.
pub const FORMAT: &str = "pinguard-latency/1";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub format: String,
    pub host: HostFacts,
    /// Set when cyclictest ran inside a guest (`--vm`): the guest, its
    /// kernel, the clock alignment and the host causes of its worst
    /// wake-ups. Absent: it ran on the host (every report from before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestRun>,
    pub run: RunInfo,
    pub latency: LatencyStats,
    pub histogram: HistogramData,
    pub episodes: EpisodeSummary,
    /// The longest wake-up-to-run waits, longest first.
    pub worst: Vec<WorstEpisode>,
    pub noise: NoiseTotals,
    pub timeline: Timeline,
    pub probe: ProbeHealth,
    /// Things to know when reading the numbers.
    pub notes: Vec<String>,
    /// Files written by --svg/--png.
    pub pictures: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub cpu: u32,
    /// Seconds since the Unix epoch at the start.
    pub started_unix_s: u64,
    pub planned_duration_ns: u64,
    /// From cyclictest's start to its exit.
    pub elapsed_ns: u64,
    pub interval_us: u64,
    /// The measurement thread's policy (reports from before it was recorded:
    /// SCHED_FIFO, the only one pinguard ran).
    #[serde(default)]
    pub policy: SchedPolicy,
    pub priority: u32,
    /// The measurement thread's class and priority as /proc showed them
    /// while it ran ("FF 95", "TS 0"); None when it was never seen.
    #[serde(default)]
    pub thread_sched: Option<String>,
    pub histogram_max_us: u64,
    pub cyclictest: CyclictestInfo,
    /// cyclictest's measurement thread(s) pinguard watched.
    pub measurement_tids: Vec<u32>,
    /// Ended early by SIGINT/SIGTERM.
    pub interrupted: bool,
    /// A `pinguard run` daemon on the host during the run (None: none
    /// answered on its control socket).
    #[serde(default)]
    pub daemon: Option<crate::control::DaemonInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CyclictestInfo {
    pub path: String,
    pub version: Option<String>,
    pub cmdline: String,
}

/// cyclictest's latencies, all in µs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencyStats {
    /// Histogram samples plus overflows.
    pub samples: u64,
    /// cyclictest's own loop count (its JSON file), when it wrote one.
    pub cycles: Option<u64>,
    pub min_us: u64,
    pub avg_us: f64,
    pub max_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p99_9_us: u64,
    /// The most frequent latency and how many samples had it.
    pub mode_us: u64,
    pub mode_count: u64,
    /// Samples above `histogram_max_us`.
    pub overflows: u64,
    pub histogram_max_us: u64,
    /// Percentiles that fell among the overflows: reported as `max_us`, an upper bound.
    pub above_histogram: Vec<String>,
}

impl LatencyStats {
    pub fn new(
        h: &CyclictestHistogram,
        json: Option<&CyclictestJson>,
        histogram_max_us: u64,
    ) -> Self {
        let samples = h.buckets.iter().sum::<u64>() + h.overflows;
        let first = h.buckets.iter().position(|c| *c > 0).map(|u| u as u64);
        let last = h.buckets.iter().rposition(|c| *c > 0).map(|u| u as u64);
        let max_us = h
            .max_us
            .or(json.map(|j| j.max_us))
            .or(last)
            .unwrap_or_default();
        let computed_avg = {
            let in_buckets: u64 = h
                .buckets
                .iter()
                .enumerate()
                .map(|(u, c)| u as u64 * c)
                .sum();
            let n: u64 = h.buckets.iter().sum();
            if n > 0 {
                in_buckets as f64 / n as f64
            } else {
                0.0
            }
        };
        let mut above = Vec::new();
        let mut pct = |name: &str, p: f64| {
            percentile(&h.buckets, h.overflows, p).unwrap_or_else(|| {
                above.push(name.to_string());
                max_us
            })
        };
        let (p50_us, p90_us, p99_us, p99_9_us) = (
            pct("p50", 50.0),
            pct("p90", 90.0),
            pct("p99", 99.0),
            pct("p99.9", 99.9),
        );
        let (mode_us, mode_count) = mode(&h.buckets).unwrap_or_default();
        Self {
            samples,
            cycles: json.map(|j| j.cycles),
            min_us: h
                .min_us
                .or(json.map(|j| j.min_us))
                .or(first)
                .unwrap_or_default(),
            avg_us: json.map(|j| j.avg_us).or(h.avg_us).unwrap_or(computed_avg),
            max_us,
            p50_us,
            p90_us,
            p99_us,
            p99_9_us,
            mode_us,
            mode_count,
            overflows: h.overflows,
            histogram_max_us,
            above_histogram: above,
        }
    }
}

/// The histogram: non-empty 1-µs buckets as `[µs, count]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistogramData {
    pub bucket_us: u64,
    pub max_us: u64,
    pub buckets: Vec<(u64, u64)>,
    pub overflows: u64,
}

impl HistogramData {
    pub fn new(h: &CyclictestHistogram, max_us: u64) -> Self {
        Self {
            bucket_us: 1,
            max_us,
            buckets: h
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(u, c)| (u as u64, *c))
                .collect(),
            overflows: h.overflows,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EpisodeSummary {
    /// Waits of the measurement thread seen by the probe (wake-ups and preemptions).
    pub count: u64,
    pub max_wait_ns: u64,
    pub by_cause: Vec<CauseTally>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IrqTotal {
    pub irq: u32,
    pub name: String,
    pub count: u64,
    pub ns: u64,
    pub max_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SoftirqTotal {
    pub vector: String,
    pub count: u64,
    pub ns: u64,
    pub max_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NmiTotal {
    pub count: u64,
    pub ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IntruderTotal {
    pub tid: u32,
    pub tgid: u32,
    pub comm: String,
    pub class: ThreadClass,
    pub slices: u64,
    pub run_ns: u64,
    pub max_slice_ns: u64,
}

/// The noise source with the most time on the CPU over the run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    /// irq, softirq, intruder, kernel_threads, nmi.
    pub kind: String,
    pub label: String,
    pub ns: u64,
}

/// Everything that ran on the measured CPU besides cyclictest, over the run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NoiseTotals {
    /// Longest total first.
    pub irqs: Vec<IrqTotal>,
    pub softirqs: Vec<SoftirqTotal>,
    pub nmi: NmiTotal,
    /// Longest total first, at most [`MAX_INTRUDERS`].
    pub intruders: Vec<IntruderTotal>,
    /// Time by pinguard class (idle, kernel, allowed: cyclictest itself, intruder_*).
    pub time_by_class_ns: BTreeMap<ThreadClass, u64>,
    /// Time the hypervisor took this CPU away (/proc/stat steal), when known.
    pub steal_ns: Option<u64>,
    pub top_source: Option<Source>,
}

pub const MAX_INTRUDERS: usize = 50;

/// The probe's maps, as read after the run, for the CPU measured.
pub struct ProbeMaps<'a> {
    pub irqs: &'a BTreeMap<IrqKey, NoiseStat>,
    pub softirqs: &'a BTreeMap<u32, SoftirqStats>,
    pub nmis: &'a BTreeMap<u32, (u64, u64)>,
    pub threads: &'a [(ThreadKey, ThreadStats)],
    pub cpu_stats: &'a BTreeMap<u32, CpuStats>,
}

impl NoiseTotals {
    /// Totals for `cpu`, leaving out cyclictest's own threads (`probe_tgid`).
    pub fn new(
        cpu: u32,
        maps: &ProbeMaps<'_>,
        probe_tgid: u32,
        irq_name: impl Fn(u32) -> String,
        steal_ns: Option<u64>,
    ) -> Self {
        let mut irqs: Vec<IrqTotal> = maps
            .irqs
            .iter()
            .filter(|(k, _)| k.cpu == cpu)
            .map(|(k, s)| IrqTotal {
                irq: k.irq,
                name: irq_name(k.irq),
                count: s.count,
                ns: s.ns,
                max_ns: s.max_ns,
            })
            .collect();
        irqs.sort_by_key(|i| (std::cmp::Reverse(i.ns), i.irq));
        let mut softirqs: Vec<SoftirqTotal> = maps
            .softirqs
            .get(&cpu)
            .map(|s| {
                SOFTIRQ_NAMES
                    .iter()
                    .zip(s.vec.iter())
                    .filter(|(_, v)| v.count > 0)
                    .map(|(name, v)| SoftirqTotal {
                        vector: name.to_string(),
                        count: v.count,
                        ns: v.ns,
                        max_ns: v.max_ns,
                    })
                    .collect()
            })
            .unwrap_or_default();
        softirqs.sort_by_key(|s| std::cmp::Reverse(s.ns));
        let (nmi_count, nmi_ns) = maps.nmis.get(&cpu).copied().unwrap_or_default();
        let mut intruders: Vec<IntruderTotal> = maps
            .threads
            .iter()
            .filter(|(k, t)| k.cpu == cpu && t.tgid != probe_tgid)
            .filter_map(|(k, t)| {
                Some(IntruderTotal {
                    tid: k.tid,
                    tgid: t.tgid,
                    comm: comm_str(&t.comm),
                    class: ThreadClass::from_raw(t.class)?,
                    slices: t.slices,
                    run_ns: t.run_ns,
                    max_slice_ns: t.max_slice_ns,
                })
            })
            .collect();
        intruders.sort_by_key(|i| (std::cmp::Reverse(i.run_ns), i.tid));
        intruders.truncate(MAX_INTRUDERS);
        let time_by_class_ns: BTreeMap<ThreadClass, u64> = maps
            .cpu_stats
            .get(&cpu)
            .map(|s| {
                ThreadClass::ALL
                    .iter()
                    .map(|c| (*c, s.run_ns[c.index()]))
                    .collect()
            })
            .unwrap_or_default();

        let mut candidates: Vec<Source> = Vec::new();
        candidates.extend(irqs.iter().map(|i| Source {
            kind: "irq".into(),
            label: irq_label(i.irq, &i.name),
            ns: i.ns,
        }));
        candidates.extend(softirqs.iter().map(|s| Source {
            kind: "softirq".into(),
            label: format!("softirq {}", s.vector),
            ns: s.ns,
        }));
        candidates.extend(intruders.iter().map(|i| Source {
            kind: "intruder".into(),
            label: format!("intruder {} (tid {})", i.comm, i.tid),
            ns: i.run_ns,
        }));
        if let Some(k) = time_by_class_ns.get(&ThreadClass::Kernel) {
            candidates.push(Source {
                kind: "kernel_threads".into(),
                label: "per-CPU kernel threads".into(),
                ns: *k,
            });
        }
        candidates.push(Source {
            kind: "nmi".into(),
            label: "NMIs".into(),
            ns: nmi_ns,
        });
        let top_source = candidates
            .into_iter()
            .filter(|s| s.ns > 0)
            .reduce(|a, b| if b.ns > a.ns { b } else { a });
        Self {
            irqs,
            softirqs,
            nmi: NmiTotal {
                count: nmi_count,
                ns: nmi_ns,
            },
            intruders,
            time_by_class_ns,
            steal_ns,
            top_source,
        }
    }
}

fn irq_label(irq: u32, name: &str) -> String {
    if name.is_empty() {
        format!("IRQ {irq}")
    } else {
        format!("IRQ {irq} {name}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ProbeHealth {
    pub events_lost: u64,
    pub thread_map_full: u64,
    pub decode_errors: u64,
}

/// Everything a report is built from.
pub struct Inputs {
    pub host: HostFacts,
    pub run: RunInfo,
    pub histogram: CyclictestHistogram,
    pub json: Option<CyclictestJson>,
    pub recorded: Recorded,
    pub noise: NoiseTotals,
    pub probe: ProbeHealth,
}

impl Report {
    pub fn build(i: Inputs) -> Self {
        let latency = LatencyStats::new(&i.histogram, i.json.as_ref(), i.run.histogram_max_us);
        let histogram = HistogramData::new(&i.histogram, i.run.histogram_max_us);
        let mut worst = i.recorded.worst;
        for w in &mut worst {
            w.explanation = explain(w, &i.noise);
        }
        let mut r = Self {
            format: FORMAT.into(),
            host: i.host,
            guest: None,
            run: i.run,
            latency,
            histogram,
            episodes: EpisodeSummary {
                count: i.recorded.episodes,
                max_wait_ns: i.recorded.max_wait_ns,
                by_cause: i.recorded.by_cause,
            },
            worst,
            noise: i.noise,
            timeline: i.recorded.timeline,
            probe: i.probe,
            notes: Vec::new(),
            pictures: Vec::new(),
        };
        r.notes = notes(&r);
        r
    }

    /// The report of a run inside a guest: `run`, `worst`, `noise` and the
    /// timeline are the host's view of the vCPU thread's CPU.
    // `latency --vm` (being written) is its first caller outside the tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn with_guest(mut self, guest: GuestRun) -> Self {
        self.guest = Some(guest);
        self.notes = notes(&self);
        self
    }

    /// Where the samples were taken: `host`, or `guest NAME (kvm|tcg)`.
    pub fn measured_where(&self) -> String {
        match &self.guest {
            Some(g) => format!("guest {} ({})", g.vm, g.accelerator),
            None => "host".into(),
        }
    }

    /// The kernel the samples were taken on: the guest's inside a guest.
    pub fn measured_kernel(&self) -> (&str, &Preemption) {
        match &self.guest {
            Some(g) => (&g.kernel_release, &g.preemption),
            None => (&self.host.kernel_release, &self.host.preemption),
        }
    }

    /// Reads a report written by `pinguard latency --json`.
    pub fn load(path: &Path) -> Result<Self, LatencyError> {
        let text = std::fs::read_to_string(path).map_err(|source| LatencyError::Io {
            path: path.to_owned(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| LatencyError::NotAReport {
                path: path.to_owned(),
                source,
            })?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(found) => {
                return Err(LatencyError::WrongFormat {
                    path: path.to_owned(),
                    found: found.to_string(),
                    expected: FORMAT,
                });
            }
            None => {
                return Err(LatencyError::UnknownRunFile {
                    path: path.to_owned(),
                    found: "a JSON document without a \"format\" field".into(),
                });
            }
        }
        serde_json::from_value(value).map_err(|source| LatencyError::NotAReport {
            path: path.to_owned(),
            source,
        })
    }
}

/// One line on why `w` waited. IRQs and softirq vectors are named from what
/// ran inside the wait; a report made before those were recorded names the
/// run's IRQs and vectors instead.
pub fn explain(w: &WorstEpisode, noise: &NoiseTotals) -> String {
    let irq_name = |irq: u32| {
        noise
            .irqs
            .iter()
            .find(|i| i.irq == irq)
            .map_or_else(|| irq_label(irq, ""), |i| irq_label(irq, &i.name))
    };
    let softirq_name = |v: u32| {
        pin_common::SOFTIRQ_NAMES
            .get(v as usize)
            .map_or_else(|| format!("vector {v}"), |n| format!("softirq {n}"))
    };
    let main = match &w.cause {
        Cause::Thread { ns, .. } => format!("{} ran {} of it", w.cause.who(), fmt_ns(*ns)),
        Cause::Irq { ns } if !w.irqs.is_empty() => {
            format!(
                "hard IRQs took {}: {}",
                fmt_ns(*ns),
                inside(&w.irqs, irq_name)
            )
        }
        Cause::Softirq { ns } if !w.softirqs.is_empty() => format!(
            "softirqs took {}: {}",
            fmt_ns(*ns),
            inside(&w.softirqs, softirq_name)
        ),
        Cause::Irq { ns } => {
            let seen: Vec<String> = noise
                .irqs
                .iter()
                .take(3)
                .map(|i| irq_label(i.irq, &i.name))
                .collect();
            if seen.is_empty() {
                format!("hard IRQs took {}", fmt_ns(*ns))
            } else {
                format!(
                    "hard IRQs took {} (IRQs on this CPU in the run: {})",
                    fmt_ns(*ns),
                    seen.join(", ")
                )
            }
        }
        Cause::Softirq { ns } => {
            let seen: Vec<&str> = noise
                .softirqs
                .iter()
                .take(3)
                .map(|s| s.vector.as_str())
                .collect();
            if seen.is_empty() {
                format!("softirqs took {}", fmt_ns(*ns))
            } else {
                format!(
                    "softirqs took {} (vectors on this CPU in the run: {})",
                    fmt_ns(*ns),
                    seen.join(", ")
                )
            }
        }
        Cause::Nmi { count } => format!("{count} NMI(s) and nothing else measurable"),
        Cause::IdleExit => "the CPU was idle: exit from idle and the wake-up path".into(),
        Cause::WakeupPath => "nothing else measurable ran: the scheduler's wake-up path".into(),
    };
    let before = if w.prev.tid == 0 {
        "idle".to_string()
    } else {
        format!(
            "{} (tid {}) ran {}",
            w.prev.comm,
            w.prev.tid,
            fmt_ns(w.prev.run_ns)
        )
    };
    // Which ones, also where they were not the main cause.
    let names = |runs: &[NoiseOverlap], name: &dyn Fn(u32) -> String| {
        if runs.is_empty() {
            String::new()
        } else {
            let mut n: Vec<String> = runs.iter().take(2).map(|o| name(o.number)).collect();
            if runs.len() > 2 {
                n.push("...".into());
            }
            format!(" ({})", n.join(", "))
        }
    };
    format!(
        "{main}; IRQs {}{}, softirqs {}{}, NMIs {}; right before: {before}",
        fmt_ns(w.irq_ns),
        names(&w.irqs, &irq_name),
        fmt_ns(w.softirq_ns),
        names(&w.softirqs, &softirq_name),
        w.nmis
    )
}

/// "IRQ 24 virtio0 9.0µs (2×), IRQ 26 ttyS0 3.0µs": the three longest.
fn inside(runs: &[NoiseOverlap], name: impl Fn(u32) -> String) -> String {
    let mut parts: Vec<String> = runs
        .iter()
        .take(3)
        .map(|o| {
            let times = if o.count > 1 {
                format!(" ({}×)", o.count)
            } else {
                String::new()
            };
            format!("{} {}{times}", name(o.number), fmt_ns(o.ns))
        })
        .collect();
    if runs.len() > 3 {
        parts.push(format!("and {} more", runs.len() - 3));
    }
    parts.join(", ")
}

fn notes(r: &Report) -> Vec<String> {
    let mut n = Vec::new();
    let l = &r.latency;
    if let Some(c) = l.cycles
        && c != l.samples
    {
        n.push(format!(
            "the histogram holds {} samples but cyclictest counted {c} loops",
            l.samples
        ));
    }
    if let Some(g) = &r.guest {
        if g.accelerator == "tcg" {
            n.push(format!(
                "guest {} runs under TCG (emulation): its latencies include the emulator's, \
                 they are not what KVM would give",
                g.vm
            ));
        }
        if r.episodes.count == 0 {
            n.push(format!(
                "the probe saw no wait of the vCPU thread (tid {}) on CPU {}: the host never \
                 made it wait",
                g.vcpu_tid, r.run.cpu
            ));
        }
        // cyclictest's last few values may not be printed before it exits.
        if g.samples_seen + l.samples / 100 < l.samples {
            n.push(format!(
                "{} of {} samples came with their time (cyclictest -v): the worst of the others \
                 cannot be matched with the host",
                g.samples_seen, l.samples
            ));
        }
    } else if r.episodes.count == 0 {
        n.push(
            "the probe saw no wake-up of cyclictest's measurement thread: no cause can be given"
                .into(),
        );
    } else {
        let max_wait_us = r.episodes.max_wait_ns / 1000;
        if l.max_us >= 100 && l.max_us > 2 * max_wait_us {
            let steal = match r.noise.steal_ns {
                Some(s) if s > 0 => format!("; this CPU lost {} to hypervisor steal", fmt_ns(s)),
                _ => String::new(),
            };
            n.push(format!(
                "cyclictest's max ({} µs) is far above the longest wake-up-to-run wait ({}): that delay came \
                 before the wake-up, i.e. the timer interrupt itself was late (interrupts disabled, SMI, \
                 or a hypervisor not running this CPU{steal})",
                l.max_us,
                fmt_ns(r.episodes.max_wait_ns)
            ));
        }
    }
    if !l.above_histogram.is_empty() {
        n.push(format!(
            "{} above the histogram's {} µs: shown as the max (raise --histogram-max)",
            l.above_histogram.join(", "),
            l.histogram_max_us
        ));
    }
    if r.probe.events_lost > 0 {
        n.push(format!(
            "the kernel dropped {} events (ring buffer full): some waits or intruder slices are missing",
            r.probe.events_lost
        ));
    }
    if let Some(d) = &r.run.daemon {
        n.push(format!(
            "a pinguard daemon (pid {}) ran in {} mode{}",
            d.pid,
            d.mode,
            if d.registered {
                "; cyclictest was registered with it: never evicted, never counted as an intruder"
            } else {
                "; cyclictest was NOT registered with it"
            }
        ));
    }
    if r.run.interrupted {
        n.push("the run was interrupted before its planned end".into());
    }
    n
}

pub use crate::units::fmt_ns;

/// Edges (µs) of the terminal histogram's rows.
const ROW_EDGES: &[u64] = &[
    0, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000, 20_000,
    50_000, 100_000, 1_000_000, 10_000_001,
];

/// Histogram counts grouped into rows `[lo, hi)`, empty rows left out.
pub fn histogram_rows(h: &HistogramData) -> Vec<(u64, u64, u64)> {
    let mut rows: Vec<(u64, u64, u64)> = ROW_EDGES.windows(2).map(|e| (e[0], e[1], 0)).collect();
    for &(us, c) in &h.buckets {
        if let Some(row) = rows.iter_mut().find(|r| us >= r.0 && us < r.1) {
            row.2 += c;
        }
    }
    rows.retain(|r| r.2 > 0);
    rows
}

/// The terminal summary.
pub fn render_text(r: &Report) -> String {
    let mut o = String::new();
    let l = &r.latency;
    let h = &r.host;
    let _ = writeln!(
        o,
        "pinguard latency: CPU {} for {} (interval {} µs, {}) on {} {} ({})",
        r.run.cpu,
        fmt_ns(r.run.elapsed_ns),
        r.run.interval_us,
        super::policy_label(r.run.policy, r.run.priority),
        if h.hostname.is_empty() {
            "host"
        } else {
            &h.hostname
        },
        h.kernel_release,
        h.preemption.summary
    );
    let iso = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(
        o,
        "isolation: isolcpus={} nohz_full={} rcu_nocbs={} irqaffinity={}; guarded {}, housekeeping {}",
        iso(&h.isolation.isolcpus),
        iso(&h.isolation.nohz_full),
        iso(&h.isolation.rcu_nocbs),
        iso(&h.isolation.irqaffinity),
        h.guarded,
        h.housekeeping
    );
    if let Some(g) = &r.guest {
        let _ = writeln!(
            o,
            "inside guest {} ({}): vCPU {} = host thread {} on CPU {}{}; guest kernel {} ({})",
            g.vm,
            g.accelerator,
            g.vcpu,
            g.vcpu_tid,
            r.run.cpu,
            if g.pinned_for_run {
                ", pinned there for the run"
            } else {
                ""
            },
            g.kernel_release,
            g.preemption.summary
        );
        let _ = writeln!(
            o,
            "clock: host = guest {} {} (± {}; {})",
            if g.clock.offset_ns < 0 { "-" } else { "+" },
            fmt_ns(g.clock.offset_ns.unsigned_abs()),
            fmt_ns(g.clock.error_ns),
            g.clock.method
        );
    }
    let _ = writeln!(
        o,
        "cyclictest{}: {}",
        r.run
            .cyclictest
            .version
            .as_deref()
            .map(|v| format!(" {v}"))
            .unwrap_or_default(),
        r.run.cyclictest.cmdline
    );
    let _ = writeln!(
        o,
        "\nlatency (µs): min {}  avg {:.1}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        l.min_us, l.avg_us, l.p50_us, l.p90_us, l.p99_us, l.p99_9_us, l.max_us
    );
    let _ = writeln!(
        o,
        "samples {}{}; most frequent {} µs ({} samples); above {} µs: {}",
        l.samples,
        l.cycles
            .map(|c| format!(" (cyclictest loops: {c})"))
            .unwrap_or_default(),
        l.mode_us,
        l.mode_count,
        l.histogram_max_us,
        l.overflows
    );
    let rows = histogram_rows(&r.histogram);
    let peak = rows
        .iter()
        .map(|r| r.2)
        .chain(std::iter::once(r.histogram.overflows))
        .max()
        .unwrap_or(1)
        .max(1);
    let bar = |c: u64| {
        let w = ((c as f64 + 1.0).ln() / (peak as f64 + 1.0).ln() * 40.0).round() as usize;
        "█".repeat(w.max(1))
    };
    let _ = writeln!(o, "\nhistogram (bar length: log of the count)");
    for (lo, hi, c) in &rows {
        let hi = (hi - 1).min(r.histogram.max_us);
        let _ = writeln!(o, "  {:>15} µs {:<40} {c}", format!("{lo}-{hi}"), bar(*c));
    }
    if r.histogram.overflows > 0 {
        let _ = writeln!(
            o,
            "  {:>15} µs {:<40} {}",
            format!(">{}", r.histogram.max_us),
            bar(r.histogram.overflows),
            r.histogram.overflows
        );
    }

    if let Some(g) = &r.guest {
        let _ = writeln!(
            o,
            "\nworst wake-ups in the guest and what the host did on CPU {} meanwhile:",
            r.run.cpu
        );
        if g.worst.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for (i, w) in g.worst.iter().enumerate() {
            let _ = writeln!(
                o,
                "  {:>2}. at {:>8.3} s  {:>6} µs late  <- {}",
                i + 1,
                w.offset_ns as f64 / 1e9,
                w.latency_us,
                w.cause.who()
            );
            let _ = writeln!(o, "      {}", w.explanation);
        }
    }
    let _ = writeln!(
        o,
        "\n{} on CPU {} (wake-up to running; {} waits seen, longest {}):",
        if r.guest.is_some() {
            "the vCPU thread's longest waits"
        } else {
            "worst wake-ups"
        },
        r.run.cpu,
        r.episodes.count,
        fmt_ns(r.episodes.max_wait_ns)
    );
    if r.worst.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for (i, w) in r.worst.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {:>2}. at {:>8.3} s  waited {:>9}  <- {}",
            i + 1,
            w.offset_ns as f64 / 1e9,
            fmt_ns(w.wait_ns),
            w.cause.who()
        );
        let _ = writeln!(o, "      {}", w.explanation);
    }
    let _ = writeln!(o, "\ncauses of all waits (longest single wait first):");
    for c in r.episodes.by_cause.iter().take(8) {
        let _ = writeln!(
            o,
            "  {:<44} {:>7} waits  longest {:>9}  total {}",
            c.cause,
            c.episodes,
            fmt_ns(c.max_wait_ns),
            fmt_ns(c.total_wait_ns)
        );
    }

    let n = &r.noise;
    let _ = writeln!(o, "\nnoise on CPU {} during the run:", r.run.cpu);
    if n.irqs.is_empty() {
        let _ = writeln!(o, "  IRQs: none");
    }
    for i in n.irqs.iter().take(10) {
        let _ = writeln!(
            o,
            "  {:<30} {:>8} x  total {:>9}  longest {}",
            irq_label(i.irq, &i.name),
            i.count,
            fmt_ns(i.ns),
            fmt_ns(i.max_ns)
        );
    }
    for s in &n.softirqs {
        let _ = writeln!(
            o,
            "  {:<30} {:>8} x  total {:>9}  longest {}",
            format!("softirq {}", s.vector),
            s.count,
            fmt_ns(s.ns),
            fmt_ns(s.max_ns)
        );
    }
    if n.nmi.count > 0 {
        let _ = writeln!(
            o,
            "  {:<30} {:>8} x  total {:>9}",
            "NMIs",
            n.nmi.count,
            fmt_ns(n.nmi.ns)
        );
    }
    for t in n.intruders.iter().take(10) {
        let _ = writeln!(
            o,
            "  {:<30} {:>8} slices  total {:>9}  longest {}  ({})",
            format!("{} (tid {})", t.comm, t.tid),
            t.slices,
            fmt_ns(t.run_ns),
            fmt_ns(t.max_slice_ns),
            t.class
        );
    }
    let class_ns = |c: ThreadClass| n.time_by_class_ns.get(&c).copied().unwrap_or_default();
    let _ = writeln!(
        o,
        "  per-CPU kernel threads {}, idle {}, cyclictest {}{}",
        fmt_ns(class_ns(ThreadClass::Kernel)),
        fmt_ns(class_ns(ThreadClass::Idle)),
        fmt_ns(class_ns(ThreadClass::Allowed)),
        n.steal_ns
            .map(|s| format!(", hypervisor steal {}", fmt_ns(s)))
            .unwrap_or_default()
    );
    if let Some(t) = &n.top_source {
        let _ = writeln!(o, "  top noise source: {} ({})", t.label, fmt_ns(t.ns));
    }
    for note in &r.notes {
        let _ = writeln!(o, "\nnote: {note}");
    }
    for p in &r.pictures {
        let _ = writeln!(o, "picture: {p}");
    }
    o
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::latency::{
        attribution::{Category, Overlap, Point, PrevThread, Span},
        host::{Isolation, Preemption},
    };

    pub(crate) fn sample_report(release: &str, model: &str, max_us: u64) -> Report {
        let mut buckets = vec![0u64; 60];
        buckets[12] = 3;
        buckets[15] = 800;
        buckets[16] = 150;
        buckets[40] = 40;
        buckets[55] = 5;
        let hist = CyclictestHistogram {
            buckets,
            overflows: 2,
            total: Some(998),
            min_us: Some(12),
            avg_us: Some(17.0),
            max_us: Some(max_us),
        };
        let worst = WorstEpisode {
            offset_ns: 1_500_000_000,
            wake_ns: 11_500_000_000,
            wait_ns: 1_980_000,
            irq_ns: 0,
            softirq_ns: 2_000,
            nmis: 0,
            tid: 501,
            prev: PrevThread {
                tid: 4242,
                comm: "pg-spiker".into(),
                class: Some(ThreadClass::IntruderUser),
                run_ns: 2_000_000,
            },
            threads: vec![Overlap {
                tid: 4242,
                comm: "pg-spiker".into(),
                class: Some(ThreadClass::IntruderUser),
                overlap_ns: 1_970_000,
                run_ns: 2_000_000,
            }],
            cause: Cause::Thread {
                tid: 4242,
                comm: "pg-spiker".into(),
                class: Some(ThreadClass::IntruderUser),
                ns: 1_970_000,
            },
            irqs: Vec::new(),
            softirqs: Vec::new(),
            explanation: String::new(),
        };
        let mut irqs = BTreeMap::new();
        irqs.insert(
            IrqKey { cpu: 1, irq: 24 },
            NoiseStat {
                count: 12,
                ns: 40_000,
                max_ns: 9_000,
            },
        );
        irqs.insert(
            IrqKey { cpu: 0, irq: 25 },
            NoiseStat {
                count: 1,
                ns: 1,
                max_ns: 1,
            },
        );
        let mut sirq = SoftirqStats::default();
        sirq.vec[1] = NoiseStat {
            count: 3000,
            ns: 3_000_000,
            max_ns: 5_000,
        };
        let softirqs = BTreeMap::from([(1, sirq)]);
        let nmis = BTreeMap::from([(1, (0, 0))]);
        let mut comm = [0u8; 16];
        comm[..9].copy_from_slice(b"pg-spiker");
        let threads = vec![
            (
                ThreadKey { cpu: 1, tid: 4242 },
                ThreadStats {
                    run_ns: 120_000_000,
                    slices: 60,
                    max_slice_ns: 2_000_000,
                    tgid: 4240,
                    class: ThreadClass::IntruderUser.raw(),
                    comm,
                    ..Default::default()
                },
            ),
            (
                ThreadKey { cpu: 1, tid: 501 },
                ThreadStats {
                    run_ns: 1_000,
                    slices: 1,
                    tgid: 500,
                    class: ThreadClass::IntruderUser.raw(),
                    ..Default::default()
                },
            ),
        ];
        let mut cs = CpuStats::default();
        cs.run_ns[ThreadClass::Kernel.index()] = 500_000;
        cs.run_ns[ThreadClass::Idle.index()] = 2_800_000_000;
        let cpu_stats = BTreeMap::from([(1, cs)]);
        let noise = NoiseTotals::new(
            1,
            &ProbeMaps {
                irqs: &irqs,
                softirqs: &softirqs,
                nmis: &nmis,
                threads: &threads,
                cpu_stats: &cpu_stats,
            },
            500,
            |irq| {
                if irq == 24 {
                    "virtio0".into()
                } else {
                    String::new()
                }
            },
            Some(0),
        );
        Report::build(Inputs {
            host: HostFacts {
                hostname: "lab".into(),
                kernel_release: release.into(),
                kernel_version: format!("#1 SMP {model}"),
                preemption: Preemption {
                    model: model.into(),
                    mode: None,
                    summary: model.into(),
                },
                isolation: Isolation {
                    isolcpus: Some("1".into()),
                    ..Default::default()
                },
                guarded: "1".into(),
                housekeeping: "0".into(),
                sched_rt_runtime_us: Some(950_000),
                cpu_model: None,
            },
            run: RunInfo {
                cpu: 1,
                started_unix_s: 0,
                planned_duration_ns: 3_000_000_000,
                elapsed_ns: 3_010_000_000,
                interval_us: 1000,
                policy: SchedPolicy::Fifo,
                priority: 95,
                thread_sched: Some("FF 95".into()),
                histogram_max_us: 60,
                cyclictest: CyclictestInfo {
                    path: "/usr/bin/cyclictest".into(),
                    version: Some("2.40".into()),
                    cmdline: "cyclictest -m -q".into(),
                },
                measurement_tids: vec![501],
                interrupted: false,
                daemon: None,
            },
            histogram: hist,
            json: Some(CyclictestJson {
                version: Some("2.40".into()),
                cycles: 1000,
                min_us: 12,
                avg_us: 17.31,
                max_us,
            }),
            recorded: Recorded {
                episodes: 1000,
                max_wait_ns: 1_980_000,
                worst: vec![worst],
                by_cause: vec![],
                timeline: Timeline {
                    slot_ns: 1_500_000,
                    points: vec![
                        Point {
                            offset_ns: 1_000_000,
                            wait_ns: 5_000,
                            cause: Category::IdleExit,
                        },
                        Point {
                            offset_ns: 1_500_000_000,
                            wait_ns: 1_980_000,
                            cause: Category::Intruder,
                        },
                    ],
                    spans: vec![Span {
                        offset_ns: 1_498_000_000,
                        run_ns: 2_000_000,
                        tid: 4242,
                        comm: "pg-spiker".into(),
                        class: ThreadClass::IntruderUser,
                    }],
                    spans_dropped: 0,
                },
                probe_tids: vec![501],
            },
            noise,
            probe: ProbeHealth::default(),
        })
    }

    #[test]
    fn stats_from_the_histogram() {
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let l = &r.latency;
        assert_eq!(l.samples, 1000, "998 in buckets + 2 overflows");
        assert_eq!(l.cycles, Some(1000));
        assert_eq!((l.min_us, l.max_us), (12, 2100));
        assert_eq!(
            l.avg_us, 17.31,
            "cyclictest's JSON average wins (2 decimals)"
        );
        assert_eq!((l.p50_us, l.p90_us, l.p99_us), (15, 16, 40));
        // Rank 999 of 1000 is an overflow: reported as the max.
        assert_eq!(l.p99_9_us, 2100);
        assert_eq!(l.above_histogram, vec!["p99.9"]);
        assert_eq!((l.mode_us, l.mode_count), (15, 800));
        assert_eq!(r.histogram.buckets.len(), 5);
        assert!(r.notes.iter().any(|n| n.contains("p99.9")), "{:?}", r.notes);
    }

    #[test]
    fn noise_totals_leave_out_cyclictest_and_other_cpus() {
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let n = &r.noise;
        assert_eq!(n.irqs.len(), 1);
        assert_eq!((n.irqs[0].irq, n.irqs[0].name.as_str()), (24, "virtio0"));
        assert_eq!(n.softirqs.len(), 1);
        assert_eq!(n.softirqs[0].vector, "timer");
        assert_eq!(n.intruders.len(), 1, "cyclictest (tgid 500) is not noise");
        assert_eq!(n.intruders[0].comm, "pg-spiker");
        let top = n.top_source.as_ref().unwrap();
        assert_eq!((top.kind.as_str(), top.ns), ("intruder", 120_000_000));
        assert!(top.label.contains("pg-spiker"));
        assert_eq!(n.time_by_class_ns[&ThreadClass::Kernel], 500_000);
    }

    #[test]
    fn worst_episodes_are_explained() {
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let e = &r.worst[0].explanation;
        assert!(
            e.starts_with("intruder pg-spiker (tid 4242) ran 1.97ms of it"),
            "{e}"
        );
        assert!(
            e.contains("right before: pg-spiker (tid 4242) ran 2.00ms"),
            "{e}"
        );
        let noise = &r.noise;
        let mut w = r.worst[0].clone();
        w.cause = Cause::Irq { ns: 12_000 };
        assert!(
            explain(&w, noise)
                .contains("hard IRQs took 12.0µs (IRQs on this CPU in the run: IRQ 24 virtio0)")
        );
        w.cause = Cause::Softirq { ns: 3_000 };
        assert!(explain(&w, noise).contains("(vectors on this CPU in the run: timer)"));
        // Recorded per wait: named from the wait itself.
        let o = |number, count, ns| NoiseOverlap { number, count, ns };
        w.irqs = vec![o(24, 2, 9_000), o(31, 1, 3_000)];
        w.cause = Cause::Irq { ns: 12_000 };
        let e = explain(&w, noise);
        assert!(
            e.contains("hard IRQs took 12.0µs: IRQ 24 virtio0 9.0µs (2×), IRQ 31 3.0µs;"),
            "{e}"
        );
        // Named after the totals too, whatever the main cause.
        let mut t = w.clone();
        t.cause = r.worst[0].cause.clone();
        let e = explain(&t, noise);
        assert!(e.contains("(IRQ 24 virtio0, IRQ 31), softirqs"), "{e}");
        w.softirqs = vec![o(3, 1, 2_000), o(1, 1, 600), o(9, 1, 300), o(12, 1, 100)];
        w.cause = Cause::Softirq { ns: 3_000 };
        let e = explain(&w, noise);
        assert!(
            e.contains(
                "softirqs took 3.0µs: softirq net_rx 2.0µs, softirq timer 600ns, softirq rcu 300ns, and 1 more;"
            ),
            "{e}"
        );
        w.prev.tid = 0;
        w.cause = Cause::IdleExit;
        assert!(explain(&w, noise).ends_with("right before: idle"));
    }

    #[test]
    fn text_summary_has_everything() {
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let t = render_text(&r);
        for needle in [
            "CPU 1",
            "PREEMPT_DYNAMIC",
            "isolcpus=1 nohz_full=-",
            "cyclictest 2.40: cyclictest -m -q",
            "min 12  avg 17.3  p50 15  p90 16  p99 40  p99.9 2100  max 2100",
            "samples 1000 (cyclictest loops: 1000); most frequent 15 µs (800 samples)",
            "10-19 µs",
            "50-60 µs",
            ">60 µs",
            "<- intruder pg-spiker (tid 4242)",
            "IRQ 24 virtio0",
            "softirq timer",
            "top noise source: intruder pg-spiker (tid 4242)",
        ] {
            assert!(t.contains(needle), "{needle:?} missing from:\n{t}");
        }
    }

    #[test]
    fn report_round_trips_through_json_with_stable_names() {
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let v = serde_json::to_value(&r).unwrap();
        for path in [
            "/format",
            "/host/kernel_release",
            "/host/preemption/model",
            "/host/isolation/nohz_full",
            "/run/cyclictest/cmdline",
            "/latency/samples",
            "/latency/p99_9_us",
            "/latency/mode_us",
            "/histogram/buckets/0/1",
            "/worst/0/cause/kind",
            "/worst/0/threads/0/comm",
            "/noise/irqs/0/name",
            "/noise/top_source/label",
            "/timeline/points/0/cause",
        ] {
            assert!(v.pointer(path).is_some(), "{path} missing");
        }
        assert_eq!(v["worst"][0]["cause"]["kind"], "thread");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, serde_json::to_string_pretty(&r).unwrap()).unwrap();
        assert_eq!(Report::load(&p).unwrap(), r);
        std::fs::write(&p, r#"{"format":"other/9"}"#).unwrap();
        assert!(matches!(
            Report::load(&p),
            Err(LatencyError::WrongFormat { .. })
        ));
        std::fs::write(&p, "not json").unwrap();
        assert!(
            Report::load(&p)
                .unwrap_err()
                .to_string()
                .contains("not a pinguard latency report")
        );
    }

    pub(crate) fn sample_guest() -> GuestRun {
        use crate::latency::guest::{ClockAlignment, GuestWakeup, HostCause};
        GuestRun {
            vm: "lab-rt".into(),
            pid: 4000,
            accelerator: "tcg".into(),
            vcpu: 0,
            vcpu_tid: 4003,
            pinned_for_run: true,
            kernel_release: "6.1.0-28-rt-amd64".into(),
            kernel_version: "#1 SMP PREEMPT_RT Debian 6.1.119-1".into(),
            preemption: Preemption {
                model: "PREEMPT_RT".into(),
                mode: None,
                summary: "PREEMPT_RT".into(),
            },
            agent: "/tmp/qga.sock".into(),
            clock: ClockAlignment {
                offset_ns: -1_234_567,
                error_ns: 40_000,
                exchanges: 8,
                rtt_min_ns: 80_000,
                rtt_max_ns: 300_000,
                method: "guest CLOCK_MONOTONIC bracketed by host reads".into(),
                drift_ns: 0,
            },
            worst: vec![GuestWakeup {
                cycle: 1500,
                latency_us: 2100,
                guest_target_ns: 5_000_000_000,
                host_from_ns: 4_998_725_433,
                host_to_ns: 5_000_905_433,
                offset_ns: 1_500_000_000,
                vcpu_wait_ns: 1_900_000,
                threads: vec![Overlap {
                    tid: 4242,
                    comm: "pg-spiker".into(),
                    class: Some(ThreadClass::IntruderUser),
                    overlap_ns: 1_900_000,
                    run_ns: 2_000_000,
                }],
                irq_ns: 0,
                softirq_ns: 0,
                irqs: vec![],
                softirqs: vec![],
                cause: HostCause::Preempted {
                    tid: 4242,
                    comm: "pg-spiker".into(),
                    class: Some("intruder_user".into()),
                    ns: 1_900_000,
                },
                explanation: "pg-spiker ran 1.90ms of it".into(),
            }],
            samples_seen: 998,
        }
    }

    #[test]
    fn a_guest_run_says_where_it_measured_and_old_reports_still_load() {
        let host = sample_report("6.18.44", "PREEMPT_DYNAMIC", 700);
        assert_eq!(host.measured_where(), "host");
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100).with_guest(sample_guest());
        assert_eq!(r.measured_where(), "guest lab-rt (tcg)");
        assert_eq!(r.measured_kernel().0, "6.1.0-28-rt-amd64");
        assert_eq!(r.measured_kernel().1.model, "PREEMPT_RT");
        assert!(r.notes.iter().any(|n| n.contains("TCG")), "{:?}", r.notes);
        let v = serde_json::to_value(&r).unwrap();
        for path in [
            "/guest/vm",
            "/guest/accelerator",
            "/guest/kernel_release",
            "/guest/preemption/model",
            "/guest/clock/offset_ns",
            "/guest/clock/error_ns",
            "/guest/worst/0/cause/kind",
            "/guest/worst/0/latency_us",
        ] {
            assert!(v.pointer(path).is_some(), "{path} missing");
        }
        assert_eq!(v["guest"]["worst"][0]["cause"]["kind"], "preempted");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.json");
        std::fs::write(&p, serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(Report::load(&p).unwrap(), r);
        // A host report has no "guest" key, and one written before the key
        // existed loads as a host run.
        let old = serde_json::to_value(&host).unwrap();
        assert!(old.get("guest").is_none());
        std::fs::write(&p, old.to_string()).unwrap();
        assert_eq!(Report::load(&p).unwrap().guest, None);

        let t = render_text(&r);
        for needle in [
            "inside guest lab-rt (tcg): vCPU 0 = host thread 4003 on CPU 1, pinned there for the run",
            "guest kernel 6.1.0-28-rt-amd64 (PREEMPT_RT)",
            "clock: host = guest - 1.23ms",
            "2100 µs late  <- host thread pg-spiker (tid 4242, intruder_user)",
            "the vCPU thread's longest waits on CPU 1",
        ] {
            assert!(t.contains(needle), "{needle:?} missing from:\n{t}");
        }
    }
}
