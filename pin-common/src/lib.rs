//! Types shared by the eBPF programs (`pin-ebpf`) and userspace (`pin-user`).
//!
//! Everything here crosses the kernel boundary, so every struct is `#[repr(C)]`
//! with explicit padding and no `bool`. Map names are exported as constants so
//! userspace never repeats a string the eBPF side defines.
#![no_std]

/// Length of `task_struct::comm`, including the trailing NUL.
pub const TASK_COMM_LEN: usize = 16;

/// Upper bound on CPU ids the per-CPU arrays can describe.
pub const MAX_CPUS: u32 = 1024;

/// Capacity of the per-(cpu, thread) intruder accounting map. When it is full,
/// further threads are still counted in the per-CPU class totals and the
/// overflow is counted in [`counter::THREAD_MAP_FULL`].
pub const MAX_THREADS: u32 = 16384;

/// Capacity of the `TASKS` map (owner vCPUs, allowlisted and watched threads).
pub const MAX_TASKS: u32 = 16384;
/// Capacity of the guest and waiting-thread maps.
pub const MAX_OWNERS: u32 = 4096;

/// Capacity of `PENDING_AFFINITY`: sched_setaffinity calls on owner threads
/// in flight at once (an entry lives from syscall entry to exit).
pub const MAX_PENDING_AFFINITY: u32 = 1024;

/// Capacity of `IRQ_STATS`: (guarded CPU, IRQ line) pairs. When full, an IRQ
/// not seen before is still in the CPU's noise total, not in the per-line table.
pub const MAX_IRQ_KEYS: u32 = 4096;

/// Size of the event ring buffer in bytes (a power of two multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Names of the maps defined by pin-ebpf.
pub mod map {
    pub const GUARDED: &str = "GUARDED";
    pub const TASKS: &str = "TASKS";
    pub const CPU_STATS: &str = "CPU_STATS";
    pub const THREADS: &str = "THREADS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
    pub const PENDING_AFFINITY: &str = "PENDING_AFFINITY";
    pub const GUESTS: &str = "GUESTS";
    pub const IRQ_STATS: &str = "IRQ_STATS";
    pub const SOFTIRQ_STATS: &str = "SOFTIRQ_STATS";
    pub const NOISE: &str = "NOISE";
    pub const WAITING: &str = "WAITING";
    pub const WAIT_HIST: &str = "WAIT_HIST";
    /// `Array<u32>` of one entry: the tgid of the pinguard process using the
    /// programs, whose threads never produce events. A map, not a load-time
    /// global, so that a restarted daemon adopting pinned programs can name itself.
    pub const DAEMON_TGID: &str = "DAEMON_TGID";
}

/// Names of the programs defined by pin-ebpf.
pub mod program {
    /// `sched_switch` as a BTF-enabled raw tracepoint (the default).
    pub const SWITCH_TP_BTF: &str = "switch_tp_btf";
    /// `sched_switch` as a raw tracepoint (no BTF needed for attach).
    pub const SWITCH_RAW_TP: &str = "switch_raw_tp";
    /// `sched/sched_switch` as a classic tracepoint (perf-event based).
    pub const SWITCH_TRACEPOINT: &str = "switch_tracepoint";
    pub const MIGRATE_TP_BTF: &str = "migrate_tp_btf";
    pub const SETAFFINITY_ENTER: &str = "setaffinity_enter";
    pub const SETAFFINITY_EXIT: &str = "setaffinity_exit";
    /// `sched_process_exec` of QEMU/KVM binaries: a guest may be starting.
    pub const PROC_EXEC: &str = "proc_exec";
    /// `sched_process_exit` of known guests and vCPU threads.
    pub const PROC_EXIT: &str = "proc_exit";
    pub const IRQ_ENTRY: &str = "irq_entry";
    pub const IRQ_EXIT: &str = "irq_exit";
    pub const SOFTIRQ_ENTRY: &str = "softirq_entry";
    pub const SOFTIRQ_EXIT: &str = "softirq_exit";
    pub const NMI: &str = "nmi";
    pub const WAKEUP: &str = "wakeup";
    pub const WAKEUP_NEW: &str = "wakeup_new";
    /// Programs that do nothing, used by the benchmark as the cost floor of a hook.
    pub const EMPTY_TP_BTF: &str = "empty_tp_btf";
    pub const EMPTY_RAW_TP: &str = "empty_raw_tp";
    pub const EMPTY_TRACEPOINT: &str = "empty_tracepoint";
}

