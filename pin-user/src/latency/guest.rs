//! Measuring inside a guest (`pinguard latency --vm NAME`): what the report
//! records about the guest, cyclictest's per-sample output, the alignment of
//! the guest's clock with the host's, and the matching of the guest's worst
//! wake-ups with what ran on the host CPU of its vCPU at the same time.
//!
//! All of it is pure (text and numbers in, records out); the command's edge
//! (`cmd/latency.rs`) talks to the guest agent and the probe.
use super::{
    CyclictestHistogram, LatencyError,
    attribution::{NoiseOverlap, Overlap, WindowView},
    host::Preemption,
    parse_histogram,
};

/// Where a run measured, when it was inside a guest. Reports without it
/// (all those from before guests could be measured) measured the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestRun {
    /// The guest's name (libvirt domain, else QEMU's `-name`).
    pub vm: String,
    /// The QEMU process.
    pub pid: u32,
    /// How the guest's CPUs are run: `kvm`, or `tcg` (emulated: its vCPU
    /// thread is `CPU n/TCG` and latencies include the emulator's).
    pub accelerator: String,
    /// The vCPU (QEMU's cpu-index, the guest's CPU number cyclictest is
    /// pinned to with `-a`) and its host thread.
    pub vcpu: u32,
    pub vcpu_tid: u32,
    /// Whether pinguard pinned the vCPU thread to the measured host CPU for
    /// the run (it was not confined to it) and put its affinity back after.
    pub pinned_for_run: bool,
    /// `uname -r`, `uname -v` and the preemption model inside the guest.
    pub kernel_release: String,
    pub kernel_version: String,
    pub preemption: Preemption,
    /// How the guest agent was reached (a socket path, or libvirt).
    pub agent: String,
    pub clock: ClockAlignment,
    /// The guest's worst wake-ups, worst first, each with what the host did
    /// on the vCPU's CPU at that time.
    pub worst: Vec<GuestWakeup>,
    /// Per-sample values cyclictest printed (`-v`) that pinguard could read;
    /// fewer than the samples when cyclictest's ring of values overflowed.
    pub samples_seen: u64,
}

/// How the guest's CLOCK_MONOTONIC maps onto the host's:
/// `host = guest + offset_ns`, give or take `error_ns`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ClockAlignment {
    pub offset_ns: i64,
    /// Bound on the error of `offset_ns`: half the round trip of the best
    /// exchange (the guest read its clock somewhere inside it).
    pub error_ns: u64,
    /// Exchanges used, and their round trips (shortest, longest).
    pub exchanges: u32,
    pub rtt_min_ns: u64,
    pub rtt_max_ns: u64,
    /// One line on how it was done.
    pub method: String,
    /// How much the offset moved from before the run to after it (the two
    /// clocks' rates differ a little); guest times are mapped by
    /// interpolating between the two.
    #[serde(default)]
    pub drift_ns: i64,
}

/// What the host did around one of the guest's late wake-ups.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostCause {
    /// Another thread ran on the vCPU's CPU while the vCPU wanted it.
    Preempted {
        tid: u32,
        comm: String,
        /// pinguard's class name (`intruder_user`, `kernel`, ...), if known.
        class: Option<String>,
        ns: u64,
    },
    /// Hard IRQ handlers on the host CPU.
    Irq { ns: u64 },
    /// Softirqs on the host CPU.
    Softirq { ns: u64 },
    /// The vCPU thread was runnable but not running this long, with nothing
    /// the probe could name on its CPU ("CPU ready").
    CpuReady { ns: u64 },
    /// The vCPU thread ran (or slept) undisturbed: the delay was made inside
    /// the guest (its kernel, its other tasks, or emulation under TCG).
    InsideGuest,
}

