//! Command-line interface: clap derive types for every subcommand.
//! Values are validated at parse time where clap can; the rest is validated
//! against the host (online CPUs, running guests) before anything is changed.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum, builder::PossibleValue};

use crate::{
    bpf::probe::Hook,
    config::{Mode, Overrides},
    guests::DiscoverOptions,
    host::cpulist::{CpuSeq, CpuSet},
    placement::{
        plan::{EmulatorPolicy, PlanOptions, SmtPolicy},
        sched::VcpuSched,
    },
    units::parse_duration,
};

#[derive(Debug, Parser)]
#[command(name = "pinguard", version, about = "Keeps the dedicated CPUs of virtual machines dedicated", long_about = None)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace); RUST_LOG also works.
    #[arg(long, global = true, default_value = "info", env = "PINGUARD_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the eBPF observer and stream what runs on the guarded CPUs.
    Watch(WatchArgs),
    /// Discover QEMU/KVM guests and pin each vCPU to its own guarded CPU.
    Pin(PinArgs),
    /// Report what runs on the guarded CPUs (snapshot, or observed over a window).
    /// Exit code 0 clean, 1 violations found, 2 could not audit.
    Audit(AuditArgs),
    /// Check whether the host is configured for CPU isolation. Exit 1 on any failure.
    Check(CheckArgs),
    /// Isolate the guarded CPUs now, without a reboot: IRQs, workqueues, sysctls and
    /// cpusets (or thread affinities), each read back and recorded; --undo restores them.
    Isolate(IsolateArgs),
    /// Run the isolation daemon: classify, enforce and export Prometheus metrics.
    Run(RunArgs),
    /// Measure latency on a guarded CPU with cyclictest and explain each spike
    /// (IRQs, softirqs, NMIs, threads that ran instead). --compare tabulates saved runs.
    Latency(LatencyArgs),
    /// The whole latency experiment: cyclictest on a guarded CPU of the host and
    /// inside the lab guest on its general-purpose and PREEMPT_RT kernels, each
    /// with a normal and a real-time thread; reports, table and plots into --out.
    Lab(LabArgs),
    /// A live view of the guarded CPUs (like top): owners, time split, IRQ noise,
    /// intruders; from the kernel's maps, or a running daemon with --url.
    Top(TopArgs),
    /// Detach and remove everything pinguard left in the kernel: the eBPF programs, links and
    /// maps pinned under /sys/fs/bpf/pinguard (by a killed daemon, or with
    /// keep_sensors_on_exit). Refused while `pinguard run` runs. Exit 0 done, 2 failed.
    Cleanup(CleanupArgs),
    /// Attach only the named eBPF program until SIGTERM/SIGINT (used by `cargo xtask bench`).
    #[command(hide = true)]
    Attach(AttachArgs),
    /// Print the shell completion script for SHELL to stdout
    /// (e.g. `pinguard completions bash > /etc/bash_completion.d/pinguard`).
    Completions(CompletionsArgs),
    /// Write the man pages into DIR (used by `cargo xtask package`).
    #[command(hide = true)]
    Manpages(ManpagesArgs),
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Print what was removed as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManpagesArgs {
    /// Directory to write pinguard.1, pinguard-run.1, ... into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    /// Program to attach (repeatable): switch_tp_btf, switch_raw_tp, switch_tracepoint,
    /// migrate_tp_btf, setaffinity_enter, setaffinity_exit, empty_tp_btf, empty_raw_tp, empty_tracepoint.
    #[arg(long = "program", required = true)]
    pub programs: Vec<String>,
    /// A thread that owns a guarded CPU, as CPU=TID (repeatable), declared
    /// before "attached" is printed (the benchmark's owner scenario).
    #[arg(long = "owner", value_name = "CPU=TID", value_parser = parse_owner)]
    pub owners: Vec<(u32, u32)>,
    /// Also measure the owners' wake-up-to-run waits, as `pinguard run` does
    /// for vCPUs (turns on the wait tracking of the sched_switch program,
    /// which reads them from the kernel's sched_info: no `wakeup` needed).
    #[arg(long)]
    pub watch_owners: bool,
}

