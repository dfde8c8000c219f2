//! From probe events to causes: what delayed each wake-up of the measured thread.
//!
//! An EPISODE event is one wait of the probe thread from wake-up (or
//! preemption) to running, with the IRQ/softirq time and NMIs on its CPU
//! meanwhile and the thread that ran right before it. INTRUSION events
//! (`event_interval = 0`: every slice) are the run slices of foreign threads
//! on that CPU. The kernel sends a slice's event at its switch-out, which for
//! the slice that ends a wait is the same `sched_switch` that sends the
//! episode, and earlier in the ring buffer, so when an episode arrives every
//! slice that overlapped it has already been seen: attribution is done as
//! events stream in, with bounded memory whatever the run's length.
use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap, VecDeque},
    rc::Rc,
};

use crate::bpf::{
    class::ThreadClass,
    events::{Episode, Intrusion, KernelEvent, Noise},
};

/// Why one wait was long: its largest contributor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    /// Hard IRQ handlers on the CPU during the wait.
    Irq { ns: u64 },
    /// Softirqs (in IRQ exit or ksoftirqd) during the wait.
    Softirq { ns: u64 },
    /// A thread ran on the CPU instead (an intruder, a per-CPU kernel thread, ...).
    Thread {
        tid: u32,
        comm: String,
        /// pinguard's class (None: gone before it was looked at).
        #[serde(with = "crate::bpf::class::or_unknown")]
        class: Option<ThreadClass>,
        ns: u64,
    },
    /// Nothing measurable but NMIs (their time is not known per wait).
    Nmi { count: u32 },
    /// The CPU was idle: the wait is the exit from idle and the wake-up path.
    IdleExit,
    /// Nothing else ran and no interrupt was seen: the scheduler's own path.
    WakeupPath,
}

impl Cause {
    /// A coarse class for colors and tallies.
    pub fn category(&self) -> Category {
        use ThreadClass::{IntruderKthread, IntruderUser, Kernel};
        match self {
            Cause::Irq { .. } => Category::Irq,
            Cause::Softirq { .. } => Category::Softirq,
            Cause::Thread {
                class: Some(IntruderUser | IntruderKthread),
                ..
            } => Category::Intruder,
            Cause::Thread {
                class: Some(Kernel),
                ..
            } => Category::KernelThread,
            Cause::Thread { .. } => Category::Thread,
            Cause::Nmi { .. } => Category::Nmi,
            Cause::IdleExit => Category::IdleExit,
            Cause::WakeupPath => Category::WakeupPath,
        }
    }

    /// Who, without how long (the key of the per-cause tally).
    pub fn who(&self) -> String {
        match self {
            Cause::Irq { .. } => "hard IRQs".into(),
            Cause::Softirq { .. } => "softirqs".into(),
            Cause::Thread {
                tid, comm, class, ..
            } => {
                let what = match class {
                    Some(ThreadClass::IntruderUser) => "intruder",
                    Some(ThreadClass::IntruderKthread) => "unbound kernel thread",
                    Some(ThreadClass::Kernel) => "kernel thread",
                    _ => "thread",
                };
                format!("{what} {comm} (tid {tid})")
            }
            Cause::Nmi { .. } => "NMIs".into(),
            Cause::IdleExit => "exit from idle".into(),
            Cause::WakeupPath => "wake-up path".into(),
        }
    }
}

/// A coarse class of causes, for colors and tallies.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Irq,
    Softirq,
    Intruder,
    KernelThread,
    Thread,
    Nmi,
    IdleExit,
    WakeupPath,
}

impl Category {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Irq => "irq",
            Self::Softirq => "softirq",
            Self::Intruder => "intruder",
            Self::KernelThread => "kernel_thread",
            Self::Thread => "thread",
            Self::Nmi => "nmi",
            Self::IdleExit => "idle_exit",
            Self::WakeupPath => "wakeup_path",
        }
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A foreign thread's time on the CPU inside one wait.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overlap {
    pub tid: u32,
    pub comm: String,
    #[serde(with = "crate::bpf::class::or_unknown")]
    pub class: Option<ThreadClass>,
    /// Time it ran inside the wait.
    pub overlap_ns: u64,
    /// Its slices that overlapped, in full.
    pub run_ns: u64,
}

/// One IRQ's (by number) or softirq vector's time inside one wait.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NoiseOverlap {
    /// The IRQ number or the softirq vector.
    pub number: u32,
    /// How often it ran inside the wait, and for how long in all.
    pub count: u32,
    pub ns: u64,
}

/// The thread that ran right before the probe at the end of a wait.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrevThread {
    pub tid: u32,
    pub comm: String,
    #[serde(with = "crate::bpf::class::or_unknown")]
    pub class: Option<ThreadClass>,
    /// Its last slice.
    pub run_ns: u64,
}

/// One of the worst waits, with everything that overlapped it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorstEpisode {
    /// Wake-up time from the start of the run, and CLOCK_MONOTONIC.
    pub offset_ns: u64,
    pub wake_ns: u64,
    pub wait_ns: u64,
    pub irq_ns: u64,
    pub softirq_ns: u64,
    pub nmis: u32,
    /// The measured thread.
    pub tid: u32,
    pub prev: PrevThread,
    /// Threads that ran inside the wait, longest first.
    pub threads: Vec<Overlap>,
    /// Hard IRQs and softirq vectors that ran inside the wait, longest first
    /// (empty in reports made before pinguard recorded them).
    #[serde(default)]
    pub irqs: Vec<NoiseOverlap>,
    #[serde(default)]
    pub softirqs: Vec<NoiseOverlap>,
    pub cause: Cause,
    /// One line for people, filled in by the report (it names IRQs and softirq
    /// vectors from the run's totals).
    #[serde(default)]
    pub explanation: String,
}