impl HostCause {
    /// One phrase for people.
    pub fn who(&self) -> String {
        match self {
            Self::Preempted {
                tid, comm, class, ..
            } => match class {
                Some(c) => format!("host thread {comm} (tid {tid}, {c})"),
                None => format!("host thread {comm} (tid {tid})"),
            },
            Self::Irq { .. } => "host hard IRQs".into(),
            Self::Softirq { .. } => "host softirqs".into(),
            Self::CpuReady { .. } => "vCPU waiting to run (CPU ready)".into(),
            Self::InsideGuest => "nothing on the host: inside the guest".into(),
        }
    }
}

/// One late wake-up of the guest's cyclictest and its host-side causes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestWakeup {
    /// cyclictest's loop number and latency (µs, as it printed them).
    pub cycle: u64,
    pub latency_us: u64,
    /// The wake-up's target on the guest's CLOCK_MONOTONIC.
    pub guest_target_ns: u64,
    /// The host's CLOCK_MONOTONIC window looked at: the target to the
    /// actual wake-up, widened by the alignment's error on both sides.
    pub host_from_ns: u64,
    pub host_to_ns: u64,
    /// The window's start from the start of the run (host clock).
    pub offset_ns: u64,
    /// The vCPU thread's waits (runnable, not running) inside the window.
    pub vcpu_wait_ns: u64,
    /// Host threads that ran on the CPU inside the window, longest first.
    pub threads: Vec<Overlap>,
    pub irq_ns: u64,
    pub softirq_ns: u64,
    pub irqs: Vec<NoiseOverlap>,
    pub softirqs: Vec<NoiseOverlap>,
    pub cause: HostCause,
    /// One line for people.
    pub explanation: String,
}

/// One sample of cyclictest's `-v` output (`thread:cycle:latency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub cycle: u64,
    pub latency_us: u64,
}

/// Bound on per-sample lines read (a day at 1 kHz is 86 M; the agent's own
/// 16 MiB output cap stops far earlier).
const MAX_SAMPLES: usize = 20_000_000;

/// cyclictest's output with `-v` and `-h`: the per-sample lines
/// (`       0:      12:      17`), then the histogram. Other lines
/// (cyclictest's chatter) are skipped.
pub fn parse_verbose_output(
    text: &str,
) -> Result<(CyclictestHistogram, Vec<Sample>), LatencyError> {
    let mut samples = Vec::new();
    let mut histogram = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            histogram.push_str(t);
            histogram.push('\n');
            continue;
        }
        let parts: Vec<&str> = t.split(':').map(str::trim).collect();
        if let [thread, cycle, value] = parts[..]
            && let (Ok(thread), Ok(cycle), Ok(value)) = (
                thread.parse::<u32>(),
                cycle.parse::<u64>(),
                value.parse::<i64>(),
            )
        {
            if thread == 0 && samples.len() < MAX_SAMPLES {
                samples.push(Sample {
                    cycle,
                    latency_us: value.max(0) as u64,
                });
            }
            continue;
        }
        let mut w = t.split_whitespace();
        if let (Some(a), Some(b), None) = (w.next(), w.next(), w.next())
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
        {
            histogram.push_str(t);
            histogram.push('\n');
        }
    }
    Ok((parse_histogram(&histogram)?, samples))
}

/// From `/proc/timer_list`: the guest's CLOCK_REALTIME minus its
/// CLOCK_MONOTONIC (the `.offset` of clock base 1, CLOCK_REALTIME, of the
/// first CPU: `ktime_get_real() = ktime_get() + offs_real`).
pub fn realtime_offset(timer_list: &str) -> Option<i64> {
    let mut in_realtime = false;
    for line in timer_list.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("clock ") {
            in_realtime = rest.trim_end_matches(':').trim() == "1";
            continue;
        }
        if in_realtime && let Some(v) = t.strip_prefix(".offset:") {
            return v.trim().strip_suffix("nsecs")?.trim().parse().ok();
        }
    }
    None
}

