//! `sched_migrate_task`: a non-owner moving onto a guarded CPU, or an owner
//! vCPU leaving its CPU. Called from `set_task_cpu()` before the task moves,
//! so `task_cpu(p)` is still the origin
//! (https://elixir.bootlin.com/linux/v6.18/source/kernel/sched/core.c).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use pin_common::{Event, event};

use crate::{
    maps::{SELF_TGID, is_guarded, send, task_info},
    task::{self, Kthread},
};

/// `trace_sched_migrate_task(struct task_struct *p, int dest_cpu)`
#[btf_tracepoint(function = "sched_migrate_task")]
pub fn migrate_tp_btf(ctx: BtfTracePointContext) -> i32 {
    let p: *const u8 = ctx.arg(0);
    let dest: i32 = ctx.arg(1);
    on_migrate(p, dest as u32);
    0
}

#[inline(always)]
fn on_migrate(p: *const u8, dest: u32) {
    // Migrations pinguard causes itself (re-pinning, evicting) are not news.
    if (bpf_get_current_pid_tgid() >> 32) as u32 == SELF_TGID.load() {
        return;
    }
    // `p` is BTF-typed: direct loads, no helper calls.
    let tid = task::pid::<true>(p);
    let orig = task::cpu::<true>(p);
    let tgid = task::tgid::<true>(p);
    let mut ev = Event::zeroed();
    let info = task_info(tid);
    if info.is_owner() {
        let owner = info;
        // Report an owner leaving home, not every later move elsewhere.
        if orig != owner.owner_cpu || dest == owner.owner_cpu {
            return;
        }
        ev.kind = event::OWNER_AWAY;
        ev.cpu = owner.owner_cpu;
        ev.other_cpu = dest;
    } else {
        if !is_guarded(dest) {
            return;
        }
        if tgid == SELF_TGID.load() || task::kthread::<true>(p) == Kthread::PerCpu {
            return;
        }
        if info.allowed_on(dest) {
            return;
        }
        ev.kind = event::MIGRATE_IN;
        ev.cpu = dest;
        ev.other_cpu = orig;
    }
    ev.tid = tid;
    ev.tgid = tgid;
    ev.comm = task::comm(p);
    // SAFETY: helper without preconditions.
    ev.start_ns = unsafe { bpf_ktime_get_ns() };
    send(&ev);
}