/// How the guarded CPUs are chosen, shared by every subcommand.
#[derive(Debug, Args, Clone, Default)]
pub struct GuardArgs {
    /// CPUs to guard, in kernel list format ("2,3" or "2-5"). Default: the
    /// isolated CPUs (/sys/devices/system/cpu/isolated).
    #[arg(long, value_name = "CPULIST", value_parser = parse_cpulist)]
    pub guard: Option<CpuSet>,
}

/// How guests are found, shared by pin/audit/run.
#[derive(Debug, Args, Clone, Default)]
pub struct DiscoverArgs {
    /// QMP monitor socket of a guest (repeatable). Sockets on QEMU command lines are found anyway.
    #[arg(long = "qmp", value_name = "PATH")]
    pub qmp: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// A thread that owns a guarded CPU (its vCPU), as CPU=TID (repeatable).
    #[arg(long = "owner", value_name = "CPU=TID", value_parser = parse_owner)]
    pub owners: Vec<(u32, u32)>,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// One JSON object per line instead of human-readable lines.
    #[arg(long)]
    pub json: bool,
    /// Minimum time between two events for one intruder on one CPU (e.g. 1s, 100ms, 0).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub event_interval: Duration,
    /// Which kind of hook carries the sched_switch program.
    #[arg(long, value_enum, default_value_t = Hook::TpBtf)]
    pub hook: Hook,
    /// How many intruders to list per CPU in the summary.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Without --url: the CPUs to watch (as `watch`). With --url: show only these
    /// of the daemon's guarded CPUs.
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Read a running daemon's endpoints (/metrics, /intruders, /violations) instead
    /// of loading the eBPF probe, e.g. http://127.0.0.1:9477.
    #[arg(long, value_name = "URL", value_parser = crate::top::source::parse_url)]
    pub url: Option<String>,
}

