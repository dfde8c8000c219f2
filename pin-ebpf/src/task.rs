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

#[inline(always)]
pub fn pid(task: *const u8) -> u32 {
    read::<i32>(task, TASK_OFFSETS.load().pid) as u32
}

#[inline(always)]
pub fn tgid(task: *const u8) -> u32 {
    read::<i32>(task, TASK_OFFSETS.load().tgid) as u32
}

/// CPU time of the task so far (ns), as the scheduler accounts it.
#[inline(always)]
pub fn sum_exec_runtime(task: *const u8) -> u64 {
    read::<u64>(task, TASK_OFFSETS.load().sum_exec_runtime)
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
