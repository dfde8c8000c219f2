//! `sched_setaffinity(2)` on an owner vCPU: who changed it, to what.
//!
//! Entry stashes the arguments, exit reports them only if the call succeeded,
//! so userspace can re-read the affinity right away and knows who did it.
//! Record layout (`/sys/kernel/tracing/events/syscalls/sys_enter_sched_setaffinity/format`):
//! common fields (8 bytes), `int __syscall_nr` at 8, then 8-byte args from 16:
//! pid at 16, len at 24, user_mask_ptr at 32. sys_exit: `long ret` at 16.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use pin_common::{PendingAffinity, event};

use crate::{
    maps::{PENDING_AFFINITY, SELF_TGID, send, task_info},
    task,
};

const ARG0: usize = 16;

#[tracepoint(category = "syscalls", name = "sys_enter_sched_setaffinity")]
pub fn setaffinity_enter(ctx: TracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == SELF_TGID.load() {
        return 0;
    }
    let caller = pid_tgid as u32;
    // SAFETY: offsets of the syscall tracepoint record, fixed by the syscall ABI.
    let (pid, len, mask_ptr) = unsafe {
        (
            ctx.read_at::<u64>(ARG0).unwrap_or(u64::MAX),
            ctx.read_at::<u64>(ARG0 + 8).unwrap_or(0),
            ctx.read_at::<u64>(ARG0 + 16).unwrap_or(0),
        )
    };
    let target = if pid == 0 { caller } else { pid as u32 };
    if !task_info(target).is_owner() {
        return 0;
    }
    // A caller in a container (another PID namespace) names the target by
    // an id of its own namespace, which may be some host thread's id, here an
    // owner's: not trusted (the daemon's periodic check still sees a change).
    if pid != 0 && !task::current_in_root_pid_ns() {
        return 0;
    }
    let mask = if len >= 8 {
        // SAFETY: bpf_probe_read_user validates the user pointer.
        unsafe { bpf_probe_read_user(mask_ptr as *const u64) }.unwrap_or(0)
    } else {
        0
    };
    let pending = PendingAffinity {
        target_tid: target,
        _pad: 0,
        mask,
    };
    let _ = PENDING_AFFINITY.insert(&caller, &pending, 0);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_sched_setaffinity")]
pub fn setaffinity_exit(ctx: TracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let caller = pid_tgid as u32;
    let Some(pending) = (unsafe { PENDING_AFFINITY.get(&caller) }).copied() else {
        return 0;
    };
    let _ = PENDING_AFFINITY.remove(&caller);
    // SAFETY: as above.
    let ret = unsafe { ctx.read_at::<i64>(ARG0) }.unwrap_or(-1);
    if ret != 0 {
        return 0;
    }
    let owner = task_info(pending.target_tid);
    if !owner.is_owner() {
        return 0;
    }
    debug!(
        &ctx,
        "affinity of vCPU thread {} changed by {}", pending.target_tid, caller
    );
    send(event::AffinityChange {
        header: event::Header {
            kind: event::AFFINITY_CHANGE,
            cpu: owner.owner_cpu,
        },
        tid: caller,
        tgid: (pid_tgid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
        // SAFETY: helper without preconditions.
        at_ns: unsafe { bpf_ktime_get_ns() },
        target_tid: pending.target_tid,
        _pad: 0,
        mask: pending.mask,
    });
    0
}
