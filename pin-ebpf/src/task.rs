//! Reads of `struct task_struct` fields at offsets resolved from BTF at load time.
//!
//! Every accessor takes `BTF`: true when the pointer is BTF-typed (a `tp_btf`
//! argument), so the field is read with a direct load; false for any other
//! task pointer (a raw tracepoint argument, `bpf_get_current_task()`), read
//! with `bpf_probe_read_kernel`.
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use pin_common::{PF_KTHREAD, TASK_COMM_LEN, counter};

use crate::maps::{TASK_OFFSETS, bump};

#[inline(always)]
fn read<T: Copy + Default>(task: *const u8, offset: u32) -> T {
    // SAFETY: bpf_probe_read_kernel validates the address; a failure yields a default.
    match unsafe { bpf_probe_read_kernel(task.add(offset as usize) as *const T) } {
        Ok(v) => v,
        Err(_) => {
            bump(counter::READ_ERRORS);
            T::default()
        }
    }
}

/// Reads a field of a BTF-typed task pointer (a `tp_btf` argument) with a
/// plain load. The offset comes from read-only, frozen `.rodata`, so the
/// verifier sees a constant, checks the field's type in kernel BTF and emits a
/// fault-safe direct load: no helper call, unlike `bpf_probe_read_kernel`.
#[inline(always)]
fn load<T: Copy>(task: *const u8, offset: u32) -> T {
    // SAFETY: see above; the verifier rejects the program if the access is not a valid field.
    unsafe { core::ptr::read_volatile(task.add(offset as usize) as *const T) }
}

/// The one field reader: a direct load when `BTF`, else `bpf_probe_read_kernel`.
#[inline(always)]
fn field<T: Copy + Default, const BTF: bool>(task: *const u8, offset: u32) -> T {
    if BTF {
        load(task, offset)
    } else {
        read(task, offset)
    }
}

/// The thread id (`task_struct::pid`).
#[inline(always)]
pub fn pid<const BTF: bool>(task: *const u8) -> u32 {
    field::<i32, BTF>(task, TASK_OFFSETS.load().pid) as u32
}

/// The process id (`task_struct::tgid`).
#[inline(always)]
pub fn tgid<const BTF: bool>(task: *const u8) -> u32 {
    field::<i32, BTF>(task, TASK_OFFSETS.load().tgid) as u32
}

/// The CPU the task is on, or was last on.
#[inline(always)]
pub fn cpu<const BTF: bool>(task: *const u8) -> u32 {
    field::<u32, BTF>(task, TASK_OFFSETS.load().cpu)
}

/// CPU time of the task so far (ns), as the scheduler accounts it.
#[inline(always)]
pub fn sum_exec_runtime<const BTF: bool>(task: *const u8) -> u64 {
    field::<u64, BTF>(task, TASK_OFFSETS.load().sum_exec_runtime)
}

/// When the task started (ns since boot): with its id, its identity.
#[inline(always)]
pub fn start_time<const BTF: bool>(task: *const u8) -> u64 {
    field::<u64, BTF>(task, TASK_OFFSETS.load().start_time)
}

/// `sched_info.last_queued`: when the scheduler queued the task to run (rq
/// clock), 0 when it is not waiting; 0 too without `CONFIG_SCHED_INFO`
/// (`sched_info()` tells).
#[inline(always)]
pub fn last_queued<const BTF: bool>(task: *const u8) -> u64 {
    field::<u64, BTF>(task, TASK_OFFSETS.load().last_queued)
}

/// `sched_info.last_arrival`: when the task last began to run (rq clock).
#[inline(always)]
pub fn last_arrival<const BTF: bool>(task: *const u8) -> u64 {
    field::<u64, BTF>(task, TASK_OFFSETS.load().last_arrival)
}

/// Whether the kernel keeps `sched_info` (a constant of the loaded object:
/// the verifier drops the code behind a false one).
#[inline(always)]
pub fn sched_info() -> bool {
    TASK_OFFSETS.load().last_queued != 0
}

/// What kind of kernel thread a task is, if any.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kthread {
    No,
    /// Bound to a single CPU (migration/N, ksoftirqd/N, kworker/N:*, cpuhp/N):
    /// it exists to serve that CPU and is allowed there.
    PerCpu,
    /// May run on several CPUs (kworker/u*, rcu_preempt, ...).
    Unbound,
}

#[inline(always)]
pub fn kthread<const BTF: bool>(task: *const u8) -> Kthread {
    let offsets = TASK_OFFSETS.load();
    let flags: u32 = field::<u32, BTF>(task, offsets.flags);
    if flags & PF_KTHREAD == 0 {
        return Kthread::No;
    }
    let nr: i32 = field::<i32, BTF>(task, offsets.nr_cpus_allowed);
    if nr == 1 {
        Kthread::PerCpu
    } else {
        Kthread::Unbound
    }
}

/// The task's name. Always read with `bpf_probe_read_kernel_buf`: one helper
/// call for the 16 bytes, on rare paths only (events).
pub fn comm(task: *const u8) -> [u8; TASK_COMM_LEN] {
    let mut buf = [0u8; TASK_COMM_LEN];
    // SAFETY: as above; on failure the name stays empty.
    let src = unsafe { task.add(TASK_OFFSETS.load().comm as usize) };
    if unsafe { bpf_probe_read_kernel_buf(src, &mut buf) }.is_err() {
        bump(counter::READ_ERRORS);
    }
    buf
}

/// Whether the current task lives in the host's PID namespace, where the
/// pids it passes to syscalls are the kernel's global ids (ours). One in a
/// container names threads by ids of its own namespace.
#[inline(always)]
pub fn current_in_root_pid_ns() -> bool {
    // SAFETY: plain helper call.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() } as *const u8;
    let offsets = TASK_OFFSETS.load();
    let pid: u64 = read(task, offsets.thread_pid);
    if pid == 0 {
        return false;
    }
    read::<u32>(pid as *const u8, offsets.pid_level) == 0
}
