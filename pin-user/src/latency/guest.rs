//! Measuring inside a guest (`pinguard latency --vm NAME`): what the report
//! records about the guest, cyclictest's per-sample output, the alignment of
//! the guest's clock with the host's, and the matching of the guest's worst
//! wake-ups with what ran on the host CPU of its vCPU at the same time.
//!
//! All of it is pure (text and numbers in, records out); the command's edge
//! (`cmd/latency.rs`) talks to the guest agent and the probe.
use super::{
    attribution::{NoiseOverlap, Overlap},
    host::Preemption,
};

/// Where a run measured, when it was inside a guest. Reports without it
/// (all those from before guests could be measured) measured the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestRun {
    /// The guest's name (libvirt domain, else QEMU's `-name`).
    pub vm: String,
    /// The QEMU process.
    pub pid: u32,
    /// How the guest's CPUs are run: `kvm`, or `tcg` (emulated: its vCPU
    /// thread is `CPU n/TCG` and latencies include the emulator's).
    pub accelerator: String,
    /// The vCPU (QEMU's cpu-index, the guest's CPU number cyclictest is
    /// pinned to with `-a`) and its host thread.
    pub vcpu: u32,
    pub vcpu_tid: u32,
    /// Whether pinguard pinned the vCPU thread to the measured host CPU for
    /// the run (it was not confined to it) and put its affinity back after.
    pub pinned_for_run: bool,
    /// `uname -r`, `uname -v` and the preemption model inside the guest.
    pub kernel_release: String,
    pub kernel_version: String,
    pub preemption: Preemption,
    /// How the guest agent was reached (a socket path, or libvirt).
    pub agent: String,
    pub clock: ClockAlignment,
    /// The guest's worst wake-ups, worst first, each with what the host did
    /// on the vCPU's CPU at that time.
    pub worst: Vec<GuestWakeup>,
    /// Per-sample values cyclictest printed (`-v`) that pinguard could read;
    /// fewer than the samples when cyclictest's ring of values overflowed.
    pub samples_seen: u64,
}

/// How the guest's CLOCK_MONOTONIC maps onto the host's:
/// `host = guest + offset_ns`, give or take `error_ns`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ClockAlignment {
    pub offset_ns: i64,
    /// Bound on the error of `offset_ns`: half the round trip of the best
    /// exchange (the guest read its clock somewhere inside it).
    pub error_ns: u64,
    /// Exchanges used, and their round trips (shortest, longest).
    pub exchanges: u32,
    pub rtt_min_ns: u64,
    pub rtt_max_ns: u64,
    /// One line on how it was done.
    pub method: String,
}

/// What the host did around one of the guest's late wake-ups.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostCause {
    /// Another thread ran on the vCPU's CPU while the vCPU wanted it.
    Preempted {
        tid: u32,
        comm: String,
        /// pinguard's class name (`intruder_user`, `kernel`, ...), if known.
        class: Option<String>,
        ns: u64,
    },
    /// Hard IRQ handlers on the host CPU.
    Irq { ns: u64 },
    /// Softirqs on the host CPU.
    Softirq { ns: u64 },
    /// The vCPU thread was runnable but not running this long, with nothing
    /// the probe could name on its CPU ("CPU ready").
    CpuReady { ns: u64 },
    /// The vCPU thread ran (or slept) undisturbed: the delay was made inside
    /// the guest (its kernel, its other tasks, or emulation under TCG).
    InsideGuest,
}

impl HostCause {
    /// One phrase for people.
    pub fn who(&self) -> String {
        match self {
            Self::Preempted {
                tid, comm, class, ..
            } => match class {
                Some(c) => format!("host thread {comm} (tid {tid}, {c})"),
                None => format!("host thread {comm} (tid {tid})"),
            },
            Self::Irq { .. } => "host hard IRQs".into(),
            Self::Softirq { .. } => "host softirqs".into(),
            Self::CpuReady { .. } => "vCPU waiting to run (CPU ready)".into(),
            Self::InsideGuest => "nothing on the host: inside the guest".into(),
        }
    }
}

/// One late wake-up of the guest's cyclictest and its host-side causes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestWakeup {
    /// cyclictest's loop number and latency (µs, as it printed them).
    pub cycle: u64,
    pub latency_us: u64,
    /// The wake-up's target on the guest's CLOCK_MONOTONIC.
    pub guest_target_ns: u64,
    /// The host's CLOCK_MONOTONIC window looked at: the target to the
    /// actual wake-up, widened by the alignment's error on both sides.
    pub host_from_ns: u64,
    pub host_to_ns: u64,
    /// The window's start from the start of the run (host clock).
    pub offset_ns: u64,
    /// The vCPU thread's waits (runnable, not running) inside the window.
    pub vcpu_wait_ns: u64,
    /// Host threads that ran on the CPU inside the window, longest first.
    pub threads: Vec<Overlap>,
    pub irq_ns: u64,
    pub softirq_ns: u64,
    pub irqs: Vec<NoiseOverlap>,
    pub softirqs: Vec<NoiseOverlap>,
    pub cause: HostCause,
    /// One line for people.
    pub explanation: String,
}