/// A point of the timeline: the longest wait in one slot of the run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub offset_ns: u64,
    pub wait_ns: u64,
    /// [`Cause::category`] of that wait.
    pub cause: Category,
}

/// An intruder's run slice on the measured CPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Span {
    pub offset_ns: u64,
    pub run_ns: u64,
    pub tid: u32,
    pub comm: String,
    pub class: ThreadClass,
}

/// What the run looked like over time, bounded in size.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Timeline {
    /// The run is cut in slots of this length; each keeps its longest wait.
    pub slot_ns: u64,
    pub points: Vec<Point>,
    /// The longest intruder slices (at most [`MAX_SPANS`]), by time.
    pub spans: Vec<Span>,
    /// Intruder slices not kept in `spans` (shorter than all kept ones).
    pub spans_dropped: u64,
}

/// Waits of one cause over the run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CauseTally {
    pub cause: String,
    pub category: Category,
    pub episodes: u64,
    pub total_wait_ns: u64,
    pub max_wait_ns: u64,
}

/// Everything recorded from the events of one run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recorded {
    pub episodes: u64,
    pub max_wait_ns: u64,
    /// Longest wait first.
    pub worst: Vec<WorstEpisode>,
    /// Most severe first (longest single wait).
    pub by_cause: Vec<CauseTally>,
    pub timeline: Timeline,
    /// Threads of the probe seen in episodes.
    pub probe_tids: Vec<u32>,
}

/// Timeline slots per run.
pub const SLOTS: u64 = 2000;
/// Intruder slices kept for the timeline.
pub const MAX_SPANS: usize = 1000;
/// How long a slice is kept for attribution after it ended. Waits longer
/// than this are attributed to what ran in their last 10 s.
const KEEP_NS: u64 = 10_000_000_000;
/// Bound on remembered slices (a thread switching every few µs for 10 s).
const MAX_SLICES: usize = 200_000;
/// An intruder's end is estimated as start + run time, which leaves out the
/// IRQ time inside the slice; look this much further back for overlaps.
const END_SLACK_NS: u64 = 10_000_000;

/// A hard IRQ handler's or a softirq vector's run on the measured CPU.
#[derive(Debug, Clone, Copy)]
struct NoiseRun {
    softirq: bool,
    number: u32,
    start_ns: u64,
    ns: u64,
}

#[derive(Debug, Clone)]
struct Slice {
    start_ns: u64,
    run_ns: u64,
    tid: u32,
    comm: String,
    class: ThreadClass,
}

impl Slice {
    fn end_ns(&self) -> u64 {
        self.start_ns.saturating_add(self.run_ns)
    }
}

/// What happened on the measured CPU in a window of time, from the kept
/// history ([`Recorder::keep_history`]): the watched thread's waits that
/// overlapped it, the threads that ran inside those waits, and the IRQs and
/// softirqs inside the window.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WindowView {
    pub waits: u32,
    /// The waits' time inside the window.
    pub wait_ns: u64,
    /// Longest first, clipped to the window.
    pub threads: Vec<Overlap>,
    pub irq_ns: u64,
    pub softirq_ns: u64,
    pub irqs: Vec<NoiseOverlap>,
    pub softirqs: Vec<NoiseOverlap>,
}

/// A wait of the watched thread, kept for [`Recorder::window`].
#[derive(Debug, Clone)]
struct PastWait {
    wake_ns: u64,
    wait_ns: u64,
    threads: Vec<Overlap>,
}

/// Bound on kept waits and IRQ/softirq runs with `keep_history` (a 1 kHz
/// guest timer and its host IRQs for about 10 minutes).
const MAX_HISTORY: usize = 1_000_000;

/// Classifies a thread that is not an intruder (ran right before the probe):
/// a kernel thread or an allowed user thread; None when it is gone.
pub type Resolver = Box<dyn FnMut(u32) -> Option<ThreadClass>>;

/// Streams probe events of one run into a [`Recorded`].
pub struct Recorder {
    cpu: u32,
    t0_ns: u64,
    probe_tgid: u32,
    worst_n: usize,
    slot_ns: u64,
    slots: Vec<Option<Point>>,
    slices: VecDeque<Slice>,
    noise: VecDeque<NoiseRun>,
    spans: Vec<Span>,
    spans_dropped: u64,
    worst: Vec<WorstEpisode>,
    episodes: u64,
    max_wait_ns: u64,
    by_cause: HashMap<String, CauseTally>,
    intruder_class: HashMap<u32, ThreadClass>,
    other_class: HashMap<u32, Option<ThreadClass>>,
    probe_tids: Vec<u32>,
    end_ns: Rc<Cell<u64>>,
    resolve: Resolver,
    /// Every wait, kept for [`Recorder::window`] (None: not kept).
    history: Option<VecDeque<PastWait>>,
    /// Waits or IRQ/softirq runs dropped from the history (over its bound).
    history_dropped: u64,
}

