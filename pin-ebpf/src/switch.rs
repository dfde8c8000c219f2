//! `sched_switch`: attribute every run slice on a guarded CPU to its thread.
//!
//! The same body is attached through three hook types so the benchmark can
//! compare their cost on one kernel; userspace attaches exactly one of them.
//! Kernel: kernel/sched/core.c `__schedule()` calls `trace_sched_switch()`
//! before `context_switch()`, so `current` is still `prev`
//! (https://elixir.bootlin.com/linux/v6.18/source/kernel/sched/core.c).
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use pin_common::{ThreadKey, ThreadStats, class, counter, event, guard, watch};

/// How many of a thread's first slices refresh its recorded name.
const COMM_REFRESH_SLICES: u64 = 8;

use crate::{
    maps::{CPU_STATS, EVENT_INTERVAL_NS, SELF_TGID, THREADS, bump, guard_state, send, task_info},
    noise,
    task::{self, Kthread},
};

/// `trace_sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)`
#[btf_tracepoint(function = "sched_switch")]
pub fn switch_tp_btf(ctx: BtfTracePointContext) -> i32 {
    // BTF-typed task pointers: fields are read with direct loads.
    on_switch::<true>(
        ctx.arg(1),
        ctx.arg(2),
        switch_out_state(ctx.arg(0), ctx.arg(3)),
    )
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn switch_raw_tp(ctx: RawTracePointContext) -> i32 {
    on_switch::<false>(
        ctx.arg(1),
        ctx.arg(2),
        switch_out_state(ctx.arg(0), ctx.arg(3)),
    )
}

/// `prev_state` as the wait tracking needs it: 0 (still runnable) when the
/// switch was a preemption. Since 5.18 the tracepoint passes the raw state, so
/// a task preempted between `set_current_state()` and `schedule()` (KVM's halt
/// loop does that) has a non-zero state although it is still runnable.
#[inline(always)]
fn switch_out_state(preempt: u64, prev_state: u32) -> u32 {
    if preempt & 1 != 0 { 0 } else { prev_state }
}

/// The classic tracepoint's record has no task pointers; `current` is `prev`,
/// and without `next` slices are measured in wall-clock time (IRQ and steal
/// time included), unlike the two hooks above.
#[tracepoint(category = "sched", name = "sched_switch")]
pub fn switch_tracepoint(_ctx: TracePointContext) -> i32 {
    // SAFETY: plain helper call.
    let prev = unsafe { bpf_get_current_task() } as *const u8;
    on_switch::<false>(prev, core::ptr::null(), u32::MAX)
}

/// Slices are measured with the scheduler's own clock where possible: the
/// difference of `se.sum_exec_runtime` between switch-in and switch-out, which
/// `pick_next_task()` has just updated for `prev` when the tracepoint fires.
/// That excludes IRQ and steal time exactly as `/proc/<tid>/schedstat` does.
/// The idle task does not accumulate it, so idle slices use wall-clock time.
#[inline(always)]
fn on_switch<const BTF: bool>(prev: *const u8, next: *const u8, prev_state: u32) -> i32 {
    // SAFETY: helper calls without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // The cheap test first (an inlined array read): most switches happen on
    // housekeeping CPUs.
    let guard_state = guard_state(cpu);
    let bits = guard_state.bits;
    if bits & guard::GUARDED == 0 {
        return 0;
    }
    let Some(stats) = CPU_STATS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, written only by this CPU.
    let stats = unsafe { &mut *stats };
    let now = unsafe { bpf_ktime_get_ns() };
    let start = stats.last_switch_ns;
    let cur_task = stats.cur_task;
    let cur_runtime = stats.cur_runtime;
    let cur_queued = stats.cur_queued;
    // Wait tracking needs `next` (not on the classic tracepoint), and only
    // runs where userspace watches someone: the CPU's cached, watched owner
    // (a vCPU) without a lookup; other watched threads, only when there are
    // any (TRACK_WAITS), after a `TASKS` lookup.
    let owner_watched = bits & guard::OWNER_WATCHED != 0;
    let track_others = bits & guard::TRACK_WAITS != 0;
    let track_waits = !next.is_null() && (owner_watched || track_others);
    stats.last_switch_ns = now;
    if next.is_null() {
        stats.cur_task = 0;
    } else {
        stats.cur_task = next as u64;
        stats.cur_runtime = task::sum_exec_runtime::<BTF>(next);
        // When `next` was queued to run (sched_info_arrive() for it runs
        // after this tracepoint, in context_switch() -> prepare_task_switch(),
        // so the stamp is still there): the start of the wait this switch ends.
        stats.cur_queued = if track_waits && task::sched_info() {
            task::last_queued::<BTF>(next)
        } else {
            0
        };
    }
    if start == 0 || start > now {
        // First switch seen on this CPU: the slice began before we attached.
        return 0;
    }
    // With BTF pointers two direct loads are cheaper than a helper call
    // (calls are expensive under retpoline/SRSO mitigations).
    let (tid, tgid) = if BTF {
        (task::pid::<true>(prev), task::tgid::<true>(prev))
    } else {
        let pid_tgid = bpf_get_current_pid_tgid();
        (pid_tgid as u32, (pid_tgid >> 32) as u32)
    };
    let run_ns = if tid != 0 && cur_task != 0 && cur_task == prev as u64 {
        task::sum_exec_runtime::<BTF>(prev).saturating_sub(cur_runtime)
    } else {
        now - start
    };
    let (class, known) = classify::<BTF>(cpu, tid, tgid, prev, guard_state.owner_tid);
    let c = class as usize;
    if c < class::COUNT {
        stats.run_ns[c] += run_ns;
        stats.slices[c] += 1;
    }
    if class::is_intruder(class) {
        record_intruder::<BTF>(cpu, tid, tgid, prev, class, start, now, run_ns, known);
    }
    if track_waits {
        track_wait::<BTF>(
            cpu,
            tid,
            prev,
            prev_state,
            next,
            guard_state.owner_tid,
            owner_watched,
            track_others,
            now,
            run_ns,
            if cur_task == prev as u64 {
                cur_queued
            } else {
                0
            },
            stats.cur_runtime,
        );
    }
    0
}

/// The waits of watched threads at a switch on a guarded CPU.
///
/// vCPUs (`watch::VCPU`): a wait is taken from the kernel's `sched_info` at
/// the vCPU's switch-out: `last_arrival` (stamped at its switch-in, after the
/// tracepoint that stashed `last_queued`) minus that `last_queued`. Both are
/// the same runqueue's clock, so no clock conversion, and no program runs on
/// wake-ups. The wait is counted when the slice that follows it ends.
/// https://elixir.bootlin.com/linux/v6.18/source/kernel/sched/stats.h
/// (`sched_info_enqueue()`, `sched_info_arrive()`).
///
/// Latency probes (`watch::PROBE`): from the wake-up the `wakeup` program
/// saw (or the preemption seen here) to the switch-in, with an EPISODE event.
///
/// `queued`: the `last_queued` stashed at `prev`'s switch-in (0: none, or
/// the CPU's current task was not `prev`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn track_wait<const BTF: bool>(
    cpu: u32,
    tid: u32,
    prev: *const u8,
    prev_state: u32,
    next: *const u8,
    owner_tid: u32,
    owner_watched: bool,
    track_others: bool,
    now: u64,
    run_ns: u64,
    queued: u64,
    next_runtime: u64,
) {
    if tid != 0 {
        let kind = if tid == owner_tid {
            if owner_watched { watch::VCPU } else { 0 }
        } else if track_others {
            task_info(tid).watch
        } else {
            0
        };
        if kind == watch::VCPU {
            if queued != 0 {
                let arrival = task::last_arrival::<BTF>(prev);
                if arrival >= queued {
                    noise::add_wait(tid, arrival - queued);
                }
            }
        } else if kind == watch::PROBE {
            if prev_state == 0 {
                // TASK_RUNNING at switch-out: preempted, still runnable, so
                // waiting from now. Its CPU time was just brought up to date.
                noise::start_wait(tid, cpu, now, task::sum_exec_runtime::<BTF>(prev));
            } else {
                // Going to sleep: forget a wake-up seen while it was still running
                // (ttwu of a running task fires sched_wakeup too).
                noise::cancel_wait(tid, cpu);
            }
        }
    }
    // A probe switching in ends its wait (probes are never a CPU's cached
    // owner: see guard_states() in pin-user).
    if track_others {
        let next_tid = task::pid::<BTF>(next);
        if next_tid != 0 && next_tid != owner_tid {
            // `next`'s CPU time, read above: it has not run since it stopped.
            noise::end_wait(next_tid, cpu, now, next_runtime, tid, run_ns);
        }
    }
}