/// Names of load-time globals (`Global<T>` in pin-ebpf, `EbpfLoader::set_global` in userspace).
pub mod global {
    /// `u64`: minimum nanoseconds between two intrusion events of one thread on one CPU.
    pub const EVENT_INTERVAL_NS: &str = "EVENT_INTERVAL_NS";
    /// `TaskOffsets`: field offsets inside `struct task_struct`, read from kernel BTF.
    pub const TASK_OFFSETS: &str = "TASK_OFFSETS";
}

/// Byte offsets of the `task_struct` fields the programs read. Resolved from
/// `/sys/kernel/btf/vmlinux` at load time, never baked in from the build machine
/// (the layout depends on kernel version and configuration, e.g. RANDSTRUCT).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    pub pid: u32,
    pub tgid: u32,
    pub flags: u32,
    pub nr_cpus_allowed: u32,
    pub comm: u32,
    /// Offset of the CPU the task is on (`task_struct::cpu`, or `thread_info.cpu`).
    pub cpu: u32,
    /// Offset of `se.sum_exec_runtime`: the task's CPU time as the scheduler
    /// accounts it (without IRQ and steal time), the same clock as
    /// `/proc/<tid>/schedstat`.
    pub sum_exec_runtime: u32,
    /// Offset of `thread_pid` (`struct pid *`), and of `level` in `struct
    /// pid`: the depth of the task's PID namespace (0: the host's).
    pub thread_pid: u32,
    pub pid_level: u32,
    /// Offset of `start_time` (ns since boot, monotonic): with the thread
    /// id, a thread's identity (a reused thread id has a later start).
    pub start_time: u32,
    /// Offsets of `sched_info.last_queued` and `sched_info.last_arrival`:
    /// when the scheduler queued the task to run and when it last began to
    /// run, in the runqueue's clock (`rq_clock()`). 0 when the kernel has
    /// no `CONFIG_SCHED_INFO`: vCPU waits are then not measured.
    pub last_queued: u32,
    pub last_arrival: u32,
}

/// `task_struct::flags` bit for kernel threads (include/linux/sched.h).
pub const PF_KTHREAD: u32 = 0x0020_0000;
/// `task_struct::flags` bit for threads whose affinity userspace may not change.
pub const PF_NO_SETAFFINITY: u32 = 0x0400_0000;

/// How a run slice on a guarded CPU is classified.
pub mod class {
    /// The idle task (pid 0).
    pub const IDLE: u32 = 0;
    /// The vCPU thread that owns this CPU.
    pub const VCPU: u32 = 1;
    /// A per-CPU kernel thread bound to this CPU (migration/N, ksoftirqd/N, kworker/N:*).
    pub const KERNEL: u32 = 2;
    /// A user thread on the allowlist, or pinguard itself.
    pub const ALLOWED: u32 = 3;
    /// Any other user thread, including another guest's vCPU.
    pub const INTRUDER_USER: u32 = 4;
    /// A kernel thread not bound to this CPU (kworker/u*, ...).
    pub const INTRUDER_KTHREAD: u32 = 5;
    pub const COUNT: usize = 6;

    pub const fn is_intruder(class: u32) -> bool {
        matches!(class, INTRUDER_USER | INTRUDER_KTHREAD)
    }
}