impl Recorder {
    /// `t0_ns`: CLOCK_MONOTONIC at the start of the run; `planned`: its length
    /// (sets the timeline's slots and the end: cyclictest's own clock starts
    /// a little later, so nothing measured is cut, while its thread's exit,
    /// no longer real-time, is); `probe_tgid`: cyclictest's pid, whose
    /// threads are the measurement, never noise.
    pub fn new(
        cpu: u32,
        t0_ns: u64,
        planned: std::time::Duration,
        probe_tgid: u32,
        worst_n: usize,
        resolve: Resolver,
    ) -> Self {
        let planned_ns = u64::try_from(planned.as_nanos()).unwrap_or(u64::MAX);
        let slot_ns = (planned_ns / SLOTS).max(1);
        Self {
            cpu,
            t0_ns,
            probe_tgid,
            worst_n,
            slot_ns,
            slots: vec![None; SLOTS as usize],
            slices: VecDeque::new(),
            noise: VecDeque::new(),
            spans: Vec::new(),
            spans_dropped: 0,
            worst: Vec::new(),
            episodes: 0,
            max_wait_ns: 0,
            by_cause: HashMap::new(),
            intruder_class: HashMap::new(),
            other_class: HashMap::new(),
            probe_tids: Vec::new(),
            end_ns: Rc::new(Cell::new(t0_ns.saturating_add(planned_ns))),
            resolve,
            history: None,
            history_dropped: 0,
        }
    }

    /// Keeps every wait and IRQ/softirq run (up to a bound) instead of the
    /// last 10 s, so that [`Recorder::window`] can look at any time of the
    /// run afterwards: what a guest's late wake-ups are matched with.
    pub fn keep_history(&mut self) {
        self.history = Some(VecDeque::new());
    }

    /// Waits or IRQ/softirq runs the history dropped (over its bound).
    pub fn history_dropped(&self) -> u64 {
        self.history_dropped
    }

    /// What happened on the CPU in `[w0, w1]` (CLOCK_MONOTONIC), from the
    /// kept history (empty without [`Recorder::keep_history`]).
    pub fn window(&self, w0: u64, w1: u64) -> WindowView {
        let mut v = WindowView::default();
        let mut per_tid: BTreeMap<u32, Overlap> = BTreeMap::new();
        for w in self.history.iter().flatten() {
            let end = w.wake_ns.saturating_add(w.wait_ns);
            let inside = end.min(w1).saturating_sub(w.wake_ns.max(w0));
            if inside == 0 {
                continue;
            }
            v.waits += 1;
            v.wait_ns += inside;
            for t in &w.threads {
                let o = per_tid.entry(t.tid).or_insert_with(|| Overlap {
                    overlap_ns: 0,
                    run_ns: 0,
                    ..t.clone()
                });
                // A thread's time inside a wait that straddles the window
                // is counted up to the part of the wait inside it.
                o.overlap_ns += t.overlap_ns.min(inside);
                o.run_ns += t.run_ns;
            }
        }
        v.threads = per_tid.into_values().collect();
        v.threads
            .sort_by_key(|o| (std::cmp::Reverse(o.overlap_ns), o.tid));
        let (irqs, softirqs) = self.noise_in(w0, w1);
        v.irq_ns = irqs.iter().map(|o| o.ns).sum();
        v.softirq_ns = softirqs.iter().map(|o| o.ns).sum();
        v.irqs = irqs;
        v.softirqs = softirqs;
        v
    }

    /// The end of the measurement (CLOCK_MONOTONIC); events after it are
    /// ignored. Shared so it can be moved earlier (an interrupted run) while
    /// the recorder is borrowed by the event reader.
    pub fn end(&self) -> Rc<Cell<u64>> {
        self.end_ns.clone()
    }

    /// Takes the events of the measured CPU up to the end; the probe's own
    /// slices are the measurement, not noise.
    pub fn on_event(&mut self, ev: &KernelEvent) {
        let end = self.end_ns.get();
        match ev {
            KernelEvent::Intrusion(i) => {
                if i.cpu == self.cpu && i.thread.tgid != self.probe_tgid && i.start_ns < end {
                    self.on_slice(i);
                }
            }
            KernelEvent::Irq(n) => self.on_noise(false, n, end),
            KernelEvent::Softirq(n) => self.on_noise(true, n, end),
            KernelEvent::Episode(ep) => {
                if ep.cpu == self.cpu && ep.wake_ns < end {
                    self.on_episode(ep.tid, ep);
                }
            }
            // The daemon's business, not a wait's.
            KernelEvent::MigrateIn(_)
            | KernelEvent::OwnerAway(_)
            | KernelEvent::AffinityChange(_)
            | KernelEvent::Exec(_)
            | KernelEvent::Exit(_) => {}
        }
    }

    fn on_slice(&mut self, ev: &Intrusion) {
        let class = ev.class;
        self.intruder_class.insert(ev.thread.tid, class);
        let slice = Slice {
            start_ns: ev.start_ns,
            run_ns: ev.run_ns,
            tid: ev.thread.tid,
            comm: ev.thread.comm.clone(),
            class,
        };
        let newest_end = slice.end_ns();
        if slice.end_ns() >= self.t0_ns {
            self.keep_span(Span {
                offset_ns: slice.start_ns.saturating_sub(self.t0_ns),
                run_ns: slice.run_ns,
                tid: slice.tid,
                comm: slice.comm.clone(),
                class,
            });
        }
        self.slices.push_back(slice);
        while let Some(front) = self.slices.front() {
            if self.slices.len() > MAX_SLICES || front.end_ns().saturating_add(KEEP_NS) < newest_end
            {
                self.slices.pop_front();
            } else {
                break;
            }
        }
    }