/// The one placement policy every command shares.
#[derive(Debug, Args, Clone, Default)]
pub struct PolicyArgs {
    /// TOML configuration file with the placement policy (emulator, vm, smt,
    /// allow_shared, guard), the same file `pinguard run` reads; flags
    /// override it. Default: /etc/pinguard/pinguard.toml if it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl From<&PolicyArgs> for Overrides {
    fn from(args: &PolicyArgs) -> Self {
        Self {
            path: args.config.clone(),
            ..Self::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct PinArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub discover: DiscoverArgs,
    /// Explicit placement for a guest: NAME=CPULIST, one CPU per vCPU in order (repeatable;
    /// a CPU listed twice is shared by two vCPUs, with --allow-shared).
    #[arg(long = "vm", value_name = "NAME=CPULIST", value_parser = parse_vm_map)]
    pub vm: Vec<(String, CpuSeq)>,
    /// Where emulator (non-vCPU) threads go: "housekeeping" (default), "with-vcpu0", or a CPU list.
    #[arg(long, value_name = "POLICY", value_parser = parse_emulator)]
    pub emulator: Option<EmulatorPolicy>,
    /// SMT siblings for one guest's vCPUs (default: prefer-siblings).
    #[arg(long, value_enum)]
    pub smt: Option<SmtPolicy>,
    /// Allow several vCPUs on one CPU when there are not enough guarded CPUs.
    #[arg(long)]
    pub allow_shared: bool,
    /// Print the plan without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Scheduling policy of the vCPU threads: other, fifo:PRIORITY or
    /// rr:PRIORITY (1-99), as libvirt's <vcpusched> sets it; e.g. fifo:1.
    #[arg(long, value_name = "POLICY", value_parser = parse_vcpu_sched)]
    pub vcpu_sched: Option<VcpuSched>,
    /// Also write the placement of libvirt domains into their persistent
    /// definition (`<cputune>`), so it survives a restart of the domain.
    #[arg(long)]
    pub persist: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub discover: DiscoverArgs,
    /// Observe with the eBPF observer for this long (e.g. 5s, 500ms) instead of a snapshot.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub window: Option<Duration>,
    /// Print the report as one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct IsolateArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    /// Print each change (before -> after) and change nothing.
    #[arg(long, conflicts_with = "undo")]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    /// Restore everything the last `pinguard isolate` changed (from /run/pinguard/isolation.json).
    #[arg(long, conflicts_with_all = ["guard", "mechanism"])]
    pub undo: bool,
    /// How to keep tasks off the guarded CPUs (default: the best available:
    /// partition on cgroup v2 with cpuset, shield on cgroup v1, else affinity).
    #[arg(long, value_enum)]
    pub mechanism: Option<IsolateMechanism>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolateMechanism {
    /// A cgroup v2 cpuset partition `isolated`.
    Partition,
    /// cgroup v1 cpusets: every movable task in a housekeeping cpuset.
    Shield,
    /// Thread affinities (every thread that allows it).
    Affinity,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub discover: DiscoverArgs,
    /// observe (default) or enforce.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Address for /metrics and /healthz (default 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Guarded CPU to measure (default: the first guarded CPU).
    #[arg(long, value_name = "N")]
    pub cpu: Option<u32>,
    /// Length of the run (whole seconds, or a multiple of --interval).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// cyclictest's wake-up interval (-i), in whole microseconds.
    #[arg(long, value_name = "DURATION", default_value = "1000us", value_parser = parse_duration)]
    pub interval: Duration,
    /// Scheduling policy of the measurement thread: fifo or rr (real-time),
    /// other (a general-purpose thread). Checked against the running thread.
    #[arg(long = "policy", value_name = "POLICY", value_enum, default_value_t = LatencyPolicy::Fifo)]
    pub sched_policy: LatencyPolicy,
    /// Priority of the measurement thread (-p): 1-99 with fifo/rr (default
    /// 95), 0 with other (its default).
    #[arg(long, value_name = "PRIO", value_parser = clap::value_parser!(u32).range(0..=99))]
    pub priority: Option<u32>,
    /// Range of cyclictest's histogram (-h); slower samples are counted as overflows.
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = parse_duration)]
    pub histogram_max: Duration,
    /// How many of the longest wake-ups to explain.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub worst: usize,
    /// Print the report as one JSON document (keep it for --compare).
    #[arg(long)]
    pub json: bool,
    /// Write the histogram and the noise timeline as SVG files into DIR
    /// (with --compare: the runs' histograms overlaid).
    #[arg(long, value_name = "DIR")]
    pub svg: Option<PathBuf>,
    /// Write the histogram and the noise timeline as PNG files into DIR
    /// (with --compare: the runs' histograms overlaid).
    #[arg(long, value_name = "DIR")]
    pub png: Option<PathBuf>,
    /// Measure inside this guest (its libvirt domain name or QEMU -name)
    /// instead of on the host: cyclictest runs in the guest, pinned to a vCPU
    /// whose thread is on a guarded CPU (--cpu), through the guest agent, and
    /// each of the guest's worst wake-ups is matched with what ran on that host
    /// CPU at the same time. The guest needs qemu-guest-agent and cyclictest
    /// (rt-tests) and the agent's port: for plain QEMU `-device virtio-serial
    /// -chardev socket,path=/run/NAME-qga.sock,server=on,wait=off,id=qga0
    /// -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`, for
    /// libvirt `<channel type='unix'><target type='virtio'
    /// name='org.qemu.guest_agent.0'/></channel>` in <devices>. A vCPU thread
    /// not pinned to one guarded CPU is pinned to --cpu for the run and put back
    /// after. Guest and host clocks are aligned through the agent (guest-get-time
    /// and /proc/timer_list, bracketed by host clock reads; the report gives the
    /// error bound).
    #[arg(long, value_name = "NAME", conflicts_with = "compare")]
    pub vm: Option<String>,
    /// With --vm: the vCPU (QEMU cpu-index, the guest's CPU number) to measure
    /// on (default: the one whose thread is pinned to --cpu, else vCPU 0).
    #[arg(long, value_name = "N", requires = "vm")]
    pub vcpu: Option<u32>,
    /// Lay saved runs out side by side instead of measuring, as a table
    /// (with --svg/--png, also their histograms overlaid in one picture).
    /// A RUN is a `--json` report, or plain cyclictest output (-h histogram
    /// or -v samples), recognised by its content.
    #[arg(long, value_name = "RUN", num_args = 1.., conflicts_with_all = ["cpu", "extra"])]
    pub compare: Vec<PathBuf>,
    /// Column labels for --compare, one per RUN in order (default: where it
    /// ran, kernel, preemption model and policy, e.g. "host 6.18 PREEMPT_DYNAMIC fifo95").
    #[arg(
        long,
        value_name = "A,B,...",
        value_delimiter = ',',
        requires = "compare"
    )]
    pub label: Vec<String>,
    /// Thresholds of --compare's "samples above" rows (default 50us,100us,1ms).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_duration, requires = "compare")]
    pub above: Vec<Duration>,
    /// Further cyclictest arguments, after `--` (e.g. -- --latency=0).
    #[arg(last = true, value_name = "CYCLICTEST ARGS")]
    pub extra: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LabArgs {
    /// CPUs to guard; the first is measured (default: the isolated CPUs).
    #[arg(long, value_name = "CPULIST", value_parser = parse_cpulist)]
    pub guard: CpuSet,
    /// Directory for every run's report (NAME.json), the table (table.txt,
    /// table.json) and the overlaid histograms (latency-compare.svg/.png).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Length of each run.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// cyclictest's wake-up interval, in whole microseconds.
    #[arg(long, value_name = "DURATION", default_value = "1000us", value_parser = parse_duration)]
    pub interval: Duration,
    /// Priority of the real-time (SCHED_FIFO) runs.
    #[arg(long, value_name = "PRIO", default_value_t = 95, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub priority: u32,
    /// The lab guest's kernels and initramfs (DIR/gp and DIR/rt, from `cargo xtask lab-guest`).
    #[arg(long, value_name = "DIR", default_value = "target/lab-guest")]
    pub kernels: PathBuf,
    /// Measure the host only (no guest).
    #[arg(long)]
    pub host_only: bool,
    /// How the guests run: kvm, tcg (emulation), or auto (KVM, and TCG
    /// where KVM cannot boot the lab guest's kernel).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Passed to every `pinguard latency` run.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `pinguard lab --accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

impl LabArgs {
    /// The measured CPU: the first guarded one.
    pub fn cpu(&self) -> u32 {
        self.guard.first().unwrap_or(0)
    }
}

/// `pinguard latency --policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LatencyPolicy {
    /// SCHED_OTHER: a general-purpose thread (priority 0).
    Other,
    /// SCHED_FIFO: real-time, runs until it blocks.
    Fifo,
    /// SCHED_RR: real-time, round robin among equal priorities.
    Rr,
}