/// Classifies the thread that just ran, cheapest test first: the CPU's cached
/// owner (no lookup), a known intruder (its `THREADS` entry remembers the
/// class, and is returned for the accounting), then what userspace told us
/// (`TASKS`: owners of other CPUs, allowlisted threads), then `task_struct`.
/// Userspace drops a thread's `THREADS` entries when it allowlists it or makes
/// it an owner, so a known intruder is never one of those.
#[inline(always)]
fn classify<const BTF: bool>(
    cpu: u32,
    tid: u32,
    tgid: u32,
    prev: *const u8,
    owner_tid: u32,
) -> (u32, *mut ThreadStats) {
    let none = core::ptr::null_mut();
    if tid == 0 {
        return (class::IDLE, none);
    }
    if tid == owner_tid {
        return (class::VCPU, none);
    }
    if tgid == SELF_TGID.load() {
        return (class::ALLOWED, none);
    }
    let key = ThreadKey { cpu, tid };
    if let Some(t) = THREADS.get_ptr_mut(&key) {
        // SAFETY: a valid map value; a thread's class never changes.
        let (class, born) = unsafe { ((*t).class, (*t).start_time) };
        if born == task::start_time::<BTF>(prev) {
            return (class, t);
        }
        // The id was reused by a new thread since (userspace prunes entries
        // of exited threads only every few seconds): start over.
        let _ = THREADS.remove(&key);
    }
    let info = task_info(tid);
    if info.is_owner() {
        // Another guest's vCPU running here steals this CPU from its owner
        // (or one of several owners of a shared CPU).
        let class = if info.owner_cpu == cpu {
            class::VCPU
        } else {
            class::INTRUDER_USER
        };
        return (class, none);
    }
    if info.allowed_on(cpu) {
        return (class::ALLOWED, none);
    }
    let class = match task::kthread::<BTF>(prev) {
        Kthread::PerCpu => class::KERNEL,
        Kthread::Unbound => class::INTRUDER_KTHREAD,
        Kthread::No => class::INTRUDER_USER,
    };
    (class, none)
}