    /// IRQs and softirqs are sent at their exit, so all that ran inside a
    /// wait arrive before its episode (sent at the switch that ends it):
    /// neither can be switched out. On PREEMPT_RT softirqs run in preemptible
    /// threads: one that the probe preempts ends after the wait and is not
    /// among its softirqs (nor in the kernel's per-wait softirq time, which
    /// counts what ended inside the wait); the thread running it is.
    fn on_noise(&mut self, softirq: bool, n: &Noise, end: u64) {
        if n.cpu != self.cpu || n.start_ns >= end {
            return;
        }
        let run = NoiseRun {
            softirq,
            number: n.number,
            start_ns: n.start_ns,
            ns: n.run_ns,
        };
        let newest_end = run.start_ns.saturating_add(run.ns);
        self.noise.push_back(run);
        if self.history.is_some() {
            if self.noise.len() > MAX_HISTORY {
                self.noise.pop_front();
                self.history_dropped += 1;
            }
            return;
        }
        while let Some(front) = self.noise.front() {
            if self.noise.len() > MAX_SLICES
                || front
                    .start_ns
                    .saturating_add(front.ns)
                    .saturating_add(KEEP_NS)
                    < newest_end
            {
                self.noise.pop_front();
            } else {
                break;
            }
        }
    }

    /// The IRQs and softirq vectors inside `[w0, w1]`, longest first.
    fn noise_in(&self, w0: u64, w1: u64) -> (Vec<NoiseOverlap>, Vec<NoiseOverlap>) {
        let mut irqs: BTreeMap<u32, NoiseOverlap> = BTreeMap::new();
        let mut softirqs: BTreeMap<u32, NoiseOverlap> = BTreeMap::new();
        for r in self.noise.iter().rev() {
            let end = r.start_ns.saturating_add(r.ns);
            if end.saturating_add(END_SLACK_NS) < w0 {
                break;
            }
            let overlap = end.min(w1).saturating_sub(r.start_ns.max(w0));
            if overlap == 0 {
                continue;
            }
            let map = if r.softirq { &mut softirqs } else { &mut irqs };
            let o = map.entry(r.number).or_insert(NoiseOverlap {
                number: r.number,
                count: 0,
                ns: 0,
            });
            o.count += 1;
            o.ns += overlap;
        }
        let sorted = |m: BTreeMap<u32, NoiseOverlap>| {
            let mut v: Vec<NoiseOverlap> = m.into_values().collect();
            v.sort_by_key(|o| std::cmp::Reverse(o.ns));
            v
        };
        (sorted(irqs), sorted(softirqs))
    }

    fn keep_span(&mut self, span: Span) {
        self.spans.push(span);
        if self.spans.len() >= 2 * MAX_SPANS {
            self.trim_spans();
        }
    }

    fn trim_spans(&mut self) {
        if self.spans.len() > MAX_SPANS {
            self.spans.sort_by_key(|s| std::cmp::Reverse(s.run_ns));
            self.spans_dropped += (self.spans.len() - MAX_SPANS) as u64;
            self.spans.truncate(MAX_SPANS);
        }
    }

    fn class_of(&mut self, tid: u32) -> Option<ThreadClass> {
        if tid == 0 {
            return Some(ThreadClass::Idle);
        }
        if let Some(c) = self.intruder_class.get(&tid) {
            return Some(*c);
        }
        if let Some(c) = self.other_class.get(&tid) {
            return *c;
        }
        let c = (self.resolve)(tid);
        self.other_class.insert(tid, c);
        c
    }