impl From<LatencyPolicy> for crate::latency::SchedPolicy {
    fn from(p: LatencyPolicy) -> Self {
        match p {
            LatencyPolicy::Other => Self::Other,
            LatencyPolicy::Fifo => Self::Fifo,
            LatencyPolicy::Rr => Self::Rr,
        }
    }
}

pub fn parse_cpulist(s: &str) -> Result<CpuSet, String> {
    let set = CpuSet::parse(s).map_err(|e| e.to_string())?;
    if set.is_empty() {
        return Err("the CPU list is empty".into());
    }
    Ok(set)
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (cpu, tid) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid owner {s:?}: expected CPU=TID, e.g. 1=4242"))?;
    let cpu = cpu
        .trim()
        .parse()
        .map_err(|_| format!("invalid CPU {cpu:?} in owner {s:?}"))?;
    let tid = tid
        .trim()
        .parse()
        .map_err(|_| format!("invalid thread id {tid:?} in owner {s:?}"))?;
    Ok((cpu, tid))
}

fn parse_vm_map(s: &str) -> Result<(String, CpuSeq), String> {
    let (name, cpus) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid --vm {s:?}: expected NAME=CPULIST, e.g. web1=2,3"))?;
    if name.trim().is_empty() {
        return Err(format!("invalid --vm {s:?}: the guest name is empty"));
    }
    let cpus = CpuSeq::parse(cpus).map_err(|e| format!("invalid --vm {s:?}: {e}"))?;
    if cpus.is_empty() {
        return Err(format!("invalid --vm {s:?}: the CPU list is empty"));
    }
    Ok((name.trim().to_string(), cpus))
}

