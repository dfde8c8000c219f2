//! Guest lifecycle: lets the daemon react to QEMU starting and guests or vCPU
//! threads exiting instead of rescanning /proc often. Both hooks are on rare
//! paths (exec, exit) and filter in the kernel, so almost nothing is sent.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use pin_common::{TASK_COMM_LEN, event};

use crate::maps::{GUESTS, send, task_info};

/// `trace_sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`,
/// called after the new image is set up, so `comm` is already the new name.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn proc_exec(_ctx: BtfTracePointContext) -> i32 {
    let comm = bpf_get_current_comm().unwrap_or_default();
    // qemu-system-x86_64, qemu-kvm, kvm: the names QEMU runs under.
    if !(comm.starts_with(b"qemu") || comm.starts_with(b"kvm")) {
        return 0;
    }
    emit(event::EXEC, comm);
    0
}

/// `trace_sched_process_exit(struct task_struct *p, ...)`, called from do_exit() for every exiting thread.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn proc_exit(_ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    // Separate branches: LLVM would otherwise OR the two map pointers, which the verifier rejects.
    if task_info(tid).is_owner() {
        emit(event::EXIT, bpf_get_current_comm().unwrap_or_default());
        return 0;
    }
    if tid != tgid {
        return 0;
    }
    if unsafe { GUESTS.get(&tgid) }.is_some() {
        emit(event::EXIT, bpf_get_current_comm().unwrap_or_default());
    }
    0
}

#[inline(always)]
fn emit(kind: u32, comm: [u8; TASK_COMM_LEN]) {
    let pid_tgid = bpf_get_current_pid_tgid();
    send(event::Process {
        // No CPU concerned: a guest's threads may be anywhere.
        header: event::Header { kind, cpu: 0 },
        tid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        comm,
        // SAFETY: helper without preconditions.
        at_ns: unsafe { bpf_ktime_get_ns() },
    });
}
