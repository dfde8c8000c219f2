//! Reads of `struct task_struct` fields at offsets resolved from BTF at load time.
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

/// Reads with a direct load when `BTF` (the pointer is BTF-typed), else with
/// `bpf_probe_read_kernel`.
#[inline(always)]
fn read_as<T: Copy + Default, const BTF: bool>(task: *const u8, offset: u32) -> T {
    if BTF {
        load(task, offset)
    } else {
        read(task, offset)
    }
}

#[inline(always)]
pub fn pid_as<const BTF: bool>(task: *const u8) -> u32 {
    read_as::<i32, BTF>(task, TASK_OFFSETS.load().pid) as u32
}

#[inline(always)]
pub fn tgid_as<const BTF: bool>(task: *const u8) -> u32 {
    read_as::<i32, BTF>(task, TASK_OFFSETS.load().tgid) as u32
}

#[inline(always)]
pub fn cpu_as<const BTF: bool>(task: *const u8) -> u32 {
    read_as::<u32, BTF>(task, TASK_OFFSETS.load().cpu)
}

/// CPU time of the task so far (ns), as the scheduler accounts it.
#[inline(always)]
pub fn sum_exec_runtime_as<const BTF: bool>(task: *const u8) -> u64 {
    read_as::<u64, BTF>(task, TASK_OFFSETS.load().sum_exec_runtime)
}

#[inline(always)]
pub fn kthread_as<const BTF: bool>(task: *const u8) -> Kthread {
    let offsets = TASK_OFFSETS.load();
    let flags: u32 = read_as::<u32, BTF>(task, offsets.flags);
    if flags & PF_KTHREAD == 0 {
        return Kthread::No;
    }
    let nr: i32 = read_as::<i32, BTF>(task, offsets.nr_cpus_allowed);
    if nr == 1 {
        Kthread::PerCpu
    } else {
        Kthread::Unbound
    }
}

#[inline(always)]
pub fn pid(task: *const u8) -> u32 {
    read::<i32>(task, TASK_OFFSETS.load().pid) as u32
}

#[inline(always)]
pub fn tgid(task: *const u8) -> u32 {
    read::<i32>(task, TASK_OFFSETS.load().tgid) as u32
}

#[inline(always)]
pub fn cpu(task: *const u8) -> u32 {
    read::<u32>(task, TASK_OFFSETS.load().cpu)
}

pub fn comm(task: *const u8) -> [u8; TASK_COMM_LEN] {
    let mut buf = [0u8; TASK_COMM_LEN];
    // SAFETY: as above; on failure the name stays empty.
    let src = unsafe { task.add(TASK_OFFSETS.load().comm as usize) };
    if unsafe { bpf_probe_read_kernel_buf(src, &mut buf) }.is_err() {
        bump(counter::READ_ERRORS);
    }
    buf
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
pub fn kthread(task: *const u8) -> Kthread {
    let offsets = TASK_OFFSETS.load();
    let flags: u32 = read(task, offsets.flags);
    if flags & PF_KTHREAD == 0 {
        return Kthread::No;
    }
    let nr: i32 = read(task, offsets.nr_cpus_allowed);
    if nr == 1 {
        Kthread::PerCpu
    } else {
        Kthread::Unbound
    }
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