/// Indices into the `COUNTERS` per-CPU array.
pub mod counter {
    /// Ring buffer full: an event could not be reserved.
    pub const EVENTS_LOST: u32 = 0;
    /// `THREADS` map full: a new intruder thread is counted only in the class totals.
    pub const THREAD_MAP_FULL: u32 = 1;
    /// Reads of task_struct fields that failed.
    pub const READ_ERRORS: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Records sent through the `EVENTS` ring buffer. Each kind has a record
/// type sized to what it carries, beginning with a [`Header`](event::Header)
/// whose `kind` says which type follows. The eBPF side reserves exactly that
/// type's size; userspace reads the header, then the record.
pub mod event {
    use super::TASK_COMM_LEN;

    /// A thread that is neither owner nor allowed ran on a guarded CPU: [`Intrusion`].
    pub const INTRUSION: u32 = 1;
    /// A non-owner thread was migrated onto a guarded CPU: [`Migration`].
    pub const MIGRATE_IN: u32 = 2;
    /// An owner (vCPU) thread was migrated away from its CPU: [`Migration`].
    pub const OWNER_AWAY: u32 = 3;
    /// Someone called sched_setaffinity on an owner thread (emitted at
    /// syscall exit): [`AffinityChange`].
    pub const AFFINITY_CHANGE: u32 = 4;
    /// A process whose name starts with "qemu" or "kvm" called exec: [`Process`].
    pub const EXEC: u32 = 5;
    /// A known guest process (tgid in GUESTS) or an owner thread exited: [`Process`].
    pub const EXIT: u32 = 6;
    /// A watched latency-probe thread waited from wake-up to running: [`Episode`].
    pub const EPISODE: u32 = 7;
    /// A hard IRQ handler ran on a CPU with [`super::guard::NOISE_EVENTS`]
    /// while a latency probe waited there: [`Noise`].
    pub const IRQ: u32 = 8;
    /// Softirq processing of one vector, likewise: [`Noise`].
    pub const SOFTIRQ: u32 = 9;

    /// The start of every record.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Header {
        /// One of the kinds above.
        pub kind: u32,
        /// The guarded CPU concerned (0 for [`EXEC`] and [`EXIT`]).
        pub cpu: u32,
    }