/// One reading of the guest's clock bracketed by two of the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// Host CLOCK_MONOTONIC before the request was sent and after the reply came.
    pub host_before_ns: u64,
    pub host_after_ns: u64,
    /// The guest's CLOCK_MONOTONIC, read somewhere in between.
    pub guest_ns: u64,
}

/// The offset from the reading with the shortest round trip: the guest
/// read its clock inside [before, after], so `host = guest + offset` with
/// `offset` the midpoint's and an error of at most half the round trip
/// (plus `resolution_ns`, the guest reading's own granularity).
pub fn estimate(readings: &[ClockReading], resolution_ns: u64) -> Option<(i64, u64)> {
    let best = readings
        .iter()
        .filter(|r| r.host_after_ns >= r.host_before_ns)
        .min_by_key(|r| r.host_after_ns - r.host_before_ns)?;
    let rtt = best.host_after_ns - best.host_before_ns;
    let mid = best.host_before_ns + rtt / 2;
    Some((
        mid as i64 - best.guest_ns as i64,
        rtt.div_ceil(2) + resolution_ns,
    ))
}

/// The guest-to-host clock map of one run: estimated before and after it,
/// interpolated in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockMap {
    pub guest_start_ns: u64,
    pub guest_end_ns: u64,
    pub offset_start_ns: i64,
    pub offset_end_ns: i64,
    pub error_ns: u64,
}

impl ClockMap {
    pub fn to_host(self, guest_ns: u64) -> u64 {
        let span = self.guest_end_ns.saturating_sub(self.guest_start_ns);
        let offset = if span == 0 {
            self.offset_start_ns
        } else {
            let at = guest_ns.clamp(self.guest_start_ns, self.guest_end_ns) - self.guest_start_ns;
            let d = self.offset_end_ns as i128 - self.offset_start_ns as i128;
            (self.offset_start_ns as i128 + d * at as i128 / span as i128)
                .clamp(i64::MIN as i128, i64::MAX as i128) as i64
        };
        (guest_ns as i64).saturating_add(offset).max(0) as u64
    }
}

/// Where `--secaligned` puts the first wake-up's base: the next full second
/// of the guest's CLOCK_MONOTONIC after the measurement thread read it,
/// two seconds on when less than 0.1 s was left (cyclictest's rule).
/// `thread_start_ns`: when the thread started (its /proc stat starttime).
pub fn secaligned_base(thread_start_ns: u64) -> u64 {
    let s = thread_start_ns / 1_000_000_000;
    let frac = thread_start_ns % 1_000_000_000;
    (if frac > 900_000_000 { s + 2 } else { s + 1 }).saturating_mul(1_000_000_000)
}

/// Each sample's wake-up target on the guest's clock, as cyclictest sets
/// them: `base + interval` first, then one interval on, and further on past
/// a wake-up that was later than the next target (it never sleeps to a
/// target already past). Missing cycles (values cyclictest's ring lost)
/// are assumed one interval each. The samples are what the guest printed:
/// any numbers, so the arithmetic saturates and the catch-up is one division,
/// not a loop as long as the latency a guest claims.
pub fn wake_targets(base_ns: u64, interval_ns: u64, samples: &[Sample]) -> Vec<u64> {
    let interval_ns = interval_ns.max(1);
    let mut out = Vec::with_capacity(samples.len());
    let mut next = base_ns.saturating_add(interval_ns);
    let mut expected_cycle = 0u64;
    for s in samples {
        if s.cycle > expected_cycle {
            next = next.saturating_add((s.cycle - expected_cycle).saturating_mul(interval_ns));
        }
        out.push(next);
        let woke = next.saturating_add(s.latency_us.saturating_mul(1_000));
        next = next.saturating_add(interval_ns);
        if woke > next {
            next = next.saturating_add((woke - next).div_ceil(interval_ns).saturating_mul(interval_ns));
        }
        expected_cycle = s.cycle.saturating_add(1);
    }
    out
}

