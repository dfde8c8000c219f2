//! Noise on guarded CPUs and the wait times of watched threads.
//!
//! IRQs, softirqs and NMIs are timed passively at their tracepoints (what the
//! osnoise tracer measures, without a measuring thread occupying the CPU).
//! Latency probes are timed here from wake-up (or preemption) to running;
//! vCPUs' waits (the host-side "CPU ready" time) are read from the kernel's
//! own `sched_info` by sched_switch (switch.rs) and only added up here.
//! Tracepoints: include/trace/events/irq.h, sched.h, nmi.h
//! (https://elixir.bootlin.com/linux/v6.18/source/include/trace/events/irq.h).
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use pin_common::{
    IrqKey, NoiseStat, NoiseState, SOFTIRQ_SLOTS, WAIT_BUCKETS, WaitHist, Waiting, event, guard,
    watch,
};

use crate::{
    maps::{
        IRQ_STATS, NOISE, SOFTIRQ_STATS, WAIT_HIST, WAITING, guard_state, is_guarded, send,
        task_info,
    },
    task,
};

#[inline(always)]
fn this_cpu() -> u32 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_smp_processor_id() }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn add(stat: &mut NoiseStat, ns: u64) {
    stat.count += 1;
    stat.ns += ns;
    if ns > stat.max_ns {
        stat.max_ns = ns;
    }
}

/// The two kinds of handler timed between an entry and an exit tracepoint.
#[derive(Clone, Copy)]
enum Handler {
    Irq,
    Softirq,
}

impl Handler {
    /// The entry time of the one in progress and the running total, in the CPU's `NOISE` slot.
    #[inline(always)]
    fn clock(self, n: &mut NoiseState) -> (&mut u64, &mut u64) {
        match self {
            Self::Irq => (&mut n.irq_start, &mut n.irq_ns),
            Self::Softirq => (&mut n.softirq_start, &mut n.softirq_ns),
        }
    }

    #[inline(always)]
    fn event(self) -> u32 {
        match self {
            Self::Irq => event::IRQ,
            Self::Softirq => event::SOFTIRQ,
        }
    }
}

/// Notes when handler `h` began on this CPU, if it is guarded.
#[inline(always)]
fn handler_entry(h: Handler) -> i32 {
    let cpu = this_cpu();
    if !is_guarded(cpu) {
        return 0;
    }
    if let Some(n) = NOISE.get_ptr_mut(cpu) {
        // SAFETY: slot of this CPU, written only by this CPU (handlers run with
        // IRQs off, or on this CPU's softirq path).
        *h.clock(unsafe { &mut *n }).0 = now();
    }
    0
}

/// Ends handler `h` (IRQ or vector `number`) on this CPU: adds its time to
/// the CPU's running total and, while a latency probe waits here, sends it as
/// an event. Returns the CPU and the time for the per-number statistics; None
/// when the CPU is not guarded or the entry was not seen (attached meanwhile).
#[inline(always)]
fn handler_exit(h: Handler, number: u32) -> Option<(u32, u64)> {
    let cpu = this_cpu();
    let bits = guard_state(cpu).bits;
    if bits & guard::GUARDED == 0 {
        return None;
    }
    let n = NOISE.get_ptr_mut(cpu)?;
    // SAFETY: as in handler_entry.
    let n = unsafe { &mut *n };
    let probe_waiting = n.probe_waiting != 0;
    let (start_slot, total) = h.clock(n);
    let start = *start_slot;
    if start == 0 {
        return None;
    }
    let ns = now().saturating_sub(start);
    *start_slot = 0;
    *total += ns;
    if bits & guard::NOISE_EVENTS != 0 && probe_waiting {
        send_noise(h.event(), cpu, number, start, ns);
    }
    Some((cpu, ns))
}

/// One IRQ handler's or softirq vector's run, for a latency probe.
#[inline(always)]
fn send_noise(kind: u32, cpu: u32, number: u32, start: u64, ns: u64) {
    send(event::Noise {
        header: event::Header { kind, cpu },
        number,
        _pad: 0,
        start_ns: start,
        run_ns: ns,
    });
}

/// `irq_handler_entry(int irq, struct irqaction *action)`
#[btf_tracepoint(function = "irq_handler_entry")]
pub fn irq_entry(_ctx: BtfTracePointContext) -> i32 {
    handler_entry(Handler::Irq)
}