    /// [`INTRUSION`]: a run slice of an intruder, the first one on this CPU or
    /// the first after `EVENT_INTERVAL_NS`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Intrusion {
        pub header: Header,
        pub tid: u32,
        pub tgid: u32,
        pub comm: [u8; TASK_COMM_LEN],
        pub cgroup_id: u64,
        /// Start of the slice (CLOCK_MONOTONIC ns) and its length.
        pub start_ns: u64,
        pub run_ns: u64,
        /// Cumulative run time and slices of this thread on this CPU.
        pub total_ns: u64,
        pub slices: u64,
        /// A [`super::class`].
        pub class: u32,
        pub _pad: u32,
    }

    /// [`MIGRATE_IN`] (`header.cpu`: the guarded destination) and
    /// [`OWNER_AWAY`] (`header.cpu`: the owner's assigned CPU).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Migration {
        pub header: Header,
        /// The thread that moves.
        pub tid: u32,
        pub tgid: u32,
        pub comm: [u8; TASK_COMM_LEN],
        pub at_ns: u64,
        /// MIGRATE_IN: the origin CPU; OWNER_AWAY: the destination CPU.
        pub other_cpu: u32,
        pub _pad: u32,
    }

    /// [`AFFINITY_CHANGE`]: `header.cpu` is the owner's assigned CPU.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct AffinityChange {
        pub header: Header,
        /// The caller of sched_setaffinity.
        pub tid: u32,
        pub tgid: u32,
        pub comm: [u8; TASK_COMM_LEN],
        pub at_ns: u64,
        /// The owner thread whose affinity was changed.
        pub target_tid: u32,
        pub _pad: u32,
        /// The first 64 bits of the new mask.
        pub mask: u64,
    }

    /// [`EXEC`] and [`EXIT`]: the thread that called exec or exited.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Process {
        pub header: Header,
        pub tid: u32,
        pub tgid: u32,
        pub comm: [u8; TASK_COMM_LEN],
        pub at_ns: u64,
    }

    /// [`EPISODE`]: a latency probe's wait and what happened on its CPU meanwhile.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Episode {
        pub header: Header,
        /// The probe thread.
        pub tid: u32,
        /// The thread that ran just before the probe.
        pub prev_tid: u32,
        /// Wake-up time (CLOCK_MONOTONIC ns) and the wait until it ran.
        pub wake_ns: u64,
        pub wait_ns: u64,
        /// Hard IRQ and softirq time, and NMIs, on the CPU during the wait.
        pub irq_ns: u64,
        pub softirq_ns: u64,
        pub nmis: u64,
        /// The last slice of `prev_tid`, and its name.
        pub prev_run_ns: u64,
        pub prev_comm: [u8; TASK_COMM_LEN],
    }

    /// [`IRQ`] and [`SOFTIRQ`]: one handler's run.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Noise {
        pub header: Header,
        /// The IRQ number, or the softirq vector.
        pub number: u32,
        pub _pad: u32,
        pub start_ns: u64,
        pub run_ns: u64,
    }

    // The sizes userspace expects; a field added without thought about
    // padding or size shows up here.
    const _: () = {
        assert!(size_of::<Header>() == 8);
        assert!(size_of::<Intrusion>() == 80);
        assert!(size_of::<Migration>() == 48);
        assert!(size_of::<AffinityChange>() == 56);
        assert!(size_of::<Process>() == 40);
        assert!(size_of::<Episode>() == 80);
        assert!(size_of::<Noise>() == 32);
    };
}

/// Softirq vectors (include/linux/interrupt.h: HI, TIMER, NET_TX, NET_RX, BLOCK, IRQ_POLL, TASKLET, SCHED, HRTIMER, RCU).
pub const NR_SOFTIRQS: usize = 10;
pub const SOFTIRQ_NAMES: [&str; NR_SOFTIRQS] = [
    "hi", "timer", "net_tx", "net_rx", "block", "irq_poll", "tasklet", "sched", "hrtimer", "rcu",
];

/// Count and time of one kind of noise (an IRQ line, a softirq vector).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoiseStat {
    pub count: u64,
    pub ns: u64,
    pub max_ns: u64,
}

/// Key of `IRQ_STATS`: hardware IRQ `irq` handled on guarded CPU `cpu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IrqKey {
    pub cpu: u32,
    pub irq: u32,
}

/// Slots in [`SoftirqStats`]: a power of two, so the eBPF side can mask the
/// vector number instead of relying on a bounds check the verifier may not see.
pub const SOFTIRQ_SLOTS: usize = 16;

/// Value of `SOFTIRQ_STATS` (per-CPU array, one entry); slots past
/// [`NR_SOFTIRQS`] stay zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SoftirqStats {
    pub vec: [NoiseStat; SOFTIRQ_SLOTS],
}

/// Per-CPU noise state (`NOISE` array indexed by CPU): entry times of the
/// handler in progress and running totals, so a waiting thread can see how
/// much IRQ/softirq time passed while it waited. Written only by its CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NoiseState {
    pub irq_start: u64,
    pub softirq_start: u64,
    pub irq_ns: u64,
    pub softirq_ns: u64,
    pub nmi_count: u64,
    pub nmi_ns: u64,
    /// A latency probe is waiting to run on this CPU (set at its wake-up,
    /// possibly by another CPU; cleared when it runs or sleeps): only then
    /// are IRQs and softirqs sent as events ([`guard::NOISE_EVENTS`]).
    pub probe_waiting: u64,
}