/// The indices of the `n` worst samples, worst first (earliest on ties).
pub fn worst_samples(samples: &[Sample], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..samples.len()).collect();
    idx.sort_by_key(|&i| (std::cmp::Reverse(samples[i].latency_us), i));
    idx.truncate(n);
    idx
}

/// What the host did in one late wake-up's window: the largest host-side
/// contributor if it explains at least a tenth of the latency (and 1 µs),
/// else the vCPU's own wait to run, else nothing on the host.
pub fn host_cause(latency_ns: u64, w: &WindowView) -> HostCause {
    let floor = (latency_ns / 10).max(1_000);
    let mut best = HostCause::InsideGuest;
    let mut best_ns = 0;
    if let Some(t) = w.threads.first()
        && t.overlap_ns > best_ns
    {
        best_ns = t.overlap_ns;
        best = HostCause::Preempted {
            tid: t.tid,
            comm: t.comm.clone(),
            class: t.class.map(|c| c.to_string()),
            ns: t.overlap_ns,
        };
    }
    if w.irq_ns > best_ns {
        best_ns = w.irq_ns;
        best = HostCause::Irq { ns: w.irq_ns };
    }
    if w.softirq_ns > best_ns {
        best_ns = w.softirq_ns;
        best = HostCause::Softirq { ns: w.softirq_ns };
    }
    if best_ns >= floor {
        best
    } else if w.wait_ns >= floor {
        HostCause::CpuReady { ns: w.wait_ns }
    } else {
        HostCause::InsideGuest
    }
}