/// Accounts an intruder slice per thread and sends an event the first time the
/// thread is seen on this CPU, then at most once per `EVENT_INTERVAL_NS`, so a
/// kworker running thousands of times a second cannot flood the ring buffer.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn record_intruder<const BTF: bool>(
    cpu: u32,
    tid: u32,
    tgid: u32,
    prev: *const u8,
    class: u32,
    start: u64,
    now: u64,
    run_ns: u64,
    known: *mut ThreadStats,
) {
    let key = ThreadKey { cpu, tid };
    let entry = if known.is_null() {
        THREADS.get_ptr_mut(&key)
    } else {
        Some(known)
    };
    let (total_ns, slices) = match entry {
        Some(t) => {
            // SAFETY: entries for `cpu` are only written by this CPU.
            let t = unsafe { &mut *t };
            t.run_ns += run_ns;
            t.slices += 1;
            // A new thread's first slice still runs under its creator's
            // name: it names itself (prctl PR_SET_NAME) just after it
            // starts. Its first few slices refresh the name; later ones
            // skip the helper (this is the path every intruder slice takes).
            if t.slices <= COMM_REFRESH_SLICES {
                t.comm = bpf_get_current_comm().unwrap_or_default();
            }
            if run_ns > t.max_slice_ns {
                t.max_slice_ns = run_ns;
            }
            if now.wrapping_sub(t.last_event_ns) < EVENT_INTERVAL_NS.load() {
                return;
            }
            t.last_event_ns = now;
            (t.run_ns, t.slices)
        }
        None => {
            let stats = ThreadStats {
                run_ns,
                slices: 1,
                last_event_ns: now,
                max_slice_ns: run_ns,
                start_time: task::start_time::<BTF>(prev),
                tgid,
                class,
                comm: bpf_get_current_comm().unwrap_or_default(),
            };
            if THREADS.insert(&key, &stats, 0).is_err() {
                // Without an entry there is no per-thread rate limit: send
                // nothing rather than one event per slice. The slice is still
                // in the CPU's class totals.
                bump(counter::THREAD_MAP_FULL);
                return;
            }
            (run_ns, 1)
        }
    };
    send(event::Intrusion {
        header: event::Header {
            kind: event::INTRUSION,
            cpu,
        },
        tid,
        tgid,
        comm: bpf_get_current_comm().unwrap_or_default(),
        // SAFETY: helper without preconditions; `current` is the thread that ran.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        start_ns: start,
        run_ns,
        total_ns,
        slices,
        class,
        _pad: 0,
    });
}