/// Values of [`TaskInfo::watch`]: why a thread's waits are measured.
pub mod watch {
    /// An owner vCPU: its wait times feed the "CPU ready" histogram.
    pub const VCPU: u32 = 1;
    /// A latency probe (cyclictest): every wait is also sent as an EPISODE event.
    pub const PROBE: u32 = 2;
}

/// A waiting latency probe (`WAITING`, key tid), from its wake-up (the
/// `wakeup` program, attached by `pinguard latency` only) or preemption.
/// vCPU waits need no such entry: the kernel's own `sched_info` timestamps
/// give them (see [`CpuStats::cur_queued`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Waiting {
    pub since_ns: u64,
    pub irq_ns: u64,
    pub softirq_ns: u64,
    pub nmi_count: u64,
    /// The waiting thread.
    pub tid: u32,
    pub _pad: u32,
    /// Its `se.sum_exec_runtime` when the wait began. A wait is only ended if
    /// the thread has not run since (same value at its switch-in): one left
    /// behind because it ran elsewhere never turns into a false, long wait later.
    pub runtime_ns: u64,
}

/// log2 buckets of wait times: bucket `i` counts waits in [2^i, 2^(i+1)) ns
/// (bucket 0 also holds 0 and 1 ns; the last one everything above).
pub const WAIT_BUCKETS: usize = 32;

/// Value of `WAIT_HIST` (key tid).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WaitHist {
    pub buckets: [u64; WAIT_BUCKETS],
    pub count: u64,
    pub total_ns: u64,
}

impl Default for WaitHist {
    fn default() -> Self {
        Self {
            buckets: [0; WAIT_BUCKETS],
            count: 0,
            total_ns: 0,
        }
    }
}

/// Key of the `THREADS` map: one entry per intruder thread per guarded CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ThreadKey {
    pub cpu: u32,
    pub tid: u32,
}

/// Value of the `THREADS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadStats {
    /// Total nanoseconds run on this CPU since first seen.
    pub run_ns: u64,
    /// Number of run slices.
    pub slices: u64,
    /// When the last event for this thread was sent (rate limit).
    pub last_event_ns: u64,
    /// Longest single slice.
    pub max_slice_ns: u64,
    /// The thread's `start_time`: an entry whose thread id was reused by a
    /// new thread (a different start) starts over instead of adding up two
    /// threads. 0 when unknown (the classic tracepoint hook).
    pub start_time: u64,
    pub tgid: u32,
    pub class: u32,
    pub comm: [u8; TASK_COMM_LEN],
}

/// Per-CPU state and class totals (one entry of the `CPU_STATS` per-CPU array).
/// Only the CPU itself writes its slot, so no atomics are needed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuStats {
    /// Time of the last context switch on this CPU (0 until the first one seen).
    pub last_switch_ns: u64,
    /// The task switched in at `last_switch_ns` (its `task_struct` address) and
    /// its `sum_exec_runtime` then; 0 when unknown (classic tracepoint hook).
    pub cur_task: u64,
    pub cur_runtime: u64,
    /// `sched_info.last_queued` of that task at its switch-in (rq clock; 0:
    /// unknown, or waits not tracked on this CPU then). At the task's
    /// switch-out, `sched_info.last_arrival` minus this is the wait that
    /// ended at its switch-in, both stamped by the scheduler with one clock.
    pub cur_queued: u64,
    pub run_ns: [u64; class::COUNT],
    pub slices: [u64; class::COUNT],
}

/// Value of the `TASKS` map (key: tid): everything the programs need to know
/// about a thread userspace told them about, so one hash lookup classifies it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// The guarded CPU this vCPU thread owns, or [`NO_CPU`].
    pub owner_cpu: u32,
    /// The CPU this user thread is allowed on, [`ANY_CPU`], or [`NO_CPU`].
    pub allowed_cpu: u32,
    /// 0, or a [`watch`] kind: its wake-up-to-run waits are measured.
    pub watch: u32,
    pub _pad: u32,
}

