//! Honest ratios on a noisy machine: pure arithmetic, no I/O.
//!
//! A benchmark here shares 2 vCPUs with other people's compilers and with the
//! hypervisor's other guests, so a single with/without comparison says
//! little. The runs are interleaved A B B A A B B A ... (A without the tool, B
//! with it): a slow drift of the machine then hits both sides of every pair
//! about equally. Each pair gives one ratio B / A; we report their median and
//! range, the spread of the A runs (what the machine's own noise was), and call
//! the ratio **inconclusive** when that spread is larger than the effect.

/// Which side runs first in pair `i` of an A B B A A B B A ... sequence:
/// `false` = without the tool (A) first.
pub fn with_first(pair: usize) -> bool {
    pair % 2 == 1
}

/// min, median, max (`None` for no values).
pub fn spread(v: &[f64]) -> Option<(f64, f64, f64)> {
    super::spread(v)
}

/// One tool's effect on one load, from interleaved pairs of throughputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub pairs: usize,
    /// Median of the per-pair ratios with / without (1.0 = no effect).
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// (max - min) / median of the runs without the tool: the machine's noise.
    pub baseline_spread: f64,
    /// |1 - ratio|: the size of the effect.
    pub effect: f64,
    /// The baseline's spread is larger than the effect: the data cannot tell
    /// the effect from noise.
    pub inconclusive: bool,
}

/// How a measured ratio stands against a target loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    Inconclusive,
}

impl Verdict {
    pub fn mark(self) -> &'static str {
        match self {
            Verdict::Met => "✓",
            Verdict::Missed => "✗",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

impl Comparison {
    /// From (without, with) throughput pairs (higher is better). `None` when
    /// there is no pair or a throughput is not positive and finite.
    pub fn from_pairs(pairs: &[(f64, f64)]) -> Option<Self> {
        if pairs.is_empty()
            || pairs
                .iter()
                .any(|&(a, b)| !(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0))
        {
            return None;
        }
        let ratios: Vec<f64> = pairs.iter().map(|&(a, b)| b / a).collect();
        let (ratio_min, ratio, ratio_max) = spread(&ratios)?;
        let base: Vec<f64> = pairs.iter().map(|&(a, _)| a).collect();
        let (lo, mid, hi) = spread(&base)?;
        let baseline_spread = (hi - lo) / mid;
        let effect = (1.0 - ratio).abs();
        Some(Self {
            pairs: pairs.len(),
            ratio,
            ratio_min,
            ratio_max,
            baseline_spread,
            effect,
            inconclusive: baseline_spread > effect,
        })
    }

    /// Loss in % (positive = slower with the tool).
    pub fn loss_pct(&self) -> f64 {
        (1.0 - self.ratio) * 100.0
    }

    /// Against a target of at most `max_loss_pct` % throughput lost. A
    /// conclusive ratio is judged by its median. An inconclusive one is
    /// still judged when even the worst pair is within the target (the
    /// noise cannot hide a miss) or even the best pair misses it.
    pub fn verdict(&self, max_loss_pct: f64) -> Verdict {
        let within = |ratio: f64| (1.0 - ratio) * 100.0 <= max_loss_pct;
        if !self.inconclusive {
            return if within(self.ratio) {
                Verdict::Met
            } else {
                Verdict::Missed
            };
        }
        if within(self.ratio_min) {
            Verdict::Met
        } else if !within(self.ratio_max) {
            Verdict::Missed
        } else {
            Verdict::Inconclusive
        }
    }

    /// "0.962 [0.941–0.987]" with "(inconclusive: baseline spread 6.1% > effect 3.8%)".
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{:.3} [{:.3}–{:.3}]",
            self.ratio, self.ratio_min, self.ratio_max
        );
        if self.inconclusive {
            s.push_str(&format!(
                " (inconclusive: baseline spread {:.1}% > effect {:.1}%)",
                self.baseline_spread * 100.0,
                self.effect * 100.0
            ));
        }
        s
    }
}

/// Per-CPU times from /proc/stat, in USER_HZ ticks: `(name, total, steal)`
/// for the "cpu" line and each "cpuN" line.
pub fn cpu_times(stat: &str) -> Vec<(String, u64, u64)> {
    stat.lines()
        .filter(|l| l.starts_with("cpu"))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.to_string();
            // user nice system idle iowait irq softirq steal [guest guest_nice]:
            // guest time is already inside user, so only the first eight add up.
            let v: Vec<u64> = it.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
            (v.len() == 8).then(|| (name, v.iter().sum(), v[7]))
        })
        .collect()
}

/// Steal time between two /proc/stat readings, % of each CPU's time:
/// `(name, steal %)`, for the lines present in both.
pub fn steal_pct(before: &str, after: &str) -> Vec<(String, f64)> {
    let b = cpu_times(before);
    cpu_times(after)
        .into_iter()
        .filter_map(|(name, total, steal)| {
            let (_, t0, s0) = b.iter().find(|(n, ..)| *n == name)?;
            let dt = total.saturating_sub(*t0);
            (dt > 0).then(|| (name, steal.saturating_sub(*s0) as f64 * 100.0 / dt as f64))
        })
        .collect()
}