    fn on_episode(&mut self, tid: u32, ep: &Episode) {
        if !self.probe_tids.contains(&tid) {
            self.probe_tids.push(tid);
        }
        self.episodes += 1;
        self.max_wait_ns = self.max_wait_ns.max(ep.wait_ns);
        let (w0, w1) = (ep.wake_ns, ep.wake_ns.saturating_add(ep.wait_ns));
        let mut per_tid: BTreeMap<u32, Overlap> = BTreeMap::new();
        for (i, s) in self.slices.iter().rev().enumerate() {
            // start + run time leaves out IRQ and steal time inside the slice;
            // the slice that ends the wait (sent by the same switch) ended exactly at its end.
            let end = if i == 0 && s.tid == ep.prev_tid && s.start_ns <= w1 {
                w1
            } else {
                s.end_ns()
            };
            if end.saturating_add(END_SLACK_NS) < w0 {
                break;
            }
            let overlap = end.min(w1).saturating_sub(s.start_ns.max(w0));
            if overlap == 0 {
                continue;
            }
            let o = per_tid.entry(s.tid).or_insert_with(|| Overlap {
                tid: s.tid,
                comm: s.comm.clone(),
                class: Some(s.class),
                overlap_ns: 0,
                run_ns: 0,
            });
            o.overlap_ns += overlap;
            o.run_ns += s.run_ns;
        }
        let prev_class = self.class_of(ep.prev_tid);
        let is_probe = ep.prev_tid == tid || self.probe_tids.contains(&ep.prev_tid);
        if ep.prev_tid != 0 && !is_probe && !per_tid.contains_key(&ep.prev_tid) {
            // A kernel or allowed thread: no slice events, but its last slice
            // ended exactly when the wait did.
            per_tid.insert(
                ep.prev_tid,
                Overlap {
                    tid: ep.prev_tid,
                    comm: ep.prev_comm.clone(),
                    class: prev_class,
                    overlap_ns: ep.prev_run_ns.min(ep.wait_ns),
                    run_ns: ep.prev_run_ns,
                },
            );
        }
        if ep.prev_tid != 0 && !is_probe {
            // The thread that ran right before the probe ran the wait's last
            // `prev_run_ns` (the scheduler's own number): nobody else ran then,
            // whatever a slice's start + run time says (that sum leaves out IRQ
            // time, so a slice can seem to end later than it did).
            let room = ep.wait_ns - ep.prev_run_ns.min(ep.wait_ns);
            for (t, o) in per_tid.iter_mut() {
                if *t != ep.prev_tid {
                    o.overlap_ns = o.overlap_ns.min(room);
                }
            }
            per_tid.retain(|_, o| o.overlap_ns > 0);
        }
        let mut threads: Vec<Overlap> = per_tid.into_values().collect();
        threads.sort_by_key(|o| std::cmp::Reverse(o.overlap_ns));
        if let Some(h) = self.history.as_mut() {
            h.push_back(PastWait {
                wake_ns: ep.wake_ns,
                wait_ns: ep.wait_ns,
                threads: threads.clone(),
            });
            if h.len() > MAX_HISTORY {
                h.pop_front();
                self.history_dropped += 1;
            }
        }
        let cause = dominant(
            ep.wait_ns,
            ep.irq_ns,
            ep.softirq_ns,
            ep.nmis,
            ep.prev_tid,
            &threads,
        );
        let offset_ns = ep.wake_ns.saturating_sub(self.t0_ns);

        let tally = self
            .by_cause
            .entry(cause.who())
            .or_insert_with(|| CauseTally {
                cause: cause.who(),
                category: cause.category(),
                episodes: 0,
                total_wait_ns: 0,
                max_wait_ns: 0,
            });
        tally.episodes += 1;
        tally.total_wait_ns += ep.wait_ns;
        tally.max_wait_ns = tally.max_wait_ns.max(ep.wait_ns);

        let slot = ((offset_ns / self.slot_ns) as usize).min(self.slots.len() - 1);
        if self.slots[slot]
            .as_ref()
            .is_none_or(|p| p.wait_ns < ep.wait_ns)
        {
            self.slots[slot] = Some(Point {
                offset_ns,
                wait_ns: ep.wait_ns,
                cause: cause.category(),
            });
        }

        if self.worst_n == 0 {
            return;
        }
        if self.worst.len() == self.worst_n
            && self.worst.last().is_some_and(|w| w.wait_ns >= ep.wait_ns)
        {
            return;
        }
        let (irqs, softirqs) = self.noise_in(w0, w1);
        let entry = WorstEpisode {
            offset_ns,
            wake_ns: ep.wake_ns,
            wait_ns: ep.wait_ns,
            irq_ns: ep.irq_ns,
            softirq_ns: ep.softirq_ns,
            nmis: ep.nmis,
            tid,
            prev: PrevThread {
                tid: ep.prev_tid,
                comm: ep.prev_comm.clone(),
                class: prev_class,
                run_ns: ep.prev_run_ns,
            },
            threads,
            irqs,
            softirqs,
            cause,
            explanation: String::new(),
        };
        let at = self.worst.partition_point(|w| w.wait_ns >= entry.wait_ns);
        self.worst.insert(at, entry);
        self.worst.truncate(self.worst_n);
    }

    pub fn finish(mut self) -> Recorded {
        self.trim_spans();
        self.spans.sort_by_key(|s| s.offset_ns);
        let mut by_cause: Vec<CauseTally> = self.by_cause.into_values().collect();
        by_cause.sort_by(|a, b| {
            b.max_wait_ns
                .cmp(&a.max_wait_ns)
                .then_with(|| a.cause.cmp(&b.cause))
        });
        Recorded {
            episodes: self.episodes,
            max_wait_ns: self.max_wait_ns,
            worst: self.worst,
            by_cause,
            timeline: Timeline {
                slot_ns: self.slot_ns,
                points: self.slots.into_iter().flatten().collect(),
                spans: self.spans,
                spans_dropped: self.spans_dropped,
            },
            probe_tids: self.probe_tids,
        }
    }
}