impl TaskInfo {
    pub const EMPTY: Self = Self {
        owner_cpu: NO_CPU,
        allowed_cpu: NO_CPU,
        watch: 0,
        _pad: 0,
    };

    pub const fn is_owner(&self) -> bool {
        self.owner_cpu != NO_CPU
    }

    pub const fn is_empty(&self) -> bool {
        self.owner_cpu == NO_CPU && self.allowed_cpu == NO_CPU && self.watch == 0
    }

    pub const fn allowed_on(&self, cpu: u32) -> bool {
        self.allowed_cpu == ANY_CPU || (self.allowed_cpu != NO_CPU && self.allowed_cpu == cpu)
    }
}

impl Default for TaskInfo {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Any CPU (in [`TaskInfo::allowed_cpu`]).
pub const ANY_CPU: u32 = u32::MAX;
/// No CPU: the field does not apply.
pub const NO_CPU: u32 = u32::MAX - 1;

/// Bits of [`GuardState::bits`].
pub mod guard {
    /// The CPU is guarded.
    pub const GUARDED: u32 = 1;
    /// Some watched thread is not the cached, watched owner of its CPU (a
    /// latency probe, a vCPU sharing its CPU): measure the waits of any
    /// watched thread here, which costs a `TASKS` lookup per switch. Without
    /// it only [`OWNER_WATCHED`] owners are measured, on their own CPU (a vCPU
    /// that drifted elsewhere is a violation, not a wait to measure).
    pub const TRACK_WAITS: u32 = 2;
    /// [`super::GuardState::owner_tid`] is watched as a vCPU: its waits are
    /// measured without a `TASKS` lookup.
    pub const OWNER_WATCHED: u32 = 4;
    /// Send every hard IRQ and softirq on this CPU as an event (a latency
    /// probe names the IRQs and vectors inside each of its waits).
    pub const NOISE_EVENTS: u32 = 8;
}

/// Value of the `GUARDED` array (index: CPU). Caching the CPU's single owner
/// here lets the hottest case on a guarded CPU, its vCPU switching in and out,
/// be classified without any hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardState {
    pub bits: u32,
    /// The only owner of this CPU, or 0 (none, several, or one watched as a
    /// latency probe, whose waits take the general path: look in `TASKS`).
    pub owner_tid: u32,
}

/// Stashed arguments of an in-flight sched_setaffinity call (key: caller tid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingAffinity {
    pub target_tid: u32,
    pub _pad: u32,
    /// First 64 bits of the requested mask.
    pub mask: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, contain only integers and arrays
    // of integers, and have explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::ThreadKey {}
    unsafe impl aya::Pod for super::ThreadStats {}
    unsafe impl aya::Pod for super::CpuStats {}
    unsafe impl aya::Pod for super::TaskInfo {}
    unsafe impl aya::Pod for super::GuardState {}
    unsafe impl aya::Pod for super::TaskOffsets {}
    unsafe impl aya::Pod for super::PendingAffinity {}
    unsafe impl aya::Pod for super::NoiseStat {}
    unsafe impl aya::Pod for super::IrqKey {}
    unsafe impl aya::Pod for super::SoftirqStats {}
    unsafe impl aya::Pod for super::NoiseState {}
    unsafe impl aya::Pod for super::Waiting {}
    unsafe impl aya::Pod for super::WaitHist {}
    unsafe impl aya::Pod for super::event::Header {}
    unsafe impl aya::Pod for super::event::Intrusion {}
    unsafe impl aya::Pod for super::event::Migration {}
    unsafe impl aya::Pod for super::event::AffinityChange {}
    unsafe impl aya::Pod for super::event::Process {}
    unsafe impl aya::Pod for super::event::Episode {}
    unsafe impl aya::Pod for super::event::Noise {}
}
