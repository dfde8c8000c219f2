//! The pure core of `pinguard top`: two readings of cumulative totals in
//! (from the kernel's maps or a daemon's endpoints), what the screen shows
//! out (per-CPU rows, the sorted intruder list, violations and enforcement
//! actions). No terminal, no I/O: unit-tested.
use std::collections::BTreeMap;

use crate::bpf::class::ThreadClass;

/// How a guarded CPU's time splits, in the order the screen shows it (the
/// `class` label of `pinguard_cpu_run_seconds_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Share {
    Vcpu,
    Kernel,
    Allowed,
    Intruder,
    Idle,
}

impl Share {
    pub const ALL: [Self; 5] = [
        Self::Vcpu,
        Self::Kernel,
        Self::Allowed,
        Self::Intruder,
        Self::Idle,
    ];

    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Kernel => "kernel",
            Self::Allowed => "allowed",
            Self::Intruder => "intruder",
            Self::Idle => "idle",
        }
    }

    /// The share of the daemon's `class` label.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == label)
    }

    /// The share the kernel's class counts in: both kinds of intruder are one.
    pub const fn of(class: ThreadClass) -> Self {
        match class {
            ThreadClass::Idle => Self::Idle,
            ThreadClass::Vcpu => Self::Vcpu,
            ThreadClass::Kernel => Self::Kernel,
            ThreadClass::Allowed => Self::Allowed,
            ThreadClass::IntruderUser | ThreadClass::IntruderKthread => Self::Intruder,
        }
    }
}

/// One guarded CPU's totals since the kernel started counting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuTotals {
    /// Nanoseconds by [`Share`].
    pub run_ns: [u64; 5],
    pub irq_ns: u64,
    pub irqs: u64,
    pub softirq_ns: u64,
    pub softirqs: u64,
}

/// One thread's totals on one guarded CPU: the daemon's `/intruders` record,
/// which the local source fills from the kernel's maps the same way.
pub use crate::daemon::http::IntruderRecord as IntruderTotal;

/// A violation as the daemon lists it on `/violations`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ViolationRecord {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub kind: String,
    pub cpu: u32,
    pub tid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(default)]
    pub vcpu: Option<u32>,
    #[serde(default)]
    pub detail: String,
}

/// An enforcement counter of the daemon: `evict CPU 1`, `repin web`,
/// `error evict EPERM`.
pub type ActionKey = String;

/// Everything one reading of a source holds: cumulative totals plus what
/// is current (owners, the recent violations).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub cpus: BTreeMap<u32, CpuTotals>,
    /// CPU -> its owner, "vm/vcpuN".
    pub owners: BTreeMap<u32, String>,
    pub intruders: Vec<IntruderTotal>,
    /// Oldest first, as the daemon lists them; empty without a daemon.
    pub violations: Vec<ViolationRecord>,
    /// Enforcement counters; `None` without a daemon (nothing enforces).
    pub actions: Option<BTreeMap<ActionKey, u64>>,
}

/// How the intruder list is sorted; `s` cycles through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    /// Run time in the last interval, most first (then total).
    #[default]
    Recent,
    /// Run time since first seen, most first.
    Total,
    /// Longest single slice, longest first.
    Longest,
    /// CPU, then run time in the last interval.
    Cpu,
    /// Thread id.
    Tid,
}

impl SortKey {
    pub const fn next(self) -> Self {
        match self {
            Self::Recent => Self::Total,
            Self::Total => Self::Longest,
            Self::Longest => Self::Cpu,
            Self::Cpu => Self::Tid,
            Self::Tid => Self::Recent,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Recent => "last interval",
            Self::Total => "total",
            Self::Longest => "longest slice",
            Self::Cpu => "cpu",
            Self::Tid => "tid",
        }
    }
}

/// One guarded CPU over the last interval.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuRow {
    pub cpu: u32,
    pub owner: Option<String>,
    /// Percent of the accounted time by [`Share`]; `None` when nothing was
    /// accounted in the interval (a slice still running is accounted when
    /// it ends).
    pub percent: Option<[f64; 5]>,
    pub irq_ns: u64,
    pub irqs: u64,
    pub softirq_ns: u64,
    pub softirqs: u64,
}

/// One thread on one guarded CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntruderRow {
    pub cpu: u32,
    pub tid: u32,
    pub tgid: u32,
    pub comm: String,
    pub class: ThreadClass,
    /// Run time in the last interval (the first reading: since first seen).
    pub recent_ns: u64,
    pub total_ns: u64,
    pub slices: u64,
    pub max_slice_ns: u64,
}

impl IntruderRow {
    /// Ran in the last interval.
    pub fn is_current(&self) -> bool {
        self.recent_ns > 0
    }
}