/// `irq_handler_exit(int irq, struct irqaction *action, int ret)`
#[btf_tracepoint(function = "irq_handler_exit")]
pub fn irq_exit(ctx: BtfTracePointContext) -> i32 {
    let irq: i32 = ctx.arg(0);
    let Some((cpu, ns)) = handler_exit(Handler::Irq, irq as u32) else {
        return 0;
    };
    let key = IrqKey {
        cpu,
        irq: irq as u32,
    };
    match IRQ_STATS.get_ptr_mut(&key) {
        // SAFETY: entries for `cpu` are only written on that CPU.
        Some(s) => add(unsafe { &mut *s }, ns),
        None => {
            let _ = IRQ_STATS.insert(
                &key,
                &NoiseStat {
                    count: 1,
                    ns,
                    max_ns: ns,
                },
                0,
            );
        }
    }
    0
}

/// `softirq_entry(unsigned int vec_nr)`
#[btf_tracepoint(function = "softirq_entry")]
pub fn softirq_entry(_ctx: BtfTracePointContext) -> i32 {
    handler_entry(Handler::Softirq)
}

/// `softirq_exit(unsigned int vec_nr)`
#[btf_tracepoint(function = "softirq_exit")]
pub fn softirq_exit(ctx: BtfTracePointContext) -> i32 {
    let vec: u32 = ctx.arg(0);
    let Some((_, ns)) = handler_exit(Handler::Softirq, vec) else {
        return 0;
    };
    if let Some(s) = SOFTIRQ_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; the mask keeps the index inside the array.
        add(
            unsafe { &mut (*s).vec[vec as usize & (SOFTIRQ_SLOTS - 1)] },
            ns,
        );
    }
    0
}

/// `nmi_handler(void *handler, s64 delta_ns, int handled)`: the kernel times it.
#[btf_tracepoint(function = "nmi_handler")]
pub fn nmi(ctx: BtfTracePointContext) -> i32 {
    let cpu = this_cpu();
    if !is_guarded(cpu) {
        return 0;
    }
    let delta: i64 = ctx.arg(1);
    if let Some(n) = NOISE.get_ptr_mut(cpu) {
        // SAFETY: slot of this CPU.
        unsafe {
            (*n).nmi_count += 1;
            (*n).nmi_ns += delta.max(0) as u64;
        }
    }
    0
}

/// A wait of `tid` (whose CPU time so far is `runtime_ns`) that will end on
/// `cpu`, with the CPU's noise totals at its start (a probe's episode reports
/// what happened meanwhile). The totals are read before the time (`at` 0:
/// now), so that nothing that ends between the two is counted twice.
#[inline(always)]
fn waiting(tid: u32, cpu: u32, at: u64, runtime_ns: u64) -> Waiting {
    let mut w = Waiting {
        tid,
        runtime_ns,
        ..Default::default()
    };
    if let Some(n) = NOISE.get(cpu) {
        w.irq_ns = n.irq_ns;
        w.softirq_ns = n.softirq_ns;
        w.nmi_count = n.nmi_count;
    }
    w.since_ns = if at == 0 { now() } else { at };
    w
}

/// Marks whether a latency probe waits on `cpu` (IRQ/softirq events are sent
/// only then). A plain store to its own word of the CPU's slot.
#[inline(always)]
fn set_probe_waiting(cpu: u32, on: bool) {
    if let Some(n) = NOISE.get_ptr_mut(cpu) {
        // SAFETY: a valid map value; one aligned u64 store.
        unsafe { (*n).probe_waiting = on as u64 };
    }
}

/// Starts a wait of latency probe `tid` that will end on `cpu`. A wait
/// already in progress (a runnable thread woken again) keeps its start.
#[inline(always)]
pub fn start_wait(tid: u32, cpu: u32, at: u64, runtime_ns: u64) {
    set_probe_waiting(cpu, true);
    if unsafe { WAITING.get(&tid) }.is_some_and(|w| w.tid == tid && w.runtime_ns == runtime_ns) {
        return;
    }
    let _ = WAITING.insert(&tid, &waiting(tid, cpu, at, runtime_ns), 0);
}