/// One line on a late wake-up's host side.
pub fn explain(w: &GuestWakeup) -> String {
    use super::report::fmt_ns;
    let mut parts = Vec::new();
    parts.push(match &w.cause {
        HostCause::Preempted { ns, .. } => format!("{} ran {} of it", w.cause.who(), fmt_ns(*ns)),
        HostCause::Irq { ns } => format!("host hard IRQs took {}", fmt_ns(*ns)),
        HostCause::Softirq { ns } => format!("host softirqs took {}", fmt_ns(*ns)),
        HostCause::CpuReady { ns } => format!(
            "the vCPU thread waited {} to run with nothing else named on its CPU",
            fmt_ns(*ns)
        ),
        HostCause::InsideGuest => {
            "the host left the vCPU alone: the delay was inside the guest".to_string()
        }
    });
    parts.push(format!(
        "vCPU waited {} in the window",
        fmt_ns(w.vcpu_wait_ns)
    ));
    let others: Vec<String> = w
        .threads
        .iter()
        .take(3)
        .map(|t| format!("{} (tid {}) {}", t.comm, t.tid, fmt_ns(t.overlap_ns)))
        .collect();
    if !others.is_empty() {
        parts.push(format!("host threads: {}", others.join(", ")));
    }
    parts.push(format!(
        "host IRQs {}, softirqs {}",
        fmt_ns(w.irq_ns),
        fmt_ns(w.softirq_ns)
    ));
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::class::ThreadClass;

    const VERBOSE: &str = "\
Using 1 cpus.
# /dev/cpu_dma_latency set to 0us
Thread 0 using cpu 0.
Thread 0 Interval: 1000
       0:       0:     120
       0:       1:      15
       0:       2:    2500
       0:       4:      17
# Histogram
000015 000001
000017 000001
000120 000001
# Total: 000000003
# Min Latencies: 00015
# Avg Latencies: 00663
# Max Latencies: 02500
# Histogram Overflows: 00001
# Histogram Overflow at cycle number:
# Thread 0: 00002
";

    #[test]
    fn verbose_output_splits_into_samples_and_histogram() {
        let (h, s) = parse_verbose_output(VERBOSE).unwrap();
        assert_eq!(h.total, Some(3));
        assert_eq!(h.overflows, 1);
        assert_eq!(h.max_us, Some(2500));
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[2],
            Sample {
                cycle: 2,
                latency_us: 2500
            }
        );
        assert_eq!(s[3].cycle, 4);
        assert!(parse_verbose_output("       0:       0:     120\n").is_err());
    }

    #[test]
    fn the_realtime_offset_comes_from_clock_base_1() {
        let tl = "Timer List Version: v0.9\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 5000 nsecs\n\ncpu: 0\n \
                  clock 0:\n  .base:       00000000a\n  .index:      0\n  .resolution: 1 nsecs\n  \
                  .get_time:   ktime_get\n  .offset:     0 nsecs\nactive timers:\n #0: <0>, tick_sched_timer, S:01\n \
                  # expires at 6000-6000 nsecs [in 1000 to 1000 nsecs]\n clock 1:\n  .base:       00000000b\n  \
                  .index:      1\n  .resolution: 1 nsecs\n  .get_time:   ktime_get_real\n  \
                  .offset:     1764672000123456789 nsecs\nactive timers:\n clock 2:\n  .offset:     7 nsecs\n";
        assert_eq!(realtime_offset(tl), Some(1_764_672_000_123_456_789));
        assert_eq!(realtime_offset("now at 5 nsecs\n"), None);
    }

    #[test]
    fn the_offset_comes_from_the_shortest_round_trip() {
        let r = |b: u64, a: u64, g: u64| ClockReading {
            host_before_ns: b,
            host_after_ns: a,
            guest_ns: g,
        };
        // host = guest + 1_000_000 exactly; readings with round trips of 400,
        // 100 and 10_000 ns, the guest reading at various points inside.
        let readings = [
            r(10_000, 10_400, 9_000 + 100),
            r(20_000, 20_100, 19_000 + 80),
            r(30_000, 40_000, 29_000 + 9_000),
        ];
        let (offset, error) = estimate(&readings, 1_000).unwrap();
        // Midpoint 20_050 - 19_080 = 970 (true offset 1000): within the bound.
        assert_eq!(offset, 970);
        assert_eq!(error, 50 + 1_000);
        assert!((offset - 1_000).unsigned_abs() <= error);
        assert_eq!(estimate(&[], 0), None);
        // A reading whose host clock went backwards is not used.
        assert_eq!(estimate(&[r(5, 4, 1)], 0), None);
    }

    #[test]
    fn guest_times_map_onto_the_host_clock_with_drift() {
        let m = ClockMap {
            guest_start_ns: 1_000_000_000,
            guest_end_ns: 11_000_000_000,
            offset_start_ns: 5_000,
            offset_end_ns: 15_000,
            error_ns: 100,
        };
        assert_eq!(m.to_host(1_000_000_000), 1_000_005_000);
        assert_eq!(m.to_host(6_000_000_000), 6_000_010_000);
        assert_eq!(m.to_host(11_000_000_000), 11_000_015_000);
        // Outside the run: the nearest end's offset.
        assert_eq!(m.to_host(20_000_000_000), 20_000_015_000);
        let neg = ClockMap {
            offset_start_ns: -2_000,
            offset_end_ns: -2_000,
            ..m
        };
        assert_eq!(neg.to_host(3_000_000_000), 2_999_998_000);
    }

    #[test]
    fn secaligned_starts_on_the_next_second() {
        assert_eq!(secaligned_base(41_300_000_000), 42_000_000_000);
        assert_eq!(secaligned_base(41_950_000_000), 43_000_000_000);
        assert_eq!(secaligned_base(41_000_000_000), 42_000_000_000);
    }

    #[test]
    fn wake_targets_follow_cyclictest_including_skips_and_gaps() {
        let s = |cycle, latency_us| Sample { cycle, latency_us };
        let base = 10_000_000_000;
        // 1 ms interval: 120 µs late, on time, 2.5 ms late (the next two
        // targets are past: cyclictest skips them), then cycle 3 is missing.
        let t = wake_targets(
            base,
            1_000_000,
            &[s(0, 120), s(1, 15), s(2, 2500), s(4, 17)],
        );
        assert_eq!(
            t,
            vec![
                base + 1_000_000,
                base + 2_000_000,
                base + 3_000_000,
                // woke at +5.5 ms: +4 and +5 passed, next is +6; cycle 3 at +6
                // is missing from the output, so cycle 4 is at +7.
                base + 7_000_000,
            ]
        );
        assert_eq!(
            worst_samples(&[s(0, 5), s(1, 9), s(2, 9), s(3, 1)], 2),
            vec![1, 2]
        );
    }

    fn view(wait: u64, threads: Vec<(u32, &str, u64)>, irq: u64, softirq: u64) -> WindowView {
        WindowView {
            waits: 1,
            wait_ns: wait,
            threads: threads
                .into_iter()
                .map(|(tid, comm, ns)| Overlap {
                    tid,
                    comm: comm.into(),
                    class: Some(ThreadClass::IntruderUser),
                    overlap_ns: ns,
                    run_ns: ns,
                })
                .collect(),
            irq_ns: irq,
            softirq_ns: softirq,
            irqs: vec![],
            softirqs: vec![],
        }
    }

    #[test]
    fn the_host_cause_needs_a_tenth_of_the_latency() {
        let c = host_cause(
            2_000_000,
            &view(1_950_000, vec![(9, "stress", 1_900_000)], 5_000, 0),
        );
        assert_eq!(
            c,
            HostCause::Preempted {
                tid: 9,
                comm: "stress".into(),
                class: Some("intruder_user".into()),
                ns: 1_900_000
            }
        );
        assert_eq!(c.who(), "host thread stress (tid 9, intruder_user)");
        assert_eq!(
            host_cause(100_000, &view(30_000, vec![], 25_000, 3_000)),
            HostCause::Irq { ns: 25_000 }
        );
        assert_eq!(
            host_cause(100_000, &view(60_000, vec![(9, "x", 2_000)], 0, 0)),
            HostCause::CpuReady { ns: 60_000 }
        );
        assert_eq!(
            host_cause(100_000, &view(2_000, vec![], 500, 0)),
            HostCause::InsideGuest
        );
        let w = GuestWakeup {
            cycle: 3,
            latency_us: 2000,
            guest_target_ns: 0,
            host_from_ns: 0,
            host_to_ns: 0,
            offset_ns: 0,
            vcpu_wait_ns: 1_950_000,
            threads: view(0, vec![(9, "stress", 1_900_000)], 0, 0).threads,
            irq_ns: 5_000,
            softirq_ns: 0,
            irqs: vec![],
            softirqs: vec![],
            cause: c,
            explanation: String::new(),
        };
        let e = explain(&w);
        assert!(
            e.starts_with("host thread stress (tid 9, intruder_user) ran 1.90ms of it"),
            "{e}"
        );
        assert!(e.contains("vCPU waited 1.95ms"), "{e}");
    }

    #[test]
    fn a_guest_claiming_absurd_latencies_or_cycles_costs_no_time_and_no_panic() {
        let samples = [
            Sample { cycle: 0, latency_us: u64::MAX },
            Sample { cycle: u64::MAX, latency_us: 1_000_000_000_000_000 },
            Sample { cycle: 3, latency_us: 5 },
        ];
        let t = wake_targets(u64::MAX - 5, 1_000_000, &samples);
        assert_eq!(t.len(), 3);
        assert!(t.iter().all(|&x| x == u64::MAX), "{t:?}");
        assert_eq!(secaligned_base(u64::MAX), u64::MAX);
        // A late sample pushes the next target past its wake-up, in one step.
        let t = wake_targets(0, 1_000, &[Sample { cycle: 0, latency_us: 10 }, Sample { cycle: 1, latency_us: 0 }]);
        assert_eq!(t, [1_000, 11_000], "the first target not before the late wake-up");
    }

}
