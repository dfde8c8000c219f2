//! `sched_migrate_task`: a non-owner moving onto a guarded CPU, or an owner
//! vCPU leaving its CPU. Called from `set_task_cpu()` before the task moves,
//! so `task_cpu(p)` is still the origin
//! (https://elixir.bootlin.com/linux/v6.18/source/kernel/sched/core.c).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use pin_common::event;

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
    let info = task_info(tid);
    let (kind, cpu, other_cpu) = if info.is_owner() {
        // Report an owner leaving home, not every later move elsewhere.
        if orig != info.owner_cpu || dest == info.owner_cpu {
            return;
        }
        (event::OWNER_AWAY, info.owner_cpu, dest)
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
        (event::MIGRATE_IN, dest, orig)
    };
    send(event::Migration {
        header: event::Header { kind, cpu },
        tid,
        tgid,
        comm: task::comm(p),
        // SAFETY: helper without preconditions.
        at_ns: unsafe { bpf_ktime_get_ns() },
        other_cpu,
        _pad: 0,
    });
}