/// Forgets a wait of probe `tid` (it went to sleep: a wake-up seen while it
/// was still running is not a wait).
#[inline(always)]
pub fn cancel_wait(tid: u32, cpu: u32) {
    set_probe_waiting(cpu, false);
    let _ = WAITING.remove(&tid);
}

/// Wake-ups start the waits of latency probes only: vCPU waits come from the
/// kernel's `sched_info` at sched_switch, so the daemon does not attach this
/// program (it would run on every wake-up of every CPU).
#[inline(always)]
fn on_wakeup(p: *const u8) {
    // Only CPUs where a probe may be watched (a cheap array read before any
    // task read). `p` is BTF-typed (tp_btf): direct loads, no helper calls.
    let cpu = task::cpu::<true>(p);
    if guard_state(cpu).bits & guard::TRACK_WAITS == 0 {
        return;
    }
    let tid = task::pid::<true>(p);
    if task_info(tid).watch != watch::PROBE {
        return;
    }
    start_wait(tid, cpu, 0, task::sum_exec_runtime::<true>(p));
}

/// `sched_wakeup(struct task_struct *p)`: only latency probes are looked at.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn wakeup(ctx: BtfTracePointContext) -> i32 {
    on_wakeup(ctx.arg(0));
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn wakeup_new(ctx: BtfTracePointContext) -> i32 {
    on_wakeup(ctx.arg(0));
    0
}

#[inline(always)]
fn bucket(ns: u64) -> usize {
    let b = 63 - (ns | 1).leading_zeros() as usize;
    if b >= WAIT_BUCKETS {
        WAIT_BUCKETS - 1
    } else {
        b
    }
}

/// A thread's first histogram, inserted from read-only data rather than
/// built on the stack: 272 bytes, and the switch program inlines
/// [`add_wait`] twice within the 512-byte BPF stack.
static EMPTY_HIST: WaitHist = WaitHist {
    buckets: [0; WAIT_BUCKETS],
    count: 0,
    total_ns: 0,
};

/// Adds one wait of watched thread `tid` to its histogram.
#[inline(always)]
pub fn add_wait(tid: u32, wait: u64) {
    let h = match WAIT_HIST.get_ptr_mut(&tid) {
        Some(h) => h,
        None => {
            if WAIT_HIST.insert(&tid, &EMPTY_HIST, 0).is_err() {
                return;
            }
            match WAIT_HIST.get_ptr_mut(&tid) {
                Some(h) => h,
                None => return,
            }
        }
    };
    // SAFETY: a watched thread runs on one CPU at a time; only its own
    // switches write here.
    let h = unsafe { &mut *h };
    h.buckets[bucket(wait) & (WAIT_BUCKETS - 1)] += 1;
    h.count += 1;
    h.total_ns += wait;
}

/// Called from sched_switch on a guarded CPU when latency probe `tid` runs:
/// if it was waiting, ends its wait, adds it to its histogram and reports
/// what happened on the CPU meanwhile. `runtime_ns`: the thread's CPU time
/// so far; a wait recorded when it was different is not this one (it ran
/// since, elsewhere).
#[inline(always)]
pub fn end_wait(tid: u32, cpu: u32, at: u64, runtime_ns: u64, prev_tid: u32, prev_run_ns: u64) {
    if task_info(tid).watch != watch::PROBE {
        return;
    }
    let Some(w) = (unsafe { WAITING.get(&tid) }).copied() else {
        return;
    };
    let _ = WAITING.remove(&tid);
    set_probe_waiting(cpu, false);
    if w.runtime_ns != runtime_ns {
        return;
    }
    let wait = at.saturating_sub(w.since_ns);
    add_wait(tid, wait);
    let (irq_ns, softirq_ns, nmis) = match NOISE.get(cpu) {
        Some(n) => (
            n.irq_ns.saturating_sub(w.irq_ns),
            n.softirq_ns.saturating_sub(w.softirq_ns),
            n.nmi_count.saturating_sub(w.nmi_count),
        ),
        None => (0, 0, 0),
    };
    send(event::Episode {
        header: event::Header {
            kind: event::EPISODE,
            cpu,
        },
        tid,
        prev_tid,
        wake_ns: w.since_ns,
        wait_ns: wait,
        irq_ns,
        softirq_ns,
        nmis,
        prev_run_ns,
        // `current` is still the previous thread at sched_switch.
        prev_comm: bpf_get_current_comm().unwrap_or_default(),
    });
}