/// One enforcement counter: its total and its increase in the last interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRow {
    pub what: ActionKey,
    pub total: u64,
    pub recent: u64,
}

/// What the screen shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub cpus: Vec<CpuRow>,
    pub intruders: Vec<IntruderRow>,
    /// Newest first.
    pub violations: Vec<ViolationRecord>,
    /// `None`: the source cannot enforce (no daemon).
    pub actions: Option<Vec<ActionRow>>,
    pub sort: SortKey,
}

/// Increase of a counter; a smaller reading is a reset (a daemon restart,
/// a thread's entry removed and created again), counted from zero.
fn delta(now: u64, before: u64) -> u64 {
    if now >= before { now - before } else { now }
}

/// The view of `cur`, with the last interval measured from `prev` (the
/// first reading has none: its totals are the interval).
pub fn view(prev: Option<&Snapshot>, cur: &Snapshot, sort: SortKey) -> View {
    let cpus = cur
        .cpus
        .iter()
        .map(|(&cpu, now)| {
            let before = prev.and_then(|p| p.cpus.get(&cpu));
            let d = |f: fn(&CpuTotals) -> u64| delta(f(now), before.map_or(0, f));
            let run: Vec<u64> = (0..5)
                .map(|i| delta(now.run_ns[i], before.map_or(0, |b| b.run_ns[i])))
                .collect();
            let sum: u64 = run.iter().sum();
            let percent = (sum > 0).then(|| {
                let mut p = [0.0; 5];
                for (slot, ns) in p.iter_mut().zip(&run) {
                    *slot = *ns as f64 * 100.0 / sum as f64;
                }
                p
            });
            CpuRow {
                cpu,
                owner: cur.owners.get(&cpu).cloned(),
                percent,
                irq_ns: d(|t| t.irq_ns),
                irqs: d(|t| t.irqs),
                softirq_ns: d(|t| t.softirq_ns),
                softirqs: d(|t| t.softirqs),
            }
        })
        .collect();

    let before: BTreeMap<(u32, u32), u64> = prev
        .map(|p| {
            p.intruders
                .iter()
                .map(|i| ((i.cpu, i.tid), i.run_ns))
                .collect()
        })
        .unwrap_or_default();
    let mut intruders: Vec<IntruderRow> = cur
        .intruders
        .iter()
        .map(|i| IntruderRow {
            cpu: i.cpu,
            tid: i.tid,
            tgid: i.tgid,
            comm: i.comm.clone(),
            class: i.class,
            recent_ns: delta(i.run_ns, before.get(&(i.cpu, i.tid)).copied().unwrap_or(0)),
            total_ns: i.run_ns,
            slices: i.slices,
            max_slice_ns: i.max_slice_ns,
        })
        .collect();
    sort_intruders(&mut intruders, sort);

    let actions = cur.actions.as_ref().map(|now| {
        let before = prev.and_then(|p| p.actions.as_ref());
        now.iter()
            .map(|(what, &total)| ActionRow {
                what: what.clone(),
                total,
                recent: delta(
                    total,
                    before.and_then(|b| b.get(what)).copied().unwrap_or(0),
                ),
            })
            .collect()
    });

    View {
        cpus,
        intruders,
        violations: cur.violations.iter().rev().cloned().collect(),
        actions,
        sort,
    }
}