/// The largest contributor to a wait of `wait_ns`, if it explains at least a
/// tenth of it (and 1 µs); otherwise what the CPU was doing.
pub fn dominant(
    wait_ns: u64,
    irq_ns: u64,
    softirq_ns: u64,
    nmis: u32,
    prev_tid: u32,
    threads: &[Overlap],
) -> Cause {
    let mut best = Cause::WakeupPath;
    let mut best_ns = 0u64;
    if irq_ns > best_ns {
        best = Cause::Irq { ns: irq_ns };
        best_ns = irq_ns;
    }
    if softirq_ns > best_ns {
        best = Cause::Softirq { ns: softirq_ns };
        best_ns = softirq_ns;
    }
    if let Some(t) = threads.iter().max_by_key(|t| t.overlap_ns)
        && t.overlap_ns > best_ns
    {
        best = Cause::Thread {
            tid: t.tid,
            comm: t.comm.clone(),
            class: t.class,
            ns: t.overlap_ns,
        };
        best_ns = t.overlap_ns;
    }
    if best_ns >= 1_000 && best_ns >= wait_ns / 10 {
        return best;
    }
    if nmis > 0 {
        Cause::Nmi { count: nmis }
    } else if prev_tid == 0 {
        Cause::IdleExit
    } else {
        Cause::WakeupPath
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bpf::events::Thread;

    const T0: u64 = 1_000_000_000;
    const PROBE_PID: u32 = 500;
    const PROBE_TID: u32 = 501;

    /// An intruder's slice on `cpu` (tid and tgid alike).
    fn slice_on(cpu: u32, tid: u32, comm: &str, start: u64, run: u64) -> Intrusion {
        Intrusion {
            cpu,
            thread: Thread {
                tid,
                tgid: tid,
                comm: comm.into(),
            },
            cgroup_id: 0,
            start_ns: start,
            run_ns: run,
            total_ns: 0,
            slices: 0,
            class: ThreadClass::IntruderUser,
        }
    }

    fn slice(tid: u32, comm: &str, start: u64, run: u64) -> KernelEvent {
        KernelEvent::Intrusion(slice_on(1, tid, comm, start, run))
    }

    fn noise_on(cpu: u32, number: u32, start: u64, ns: u64) -> Noise {
        Noise {
            cpu,
            number,
            start_ns: start,
            run_ns: ns,
        }
    }

    fn irq(number: u32, start: u64, ns: u64) -> KernelEvent {
        KernelEvent::Irq(noise_on(1, number, start, ns))
    }

    fn softirq(number: u32, start: u64, ns: u64) -> KernelEvent {
        KernelEvent::Softirq(noise_on(1, number, start, ns))
    }

    /// A wait of the probe thread on CPU 1; `prev`: tid, name and last slice
    /// of the thread that ran before it.
    fn wait(wake: u64, wait: u64, prev: (u32, &str, u64)) -> Episode {
        Episode {
            cpu: 1,
            tid: PROBE_TID,
            wake_ns: wake,
            wait_ns: wait,
            irq_ns: 0,
            softirq_ns: 0,
            nmis: 0,
            prev_tid: prev.0,
            prev_comm: prev.1.into(),
            prev_run_ns: prev.2,
        }
    }

    fn episode(wake: u64, wait_ns: u64, prev: (u32, &str, u64)) -> KernelEvent {
        KernelEvent::Episode(wait(wake, wait_ns, prev))
    }

    fn recorder(worst: usize) -> Recorder {
        Recorder::new(
            1,
            T0,
            Duration::from_secs(2),
            PROBE_PID,
            worst,
            Box::new(|tid| {
                Some(if tid == 77 {
                    ThreadClass::Kernel
                } else {
                    ThreadClass::Allowed
                })
            }),
        )
    }

    #[test]
    fn an_intruder_slice_overlapping_the_wait_is_the_cause() {
        let mut r = recorder(3);
        // Idle wake-ups: 5 µs each.
        for i in 0..10 {
            r.on_event(&episode(T0 + i * 1_000_000, 5_000, (0, "swapper/1", 0)));
        }
        // pg-spiker runs 2 ms from T0+20ms; the probe wakes 0.5 ms into it.
        r.on_event(&slice(4242, "pg-spiker", T0 + 20_000_000, 2_000_000));
        r.on_event(&episode(
            T0 + 20_500_000,
            1_500_000,
            (4242, "pg-spiker", 2_000_000),
        ));
        // A softirq-heavy wait.
        let mut e = wait(T0 + 30_000_000, 40_000, (0, "swapper/1", 0));
        e.softirq_ns = 30_000;
        r.on_event(&KernelEvent::Episode(e));
        // Events of other CPUs and of cyclictest's own threads are not noise.
        let other = slice_on(0, 9, "elsewhere", T0 + 30_000_000, 50_000_000);
        r.on_event(&KernelEvent::Intrusion(other));
        let mut own = slice_on(1, PROBE_TID, "cyclictest", T0, 10_000_000);
        own.thread.tgid = PROBE_PID;
        r.on_event(&KernelEvent::Intrusion(own));

        let rec = r.finish();
        assert_eq!(rec.episodes, 12);
        assert_eq!(rec.max_wait_ns, 1_500_000);
        assert_eq!(rec.worst.len(), 3);
        let w = &rec.worst[0];
        assert_eq!(w.wait_ns, 1_500_000);
        assert_eq!(w.offset_ns, 20_500_000);
        assert_eq!(
            w.cause,
            Cause::Thread {
                tid: 4242,
                comm: "pg-spiker".into(),
                class: Some(ThreadClass::IntruderUser),
                ns: 1_500_000
            }
        );
        assert_eq!(w.threads.len(), 1, "{:?}", w.threads);
        assert_eq!(w.prev.class, Some(ThreadClass::IntruderUser));
        assert_eq!(rec.worst[1].cause, Cause::Softirq { ns: 30_000 });
        assert_eq!(rec.worst[2].cause, Cause::IdleExit);
        assert_eq!(rec.by_cause[0].cause, "intruder pg-spiker (tid 4242)");
        assert_eq!(rec.by_cause[0].category, Category::Intruder);
        let idle = rec
            .by_cause
            .iter()
            .find(|c| c.category == Category::IdleExit)
            .unwrap();
        assert_eq!(idle.episodes, 10);
        assert_eq!(
            rec.timeline.spans.len(),
            1,
            "only pg-spiker is noise on CPU 1"
        );
        assert_eq!(rec.timeline.points.len(), 12);
        assert_eq!(rec.probe_tids, vec![PROBE_TID]);
    }

    #[test]
    fn the_thread_that_ran_right_before_the_probe_bounds_the_others() {
        let mut r = recorder(1);
        // pg-udp's slice seems to cover the whole wait (start + run time),
        // but kworker (tid 77) ran the wait's last 46 µs, all of its 32 µs:
        // the slice really ended before the wake-up, and the kworker is the cause.
        r.on_event(&slice(4242, "pg-udp", T0, 2_000_000));
        r.on_event(&episode(
            T0 + 1_000_000,
            32_000,
            (77, "kworker/1:0H", 46_000),
        ));
        let rec = r.finish();
        let w = &rec.worst[0];
        assert_eq!(w.cause.category(), Category::KernelThread, "{w:?}");
        assert_eq!(w.threads.len(), 1, "{:?}", w.threads);
        assert_eq!(w.threads[0].tid, 77);
        // A prev thread that ran only the last 10 µs leaves 22 µs to the slice.
        let mut r = recorder(1);
        r.on_event(&slice(4242, "pg-udp", T0, 2_000_000));
        r.on_event(&episode(
            T0 + 1_000_000,
            32_000,
            (77, "kworker/1:0H", 10_000),
        ));
        let rec = r.finish();
        let w = &rec.worst[0];
        assert_eq!(w.cause.category(), Category::Intruder, "{w:?}");
        let udp = w.threads.iter().find(|t| t.tid == 4242).unwrap();
        assert_eq!(udp.overlap_ns, 22_000);
    }

    #[test]
    fn the_slice_that_ends_the_wait_counts_to_its_end() {
        let mut r = recorder(1);
        // dd ran 850 µs of CPU time from T0, but 40 µs of it went to IRQs
        // (not in its run time): its slice really ended at T0 + 890 µs,
        // when the probe, woken at T0 + 850 µs, got the CPU.
        r.on_event(&slice(4242, "dd", T0, 850_000));
        r.on_event(&episode(T0 + 850_000, 40_000, (4242, "dd", 850_000)));
        let rec = r.finish();
        assert_eq!(rec.worst[0].threads[0].overlap_ns, 40_000);
        assert_eq!(rec.worst[0].cause.category(), Category::Intruder);
    }

    #[test]
    fn nothing_after_the_end_is_recorded() {
        let mut r = recorder(5);
        let end = r.end();
        assert_eq!(end.get(), T0 + 2_000_000_000, "planned end");
        r.on_event(&episode(T0 + 1_000, 5_000, (0, "", 0)));
        // cyclictest's thread leaves SCHED_FIFO when done: its exit waits are no sample.
        r.on_event(&slice(9, "stress-ng", T0 + 2_000_000_100, 300_000_000));
        r.on_event(&episode(
            T0 + 2_000_000_000,
            340_000_000,
            (9, "stress-ng", 300_000_000),
        ));
        end.set(T0 + 500);
        r.on_event(&episode(T0 + 600, 7_000, (0, "", 0)));
        let rec = r.finish();
        assert_eq!(rec.episodes, 1);
        assert_eq!(rec.max_wait_ns, 5_000);
        assert!(rec.timeline.spans.is_empty());
    }

    #[test]
    fn a_kernel_thread_that_ran_before_the_probe_is_found_without_slices() {
        let mut r = recorder(1);
        r.on_event(&episode(T0, 80_000, (77, "ksoftirqd/1", 70_000)));
        let rec = r.finish();
        assert_eq!(
            rec.worst[0].cause,
            Cause::Thread {
                tid: 77,
                comm: "ksoftirqd/1".into(),
                class: Some(ThreadClass::Kernel),
                ns: 70_000
            }
        );
        assert_eq!(rec.worst[0].cause.category(), Category::KernelThread);
        assert_eq!(
            rec.worst[0].cause.who(),
            "kernel thread ksoftirqd/1 (tid 77)"
        );
    }

    #[test]
    fn worst_keeps_the_n_longest_in_order() {
        let mut r = recorder(2);
        for (i, wait) in [10, 50, 30, 70, 20].iter().enumerate() {
            r.on_event(&episode(
                T0 + i as u64 * 1000,
                wait * 1000,
                (0, "swapper/1", 0),
            ));
        }
        let rec = r.finish();
        let waits: Vec<u64> = rec.worst.iter().map(|w| w.wait_ns).collect();
        assert_eq!(waits, vec![70_000, 50_000]);
    }

    #[test]
    fn timeline_keeps_the_longest_wait_per_slot_and_bounds_spans() {
        // 2 s in 2000 slots: 1 ms each.
        let mut r = recorder(0);
        r.on_event(&episode(T0 + 100, 5_000, (0, "", 0)));
        r.on_event(&episode(T0 + 200, 9_000, (0, "", 0)));
        r.on_event(&episode(T0 + 300, 7_000, (0, "", 0)));
        // Past the planned end (when the end is moved later): clamped into the last slot.
        r.end().set(u64::MAX);
        r.on_event(&episode(T0 + 5_000_000_000, 1_000, (0, "", 0)));
        for i in 0..(2 * MAX_SPANS as u64 + 10) {
            r.on_event(&slice(9, "kworker", T0 + i * 10_000, 1 + i));
        }
        let rec = r.finish();
        assert_eq!(rec.timeline.slot_ns, 1_000_000);
        assert_eq!(rec.timeline.points.len(), 2);
        assert_eq!(rec.timeline.points[0].wait_ns, 9_000);
        assert_eq!(rec.timeline.spans.len(), MAX_SPANS);
        assert_eq!(rec.timeline.spans_dropped, MAX_SPANS as u64 + 10);
        // The longest are kept, sorted by time.
        assert!(
            rec.timeline
                .spans
                .iter()
                .all(|s| s.run_ns > MAX_SPANS as u64 + 10)
        );
        assert!(
            rec.timeline
                .spans
                .windows(2)
                .all(|w| w[0].offset_ns <= w[1].offset_ns)
        );
    }

    #[test]
    fn dominant_cause_needs_a_tenth_of_the_wait() {
        assert_eq!(dominant(100_000, 5_000, 0, 0, 0, &[]), Cause::IdleExit);
        assert_eq!(
            dominant(100_000, 15_000, 12_000, 0, 0, &[]),
            Cause::Irq { ns: 15_000 }
        );
        assert_eq!(dominant(100_000, 0, 0, 2, 0, &[]), Cause::Nmi { count: 2 });
        assert_eq!(dominant(100_000, 0, 0, 0, 33, &[]), Cause::WakeupPath);
        // Below 1 µs nothing counts, even for tiny waits.
        assert_eq!(dominant(2_000, 900, 0, 0, 0, &[]), Cause::IdleExit);
    }

    #[test]
    fn irqs_and_softirqs_inside_a_wait_are_named_and_clipped_to_it() {
        let mut r = recorder(1);
        let wake = T0 + 100_000_000;
        // Before the wait (ignored), straddling its start (clipped), inside it.
        r.on_event(&irq(24, wake - 50_000, 10_000));
        r.on_event(&irq(24, wake - 4_000, 6_000));
        r.on_event(&irq(26, wake + 10_000, 3_000));
        r.on_event(&irq(24, wake + 20_000, 9_000));
        r.on_event(&softirq(3, wake + 30_000, 40_000));
        // Another CPU's IRQ is not this wait's.
        r.on_event(&KernelEvent::Irq(noise_on(0, 30, wake + 5_000, 50_000)));
        let mut e = wait(wake, 100_000, (0, "swapper/1", 0));
        e.irq_ns = 18_000;
        e.softirq_ns = 40_000;
        r.on_event(&KernelEvent::Episode(e));
        // After the wait (not part of it, arrives later anyway).
        r.on_event(&irq(24, wake + 200_000, 5_000));
        let rec = r.finish();
        let w = &rec.worst[0];
        assert_eq!(
            w.irqs,
            [
                NoiseOverlap {
                    number: 24,
                    count: 2,
                    ns: 2_000 + 9_000
                },
                NoiseOverlap {
                    number: 26,
                    count: 1,
                    ns: 3_000
                },
            ]
        );
        assert_eq!(
            w.softirqs,
            [NoiseOverlap {
                number: 3,
                count: 1,
                ns: 40_000
            }]
        );
        assert_eq!(w.cause, Cause::Softirq { ns: 40_000 });
    }

    #[test]
    fn the_history_answers_for_any_window_of_the_run() {
        let mut r = recorder(1);
        r.keep_history();
        // A vCPU-like watched thread: idle wake-ups, then one preempted by
        // an intruder for 3 ms, with an IRQ inside; then 20 s later (beyond
        // the 10 s the recorder keeps without history) a quiet one.
        r.on_event(&episode(T0 + 1_000_000, 4_000, (0, "swapper/1", 0)));
        r.on_event(&slice(4242, "stress-ng", T0 + 5_000_000, 3_000_000));
        r.on_event(&irq(24, T0 + 6_000_000, 7_000));
        r.on_event(&episode(
            T0 + 5_000_000,
            3_000_000,
            (4242, "stress-ng", 3_000_000),
        ));
        r.on_event(&slice(9, "late", T0 + 20_000_000_000, 1_000));
        r.on_event(&episode(T0 + 20_000_000_000, 5_000, (0, "", 0)));
        let v = r.window(T0 + 4_000_000, T0 + 9_000_000);
        assert_eq!((v.waits, v.wait_ns), (1, 3_000_000));
        assert_eq!(v.threads.len(), 1, "{:?}", v.threads);
        assert_eq!(v.threads[0].comm, "stress-ng");
        assert_eq!(v.threads[0].overlap_ns, 3_000_000);
        assert_eq!(v.irq_ns, 7_000);
        assert_eq!(v.irqs[0].number, 24);
        // Half the wait inside the window: the thread's time is clipped.
        let v = r.window(T0 + 6_500_000, T0 + 7_000_000);
        assert_eq!(v.wait_ns, 500_000);
        assert_eq!(v.threads[0].overlap_ns, 500_000);
        assert_eq!(v.irq_ns, 0);
        // Nothing happened here.
        assert_eq!(
            r.window(T0 + 10_000_000, T0 + 11_000_000),
            WindowView::default()
        );
        assert_eq!(r.history_dropped(), 0);
        // Without the history there is nothing to look at.
        let mut plain = recorder(1);
        plain.on_event(&episode(T0, 3_000_000, (0, "", 0)));
        assert_eq!(plain.window(T0, T0 + 1_000_000), WindowView::default());
    }
}