/// Per-CPU costs `[c0, c1]` (ns per event) from two measurements of
/// `total_ns = n0 * c0 + n1 * c1` with different mixes of CPU 0 and CPU 1
/// events: `(total_ns, [n0, n1])` each. `None` when the mixes are too alike
/// to tell the CPUs apart or a cost comes out negative (noise).
pub fn per_cpu_costs(a: (f64, [f64; 2]), b: (f64, [f64; 2])) -> Option<[f64; 2]> {
    let (ta, [a0, a1]) = a;
    let (tb, [b0, b1]) = b;
    let det = a0 * b1 - a1 * b0;
    // The two mixes must differ: at least 10% of the larger product.
    if det.abs() < 0.1 * (a0 * b1).abs().max((a1 * b0).abs()) {
        return None;
    }
    let c0 = (ta * b1 - a1 * tb) / det;
    let c1 = (a0 * tb - ta * b0) / det;
    (c0 >= 0.0 && c1 >= 0.0).then_some([c0, c1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_abba() {
        let seq: Vec<bool> = (0..4)
            .flat_map(|i| {
                let w = with_first(i);
                [w, !w]
            })
            .collect();
        assert_eq!(
            seq,
            [false, true, true, false, false, true, true, false],
            "A B B A A B B A"
        );
    }

    #[test]
    fn a_clear_effect_is_conclusive() {
        // Baseline 100 ± 1, tool costs 10%.
        let pairs = [(100.0, 90.0), (101.0, 91.0), (99.0, 89.0), (100.0, 90.5)];
        let c = Comparison::from_pairs(&pairs).unwrap();
        assert_eq!(c.pairs, 4);
        assert!((c.ratio - 0.9).abs() < 0.005, "{c:?}");
        assert!((c.baseline_spread - 0.02).abs() < 1e-9, "{c:?}");
        assert!(!c.inconclusive, "{c:?}");
        assert!((c.loss_pct() - 10.0).abs() < 0.5);
        assert_eq!(c.verdict(5.0), Verdict::Missed);
        assert_eq!(c.verdict(12.0), Verdict::Met);
        assert!(!c.describe().contains("inconclusive"));
    }

    #[test]
    fn an_effect_inside_the_noise_is_inconclusive() {
        // Baseline swings ±10%, the tool costs ~2%.
        let pairs = [(100.0, 98.0), (110.0, 107.8), (90.0, 88.2), (105.0, 102.9)];
        let c = Comparison::from_pairs(&pairs).unwrap();
        assert!(c.inconclusive, "{c:?}");
        assert!(c.describe().contains("inconclusive"), "{}", c.describe());
        // Every pair is within 5% and within 1.5% none is: judged anyway.
        assert_eq!(c.verdict(5.0), Verdict::Met);
        assert_eq!(c.verdict(1.5), Verdict::Missed);
        let mixed = [(100.0, 99.0), (110.0, 104.5), (90.0, 88.0), (95.0, 93.0)];
        let c = Comparison::from_pairs(&mixed).unwrap();
        assert!(c.inconclusive, "{c:?}");
        assert_eq!(c.verdict(3.0), Verdict::Inconclusive);
    }

    #[test]
    fn bad_input_gives_nothing() {
        assert_eq!(Comparison::from_pairs(&[]), None);
        assert_eq!(Comparison::from_pairs(&[(0.0, 1.0)]), None);
        assert_eq!(Comparison::from_pairs(&[(1.0, f64::NAN)]), None);
    }

    #[test]
    fn steal_per_cpu() {
        let before = "cpu  10 0 10 70 0 0 0 10 5 0\ncpu0 5 0 5 35 0 0 0 5 0 0\ncpu1 5 0 5 35 0 0 0 5\nctxt 1\n";
        let after = "cpu  20 0 20 130 0 0 0 30 9 0\ncpu0 10 0 10 65 0 0 0 15 0 0\ncpu1 10 0 10 65 0 0 0 15\n";
        let s = steal_pct(before, after);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].0, "cpu");
        assert!((s[0].1 - 20.0).abs() < 1e-9, "{s:?}");
        assert!((s[1].1 - 20.0).abs() < 1e-9, "{s:?}");
        assert!(cpu_times("cpu 1 2\n").is_empty(), "short lines are skipped");
    }

    #[test]
    fn per_cpu_costs_solve_two_mixes() {
        // c0 = 50, c1 = 120: a housekeeping run (mostly CPU 0), a guarded run (half and half).
        let a = (1000.0 * 50.0 + 10.0 * 120.0, [1000.0, 10.0]);
        let b = (500.0 * 50.0 + 500.0 * 120.0, [500.0, 500.0]);
        let [c0, c1] = per_cpu_costs(a, b).unwrap();
        assert!(
            (c0 - 50.0).abs() < 1e-6 && (c1 - 120.0).abs() < 1e-6,
            "{c0} {c1}"
        );
        // The same mix twice cannot be split.
        assert_eq!(per_cpu_costs(a, a), None);
    }
}