/// Sorts in place; ties keep a stable order (CPU, then tid).
pub fn sort_intruders(rows: &mut [IntruderRow], key: SortKey) {
    use std::cmp::Reverse;
    rows.sort_by_key(|r| (r.cpu, r.tid));
    match key {
        SortKey::Recent => rows.sort_by_key(|r| (Reverse(r.recent_ns), Reverse(r.total_ns))),
        SortKey::Total => rows.sort_by_key(|r| Reverse(r.total_ns)),
        SortKey::Longest => rows.sort_by_key(|r| Reverse(r.max_slice_ns)),
        SortKey::Cpu => rows.sort_by_key(|r| (r.cpu, Reverse(r.recent_ns))),
        SortKey::Tid => rows.sort_by_key(|r| r.tid),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn intruder(cpu: u32, tid: u32, comm: &str, run_ns: u64, max: u64) -> IntruderTotal {
        IntruderTotal {
            cpu,
            tid,
            tgid: tid,
            comm: comm.into(),
            class: ThreadClass::IntruderUser,
            run_ns,
            slices: 1,
            max_slice_ns: max,
        }
    }

    pub fn snapshot(run_ns: [u64; 5], intruders: Vec<IntruderTotal>) -> Snapshot {
        Snapshot {
            cpus: [(
                1,
                CpuTotals {
                    run_ns,
                    irq_ns: 1_000,
                    irqs: 2,
                    softirq_ns: 3_000,
                    softirqs: 4,
                },
            )]
            .into(),
            owners: [(1, "web/vcpu0".to_string())].into(),
            intruders,
            ..Default::default()
        }
    }

    #[test]
    fn the_split_is_over_the_last_interval() {
        let prev = snapshot([1_000, 0, 0, 0, 9_000], vec![]);
        let cur = snapshot([1_500, 100, 0, 300, 9_100], vec![]);
        let v = view(Some(&prev), &cur, SortKey::Recent);
        let row = &v.cpus[0];
        assert_eq!(row.owner.as_deref(), Some("web/vcpu0"));
        let p = row.percent.expect("time was accounted");
        // 500 + 100 + 0 + 300 + 100 = 1000 ns accounted.
        assert_eq!(p, [50.0, 10.0, 0.0, 30.0, 10.0]);
        // Noise did not grow: nothing in the interval.
        assert_eq!((row.irqs, row.irq_ns, row.softirqs), (0, 0, 0));
        // The first reading is its own interval.
        let first = view(None, &cur, SortKey::Recent);
        assert_eq!((first.cpus[0].irqs, first.cpus[0].softirq_ns), (2, 3_000));
    }

    #[test]
    fn nothing_accounted_has_no_split_and_a_reset_counts_from_zero() {
        let prev = snapshot([5, 5, 5, 5, 5], vec![]);
        let same = view(Some(&prev), &prev, SortKey::Recent);
        assert_eq!(same.cpus[0].percent, None);
        // A restarted daemon's totals are smaller: they are the interval.
        let restarted = snapshot([0, 0, 0, 2, 2], vec![]);
        let v = view(Some(&prev), &restarted, SortKey::Recent);
        assert_eq!(v.cpus[0].percent, Some([0.0, 0.0, 0.0, 50.0, 50.0]));
    }

    #[test]
    fn intruders_show_their_last_interval_and_sort_by_each_key() {
        let prev = snapshot(
            [0; 5],
            vec![
                intruder(1, 30, "old", 900, 50),
                intruder(1, 20, "busy", 100, 10),
            ],
        );
        let cur = snapshot(
            [0; 5],
            vec![
                intruder(1, 30, "old", 900, 50),
                intruder(1, 20, "busy", 600, 10),
                intruder(2, 10, "new", 200, 200),
            ],
        );
        let order = |k: SortKey| -> Vec<u32> {
            view(Some(&prev), &cur, k)
                .intruders
                .iter()
                .map(|r| r.tid)
                .collect()
        };
        // busy ran 500 ns, new (first seen now) 200, old nothing.
        assert_eq!(order(SortKey::Recent), [20, 10, 30]);
        assert_eq!(order(SortKey::Total), [30, 20, 10]);
        assert_eq!(order(SortKey::Longest), [10, 30, 20]);
        assert_eq!(order(SortKey::Cpu), [20, 30, 10]);
        assert_eq!(order(SortKey::Tid), [10, 20, 30]);
        let v = view(Some(&prev), &cur, SortKey::Recent);
        assert_eq!(v.intruders[0].recent_ns, 500);
        assert!(!v.intruders[2].is_current(), "{:?}", v.intruders[2]);
        // The key cycles through all five and back.
        let mut k = SortKey::default();
        for _ in 0..5 {
            k = k.next();
        }
        assert_eq!(k, SortKey::Recent);
    }

    #[test]
    fn violations_newest_first_and_actions_with_their_increase() {
        let v = |kind: &str, time: f64| ViolationRecord {
            time,
            kind: kind.into(),
            cpu: 1,
            tid: 5,
            comm: "x".into(),
            vm: None,
            vcpu: None,
            detail: String::new(),
        };
        let mut prev = snapshot([0; 5], vec![]);
        prev.actions = Some([("evict CPU 1".to_string(), 3)].into());
        let mut cur = prev.clone();
        cur.violations = vec![v("intruder", 1.0), v("vcpu_drift", 2.0)];
        cur.actions = Some([("evict CPU 1".to_string(), 5), ("repin web".to_string(), 1)].into());
        let view = view(Some(&prev), &cur, SortKey::Recent);
        assert_eq!(view.violations[0].kind, "vcpu_drift");
        assert_eq!(
            view.actions.unwrap(),
            [
                ActionRow {
                    what: "evict CPU 1".into(),
                    total: 5,
                    recent: 2
                },
                ActionRow {
                    what: "repin web".into(),
                    total: 1,
                    recent: 1
                },
            ]
        );
    }
}