fn parse_vcpu_sched(s: &str) -> Result<VcpuSched, String> {
    s.parse()
        .map_err(|e| format!("invalid --vcpu-sched {s:?}: {e}"))
}

fn parse_emulator(s: &str) -> Result<EmulatorPolicy, String> {
    s.parse()
        .map_err(|e| format!("invalid --emulator {s:?}: {e}"))
}

// The domain enums carry no clap derives; their names and help for the
// command line are given here, at the edge.
macro_rules! value_enum {
    ($ty:ty { $($variant:ident => $name:literal: $help:literal),+ $(,)? }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(<$ty>::$variant),+]
            }

            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(match self {
                    $(<$ty>::$variant => PossibleValue::new($name).help($help)),+
                })
            }
        }
    };
}

value_enum!(Hook {
    TpBtf => "tp-btf": "BTF-enabled raw tracepoint (tp_btf): cheapest, needs kernel BTF",
    RawTp => "raw-tp": "Raw tracepoint",
    Tracepoint => "tracepoint": "Classic perf-event tracepoint",
});

value_enum!(SmtPolicy {
    PreferSiblings => "prefer-siblings": "Place one guest's vCPUs on SMT siblings of the same core",
    KeepSiblingsFree => "keep-siblings-free": "Use one thread per core and keep its sibling free (no SMT noise between vCPUs)",
});

value_enum!(Mode {
    Observe => "observe": "Watch and report only; never change an affinity",
    Enforce => "enforce": "Re-pin drifted vCPUs and evict intruders",
});

impl PinArgs {
    /// The configured policy with these flags on top.
    pub fn plan_options(&self, configured: PlanOptions) -> PlanOptions {
        let mut o = configured;
        if !self.vm.is_empty() {
            o.vm = self.vm.clone();
        }
        if let Some(e) = &self.emulator {
            o.emulator = e.clone();
        }
        if let Some(s) = self.smt {
            o.smt = s;
        }
        o.allow_shared |= self.allow_shared;
        o
    }
}

impl From<&DiscoverArgs> for DiscoverOptions {
    fn from(args: &DiscoverArgs) -> Self {
        Self {
            qmp: args.qmp.clone(),
            ..Self::default()
        }
    }
}

impl From<&RunArgs> for Overrides {
    fn from(args: &RunArgs) -> Self {
        Self {
            path: args.config.clone(),
            guard: args.guard.guard.clone(),
            mode: args.mode,
            listen: args.listen,
            qmp: args.discover.qmp.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_maps() {
        assert_eq!(parse_owner("1=4242").unwrap(), (1, 4242));
        assert!(parse_owner("1:4242").unwrap_err().contains("CPU=TID"));
        let (n, c) = parse_vm_map("web=2,3").unwrap();
        assert_eq!((n.as_str(), c.to_string().as_str()), ("web", "2,3"));
        // Repeats are kept: two vCPUs sharing CPU 1.
        let (_, c) = parse_vm_map("g1=1,1").unwrap();
        assert_eq!(c.to_string(), "1,1");
        assert!(parse_vm_map("=2").is_err());
        assert!(parse_vm_map("web=").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
