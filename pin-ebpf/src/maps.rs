//! Maps and load-time globals shared by all programs.
use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use pin_common::{
    CpuStats, EVENTS_BYTES, GuardState, IrqKey, MAX_CPUS, MAX_IRQ_KEYS, MAX_OWNERS,
    MAX_PENDING_AFFINITY, MAX_TASKS, MAX_THREADS, NoiseStat, NoiseState, PendingAffinity,
    SoftirqStats, TaskInfo, TaskOffsets, ThreadKey, ThreadStats, WaitHist, Waiting, counter, guard,
};

/// `guard::*` bits at index `cpu` (0: not guarded). Userspace may change it at run time.
#[map]
pub static GUARDED: Array<GuardState> = Array::with_max_entries(MAX_CPUS, 0);

/// Threads userspace told us about: owner vCPUs, allowlisted and watched threads.
#[map]
pub static TASKS: HashMap<u32, TaskInfo> = HashMap::with_max_entries(MAX_TASKS, 0);

/// Per-CPU class totals and the time of the last switch.
#[map]
pub static CPU_STATS: PerCpuArray<CpuStats> = PerCpuArray::with_max_entries(1, 0);

/// Per-(cpu, tid) accounting of intruders. A plain hash (not LRU) so nothing is
/// evicted silently: when full, inserts fail and are counted, and userspace
/// prunes entries of threads that have exited.
#[map]
pub static THREADS: HashMap<ThreadKey, ThreadStats> = HashMap::with_max_entries(MAX_THREADS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// sched_setaffinity arguments between syscall entry and exit, keyed by caller tid.
#[map]
pub static PENDING_AFFINITY: HashMap<u32, PendingAffinity> =
    HashMap::with_max_entries(MAX_PENDING_AFFINITY, 0);

/// Hardware IRQs handled on guarded CPUs.
#[map]
pub static IRQ_STATS: HashMap<IrqKey, NoiseStat> = HashMap::with_max_entries(MAX_IRQ_KEYS, 0);

/// Softirqs run on guarded CPUs, per vector.
#[map]
pub static SOFTIRQ_STATS: PerCpuArray<SoftirqStats> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU handler entry times and running noise totals (indexed by CPU so a
/// wake-up on one CPU can snapshot another CPU's totals).
#[map]
pub static NOISE: Array<NoiseState> = Array::with_max_entries(MAX_CPUS, 0);

/// Latency probes currently runnable but not running, since when.
#[map]
pub static WAITING: HashMap<u32, Waiting> = HashMap::with_max_entries(MAX_OWNERS, 0);

/// Wait-time histograms of watched threads.
#[map]
pub static WAIT_HIST: HashMap<u32, WaitHist> = HashMap::with_max_entries(MAX_OWNERS, 0);

/// Guest (QEMU) process ids whose exit userspace wants to hear about.
#[map]
pub static GUESTS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_OWNERS, 0);

/// pinguard's own tgid at index 0 (see `pin_common::map::DAEMON_TGID`).
#[map]
pub static DAEMON_TGID: Array<u32> = Array::with_max_entries(1, 0);

/// Reads `DAEMON_TGID` with the interface of the load-time global it replaced
/// (a restarted daemon adopts pinned programs, whose globals are frozen).
pub struct SelfTgid;

impl SelfTgid {
    #[inline(always)]
    pub fn load(&self) -> u32 {
        match DAEMON_TGID.get(0) {
            Some(t) => *t,
            None => 0,
        }
    }
}

pub static SELF_TGID: SelfTgid = SelfTgid;

#[unsafe(no_mangle)]
pub static EVENT_INTERVAL_NS: Global<u64> = Global::new(1_000_000_000);

#[unsafe(no_mangle)]
pub static TASK_OFFSETS: Global<TaskOffsets> = Global::new(TaskOffsets {
    pid: 0,
    tgid: 0,
    flags: 0,
    nr_cpus_allowed: 0,
    comm: 0,
    cpu: 0,
    sum_exec_runtime: 0,
    thread_pid: 0,
    pid_level: 0,
    start_time: 0,
    last_queued: 0,
    last_arrival: 0,
});

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

/// The guard state of `cpu` (all zero when not guarded).
#[inline(always)]
pub fn guard_state(cpu: u32) -> GuardState {
    match GUARDED.get(cpu) {
        Some(g) => *g,
        None => GuardState {
            bits: 0,
            owner_tid: 0,
        },
    }
}

#[inline(always)]
pub fn guard_bits(cpu: u32) -> u32 {
    guard_state(cpu).bits
}

#[inline(always)]
pub fn is_guarded(cpu: u32) -> bool {
    guard_bits(cpu) & guard::GUARDED != 0
}

/// The thread's entry, or `TaskInfo::EMPTY`. Returned by value and always
/// fully initialized: an `Option` here lets LLVM spill uninitialized bytes,
/// which the verifier rejects.
#[inline(always)]
pub fn task_info(tid: u32) -> TaskInfo {
    match unsafe { TASKS.get(&tid) } {
        Some(t) => *t,
        None => TaskInfo::EMPTY,
    }
}

/// Sends one record (a `pin_common::event` type: exactly its size is
/// reserved), counting it as lost when the ring buffer is full.
#[inline(always)]
pub fn send<T: 'static>(record: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(record);
            entry.submit(0);
        }
        None => bump(counter::EVENTS_LOST),
    }
}
