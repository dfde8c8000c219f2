//! The fuzz targets: one per parser of input pinguard does not control.
//!
//! Each target takes any bytes and must return without panicking, hanging or
//! recursing without bound; where a parser has a cheap invariant (a CPU list
//! round-trips, a config error names its file) the target checks it too.
//! The same entry points serve three runners:
//! - `cargo test` replays the committed inputs and mutates them with
//!   proptest (`robustness.rs`): the short run CI does. They are
//!   `pin-user/fuzz/seeds/TARGET/` (real inputs captured on a lab host, named
//!   for what they are) and `pin-user/fuzz/corpus/TARGET/` (what libFuzzer
//!   kept because it reached new code, minimized);
//! - `cargo xtask fuzz` runs libFuzzer on each target (`pin-user/fuzz/`,
//!   coverage-guided, nightly), which grows and minimizes the corpus: commit it;
//! - a crash libFuzzer finds is written to `pin-user/fuzz/artifacts/TARGET/`;
//!   it becomes a unit test next to its parser (and its input a seed).
use std::path::Path;

use crate::{
    bpf::{btf::Btf, events},
    config::Config,
    guests::{agent, parse_cpus_fast, parse_libvirt_status, qemu::parse_qemu_cmdline},
    host::{
        cmdline::KernelCmdline,
        cpulist::{CpuSeq, CpuSet},
        procfs,
    },
    latency::guest::{parse_verbose_output, realtime_offset, secaligned_base, wake_targets},
};

/// A parser of untrusted input, and where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `/etc/pinguard/pinguard.toml`: written by an operator, maybe truncated.
    Config,
    /// CPU lists and masks: config values, `--vm`, sysfs and /proc files.
    CpuList,
    /// `/proc/TID/stat`: its comm is whatever the thread named itself.
    ProcStat,
    /// `/proc/TID/status`: the same, and the lines pinguard reads from it.
    ProcStatus,
    /// A QMP reply of any QEMU-named process's monitor socket.
    QmpReply,
    /// `/run/libvirt/qemu/*.xml`.
    LibvirtStatus,
    /// `/proc/PID/cmdline` of a process that calls itself qemu-system-*.
    QemuCmdline,
    /// `/proc/cmdline`.
    KernelCmdline,
    /// A ring-buffer record from the eBPF side.
    Event,
    /// `/sys/kernel/btf/vmlinux`.
    Btf,
    /// A guest agent's reply (`latency --vm`): anything in the guest can
    /// answer on its port.
    AgentReply,
    /// What a program run in a guest printed: cyclictest's `-v` output, its
    /// `/proc/timer_list`.
    GuestOutput,
}

impl Target {
    pub const ALL: [Target; 12] = [
        Target::Config,
        Target::CpuList,
        Target::ProcStat,
        Target::ProcStatus,
        Target::QmpReply,
        Target::LibvirtStatus,
        Target::QemuCmdline,
        Target::KernelCmdline,
        Target::Event,
        Target::Btf,
        Target::AgentReply,
        Target::GuestOutput,
    ];

    /// Its name: the corpus directory and the libFuzzer target.
    pub fn name(self) -> &'static str {
        match self {
            Target::Config => "config",
            Target::CpuList => "cpu_list",
            Target::ProcStat => "proc_stat",
            Target::ProcStatus => "proc_status",
            Target::QmpReply => "qmp_reply",
            Target::LibvirtStatus => "libvirt_status",
            Target::QemuCmdline => "qemu_cmdline",
            Target::KernelCmdline => "kernel_cmdline",
            Target::Event => "event",
            Target::Btf => "btf",
            Target::AgentReply => "agent_reply",
            Target::GuestOutput => "guest_output",
        }
    }

    /// Feeds `data` to the parser. Panics only on a broken invariant: that
    /// is the finding.
    pub fn run(self, data: &[u8]) {
        // Text files are read with read_to_string, which refuses invalid
        // UTF-8 before any parser sees it; lossy conversion still lets the
        // fuzzer reach the parsers with every byte pattern it tries.
        let text = || String::from_utf8_lossy(data);
        match self {
            Target::Config => {
                let path = Path::new("fuzz.toml");
                if let Err(e) = Config::parse(&text(), path) {
                    assert!(
                        e.to_string().contains("fuzz.toml"),
                        "error without the file: {e}"
                    );
                }
            }
            Target::CpuList => {
                let s = text();
                if let Ok(set) = CpuSet::parse(&s) {
                    let again = CpuSet::parse(&set.to_string());
                    assert_eq!(again.as_ref().ok(), Some(&set), "{s:?} does not round-trip");
                }
                let _ = CpuSet::parse_mask(&s);
                let _ = CpuSeq::parse(&s);
            }
            Target::ProcStat => {
                let s = text();
                let _ = procfs::parse_stat(&s);
                let _ = procfs::Sched::parse_stat(&s);
            }
            Target::ProcStatus => {
                let _ = procfs::parse_status(&text());
            }
            Target::QmpReply => {
                // The session reads one JSON document per line; a reply's
                // "return" is what parse_cpus_fast gets.
                for line in data.split(|b| *b == b'\n') {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                        let _ = parse_cpus_fast(v.get("return").unwrap_or(&v));
                    }
                }
            }
            Target::LibvirtStatus => {
                let _ = parse_libvirt_status(&text(), "fuzz");
            }
            Target::QemuCmdline => {
                let argv: Vec<String> = data
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let _ = parse_qemu_cmdline(&argv);
            }
            Target::KernelCmdline => {
                let _ = KernelCmdline::parse(&text());
            }
            Target::Event => {
                let _ = events::decode(data);
            }
            Target::AgentReply => {
                for line in data.split(|b| *b == b'\n') {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                        let ret = v.get("return").unwrap_or(&v);
                        let _ = agent::parse_exec_status(ret);
                    }
                }
                let _ = agent::base64_decode(&text());
            }
            Target::GuestOutput => {
                let s = text();
                if let Ok((_, samples)) = parse_verbose_output(&s) {
                    // What latency --vm computes from them (a guest's numbers).
                    let base = secaligned_base(samples.first().map_or(0, |x| x.cycle));
                    let _ = wake_targets(base, 1_000_000, &samples);
                }
                let _ = realtime_offset(&s);
            }
            Target::Btf => {
                if let Ok(btf) = Btf::parse(data) {
                    // What the daemon asks of it.
                    let _ = btf.task_offsets();
                    let _ = btf.field_offset("task_struct", "pid");
                }
            }
        }
    }
}
