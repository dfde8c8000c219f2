//! The tools measured side by side: the whole pinguard daemon, its floor
//! (one empty program on the same hook), and what an operator would use
//! instead of pinguard to see who runs on a guarded CPU. How each is started,
//! stopped, what it costs and how its output is read.
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;
use testkit::{
    daemon::{Daemon, DaemonOptions},
    process::Process,
    threads::process_run_ns,
    wait,
};

use super::{GUARDED_CPU, observer::Attached};
use crate::util;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// After a tool reports it is ready, before it is measured.
const SETTLE: Duration = Duration::from_millis(500);
/// The floor: what running any program on this hook costs.
pub const FLOOR_PROGRAM: &str = "empty_tp_btf";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tool {
    /// `pinguard run --guard 1`, defaults (observe mode), watching the guest.
    Pinguard,
    /// The same with `bpf_stats = true`: what the statistics cost (the kernel
    /// times every BPF program run while they are on), and the run where the
    /// programs' ns/event are read.
    PinguardStats,
    /// `pinguard attach --program empty_tp_btf`: one empty tp_btf program on sched_switch.
    Floor,
    /// A bpftrace one-liner counting sched_switch per tid on the guarded CPU.
    Bpftrace,
    /// `perf sched record -a` to a file.
    PerfSched,
    /// `ps -eLo tid,psr,comm` every second.
    Ps,
}

/// The bpftrace one-liner: switches into each tid on the guarded CPU.
fn bpftrace_program() -> String {
    // BEGIN runs once every probe is attached: the readiness signal.
    format!(
        "BEGIN {{ printf(\"ready\\n\"); }} \
         tracepoint:sched:sched_switch /cpu == {GUARDED_CPU}/ {{ @[args->next_pid] = count(); }}"
    )
}

const PS_LOOP: &str = "while :; do ps -eLo tid,psr,comm --no-headers; sleep 1; done";

impl Tool {
    pub fn label(self) -> &'static str {
        match self {
            Tool::Pinguard => "pinguard run",
            Tool::PinguardStats => "pinguard run, bpf_stats = true",
            Tool::Floor => "floor: empty tp_btf program",
            Tool::Bpftrace => "bpftrace one-liner",
            Tool::PerfSched => "perf sched record -a",
            Tool::Ps => "ps loop at 1 Hz",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Tool::Pinguard => "pinguard",
            Tool::PinguardStats => "pinguard_bpf_stats_on",
            Tool::Floor => "floor_empty_tp_btf",
            Tool::Bpftrace => "bpftrace",
            Tool::PerfSched => "perf_sched_record",
            Tool::Ps => "ps_loop",
        }
    }

    /// The exact command, for the report.
    pub fn command(self) -> String {
        match self {
            Tool::Pinguard => format!(
                "pinguard run --guard {GUARDED_CPU} --listen 127.0.0.1:PORT --config EMPTY_FILE"
            ),
            Tool::PinguardStats => format!(
                "pinguard run --guard {GUARDED_CPU} --listen 127.0.0.1:PORT --config FILE \
                 (FILE: `bpf_stats = true`)"
            ),
            Tool::Floor => {
                format!("pinguard attach --guard {GUARDED_CPU} --program {FLOOR_PROGRAM}")
            }
            Tool::Bpftrace => format!("bpftrace -e '{}'", bpftrace_program()),
            Tool::PerfSched => "perf sched record -a -o target/bench/perf-sched.data".into(),
            Tool::Ps => format!("sh -c '{PS_LOOP} > target/bench/ps-loop.txt'"),
        }
    }

    /// Whether it reports run time per thread (not only who ran).
    pub fn reports_run_time(self) -> bool {
        matches!(self, Tool::Pinguard | Tool::PinguardStats | Tool::PerfSched)
    }
}

enum Handle {
    Daemon(Daemon),
    Floor(Attached),
    Process(Process),
}

/// A tool running; stopped (and its files deleted) on drop.
pub struct Running {
    pub tool: Tool,
    handle: Option<Handle>,
    started: Instant,
    file: Option<PathBuf>,
}

/// What a stopped tool left.
pub struct Stopped {
    pub lifetime: Duration,
    pub bytes: u64,
    pub output: Output,
}

pub enum Output {
    /// Its stderr (log) lines; detection is read live from `/intruders`.
    Daemon,
    Nothing,
    /// bpftrace's map: tid -> switches into it on the guarded CPU.
    Counts(HashMap<u32, u64>),
    /// perf: tid -> run time on the guarded CPU (ns).
    RunTimes(HashMap<u32, u64>),
    /// ps: tids seen with psr = the guarded CPU.
    Seen(HashSet<u32>),
}

impl Running {
    pub fn start(tool: Tool, bin: &Path, dir: &Path, guest: &str) -> Result<Self> {
        let started = Instant::now();
        let (handle, file) = match tool {
            Tool::Pinguard | Tool::PinguardStats => {
                let opts = DaemonOptions {
                    bin: bin.to_path_buf(),
                    guard: GUARDED_CPU,
                    // Pinguard: no bench-only setting, the defaults as shipped.
                    config: if tool == Tool::PinguardStats {
                        "bpf_stats = true\n".into()
                    } else {
                        String::new()
                    },
                    args: Vec::new(),
                    env: Vec::new(),
                    own_group: true,
                    wrapper: Vec::new(),
                };
                let mut d = Daemon::try_start(&opts).context("starting pinguard run")?;
                // Steady state: the guest found and its vCPU the owner of the guarded CPU.
                d.try_wait_metric(
                    "the bench guest's vCPU to be reported",
                    "pinguard_vcpu_info",
                    &[("vm", guest), ("cpu", &GUARDED_CPU.to_string())],
                    START_TIMEOUT,
                    |v| v >= 1.0,
                )?;
                (Handle::Daemon(d), None)
            }
            Tool::Floor => (
                Handle::Floor(Attached::start(bin, FLOOR_PROGRAM, &[])?),
                None,
            ),
            Tool::Bpftrace => {
                let mut cmd = Command::new("bpftrace");
                cmd.arg("-e").arg(bpftrace_program());
                let mut p = Process::try_spawn_group(&mut cmd)?;
                p.try_wait_stdout("\"ready\" (its BEGIN probe)", START_TIMEOUT, |l| {
                    l.trim() == "ready"
                })?;
                (Handle::Process(p), None)
            }
            Tool::PerfSched => {
                let file = dir.join("perf-sched.data");
                let _ = fs::remove_file(&file);
                let mut cmd = Command::new("perf");
                cmd.args(["sched", "record", "-a", "-o"]).arg(&file);
                let p = Process::try_spawn_group(&mut cmd)?;
                // perf writes its header once the events are enabled.
                wait::poll(
                    "perf sched record to create its file",
                    START_TIMEOUT,
                    Duration::from_millis(20),
                    || fs::metadata(&file).ok().filter(|m| m.len() > 0).map(drop),
                )?;
                (Handle::Process(p), Some(file))
            }
            Tool::Ps => {
                let file = dir.join("ps-loop.txt");
                let _ = fs::remove_file(&file);
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(format!(
                    "{PS_LOOP} > {}",
                    util::shell_quote(&file.to_string_lossy())
                ));
                let p = Process::try_spawn_group(&mut cmd)?;
                wait::poll(
                    "the ps loop's first sample",
                    START_TIMEOUT,
                    Duration::from_millis(20),
                    || fs::metadata(&file).ok().filter(|m| m.len() > 0).map(drop),
                )?;
                (Handle::Process(p), Some(file))
            }
        };
        let me = Self {
            tool,
            handle: Some(handle),
            started,
            file,
        };
        // Steady state: attached, first buffers allocated, first scan done.
        wait::sleep(SETTLE)?;
        Ok(me)
    }

    pub fn pid(&self) -> u32 {
        match &self.handle {
            Some(Handle::Daemon(d)) => d.pid(),
            Some(Handle::Floor(a)) => a.pid(),
            Some(Handle::Process(p)) => p.pid(),
            None => 0,
        }
    }

    pub fn daemon(&self) -> Option<&Daemon> {
        match &self.handle {
            Some(Handle::Daemon(d)) => Some(d),
            _ => None,
        }
    }

    /// CPU time of the tool's processes so far (ns): the larger of
    /// utime+stime+cutime+cstime (ticks; includes reaped children such as
    /// each `ps`) and the live threads' schedstat (exact, no children).
    pub fn cpu_ns(&self) -> u64 {
        let pid = self.pid();
        let ticks = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_cpu_ticks_with_children(&s))
            .unwrap_or(0);
        let by_ticks = ticks * 1_000_000_000 / clk_tck();
        by_ticks.max(process_run_ns(pid))
    }

    /// Stops the tool and deletes its output; reads it first when `read`
    /// (perf's file of a throughput run is hundreds of MB: not read).
    pub fn stop(mut self, read: bool) -> Result<Stopped> {
        let lifetime = self.started.elapsed();
        let tool = self.tool;
        let handle = self.handle.take().context("already stopped")?;
        let (bytes, output) = match handle {
            Handle::Daemon(mut d) => {
                let log = d.try_stop().context("stopping pinguard run")?;
                (text_bytes(&log), Output::Daemon)
            }
            Handle::Floor(a) => {
                a.stop()?;
                (0, Output::Nothing)
            }
            Handle::Process(p) => {
                // bpftrace prints its maps on SIGINT, perf finishes its file;
                // both (and sh) may end by the signal: the status is not judged.
                p.signal(Signal::SIGINT);
                if tool == Tool::Ps {
                    p.signal(Signal::SIGTERM);
                }
                // bpftrace sometimes misses a SIGINT that lands just before
                // it blocks in epoll_wait with no event to come (seen about
                // once in five stops here): repeat it until it has exited.
                // Not perf: a second SIGINT cuts short its finishing of the
                // file (build-ids, header), which then reads back empty.
                let (t0, mut last) = (Instant::now(), Instant::now());
                while tool == Tool::Bpftrace && !exited(p.pid()) && t0.elapsed() < STOP_TIMEOUT {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() >= Duration::from_secs(2) {
                        p.signal(Signal::SIGINT);
                        last = Instant::now();
                    }
                }
                let out = p
                    .try_finish(STOP_TIMEOUT)
                    .with_context(|| format!("stopping {} (SIGINT)", tool.label()))?;
                match tool {
                    Tool::Bpftrace => (
                        text_bytes(&out.stdout) + text_bytes(&out.stderr),
                        Output::Counts(parse_bpftrace_counts(&out.stdout)),
                    ),
                    Tool::PerfSched => {
                        let file = self.file.clone().context("perf's file")?;
                        let bytes = fs::metadata(&file).map_or(0, |m| m.len());
                        let times = if read {
                            perf_run_times(&file)?
                        } else {
                            HashMap::new()
                        };
                        (bytes, Output::RunTimes(times))
                    }
                    Tool::Ps => {
                        let file = self.file.clone().context("the ps loop's file")?;
                        let text = fs::read_to_string(&file)
                            .with_context(|| format!("reading {}", file.display()))?;
                        (
                            text.len() as u64,
                            Output::Seen(ps_tids_on(&text, GUARDED_CPU)),
                        )
                    }
                    Tool::Pinguard | Tool::PinguardStats | Tool::Floor => {
                        unreachable!("not a plain process")
                    }
                }
            }
        };
        Ok(Stopped {
            lifetime,
            bytes,
            output,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Handles stop their processes on drop (Daemon, Attached via Process).
        drop(self.handle.take());
        if let Some(f) = self.file.take() {
            let _ = fs::remove_file(f);
        }
    }
}

/// Exited and not yet reaped (a zombie), or gone.
fn exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } {
        n if n > 0 => n as u64,
        _ => 100,
    }
}

fn text_bytes(lines: &[String]) -> u64 {
    lines.iter().map(|l| l.len() as u64 + 1).sum()
}

/// utime + stime from /proc/PID/stat (fields 14-15).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    (11..13).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

/// utime + stime + cutime + cstime from /proc/PID/stat (fields 14-17).
pub fn parse_cpu_ticks_with_children(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    (11..15).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

/// bpftrace's printed map: `@[TID]: COUNT` lines.
pub fn parse_bpftrace_counts(lines: &[String]) -> HashMap<u32, u64> {
    lines
        .iter()
        .filter_map(|l| {
            let (key, count) = l.trim().strip_prefix("@[")?.split_once("]: ")?;
            Some((key.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect()
}

/// tids of `ps -eLo tid,psr,comm` lines whose psr is `cpu`.
pub fn ps_tids_on(text: &str, cpu: usize) -> HashSet<u32> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let tid: u32 = it.next()?.parse().ok()?;
            let psr: usize = it.next()?.parse().ok()?;
            (psr == cpu).then_some(tid)
        })
        .collect()
}

/// Run time per tid on the guarded CPU from a `perf sched record` file:
/// `perf script --ns -F cpu,time,event,trace` and [`switch_run_times`].
fn perf_run_times(file: &Path) -> Result<HashMap<u32, u64>> {
    let mut cmd = Command::new("perf");
    cmd.args(["script", "--ns", "-F", "cpu,time,event,trace", "-i"])
        .arg(file);
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`", util::show(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            util::show(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(switch_run_times(
        &String::from_utf8_lossy(&out.stdout),
        GUARDED_CPU,
    ))
}

/// Run time per tid on `cpu` from `perf script` lines: the sum of the
/// `sched:sched_stat_runtime` events recorded on that CPU
/// (`[001]  722.547763998: sched:sched_stat_runtime: comm=perf pid=25336 runtime=76154 [ns]`),
/// the scheduler's own accounting as it charges run time (what
/// `perf sched latency` sums too). Slices from `sched_switch` pairs cannot
/// be built here: on this kernel perf records no switch out of the idle task
/// (`prev_comm=swapper/N`), so an intruder that wakes an idle CPU has no
/// recorded start. A tid also counts as seen (run time 0 unless accounted)
/// when a `sched_switch` on that CPU names it.
pub fn switch_run_times(text: &str, cpu: usize) -> HashMap<u32, u64> {
    let mut times: HashMap<u32, u64> = HashMap::new();
    let want = format!("[{cpu:03}]");
    for line in text.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix(&want) else {
            continue;
        };
        let Some((_, event)) = rest.split_once(':') else {
            continue;
        };
        let event = event.trim_start();
        if let Some(trace) = event.strip_prefix("sched:sched_stat_runtime:") {
            let (Some(pid), Some(ns)) = (field(trace, " pid="), field64(trace, " runtime=")) else {
                continue;
            };
            *times.entry(pid).or_default() += ns;
        } else if let Some(trace) = event.strip_prefix("sched:sched_switch:")
            && let Some((prev, next)) = trace.split_once(" ==> ")
        {
            for tid in [field(prev, "prev_pid="), field(next, "next_pid=")]
                .into_iter()
                .flatten()
                .filter(|&t| t != 0)
            {
                times.entry(tid).or_default();
            }
        }
    }
    times
}

fn field64(s: &str, key: &str) -> Option<u64> {
    let at = s.rfind(key)? + key.len();
    s[at..].split_whitespace().next()?.parse().ok()
}

/// The number after the last ` key` (comms may contain spaces, not `=`-keys).
fn field(s: &str, key: &str) -> Option<u32> {
    let at = s.rfind(key)? + key.len();
    s[at..].split_whitespace().next()?.parse().ok()
}

/// How many intruders the daemon's `/intruders` lists at most
/// (pin-user/src/daemon/http.rs, `TOP_INTRUDERS`).
pub const TOP_INTRUDERS: usize = 100;

/// (cpu, tid) of the `intruder` violations in the daemon's `/violations`.
pub fn parse_violation_tids(body: &str) -> Result<HashSet<(u32, u32)>> {
    let v: Value = serde_json::from_str(body).context("/violations is not JSON")?;
    let list = v.as_array().context("/violations is not a JSON array")?;
    Ok(list
        .iter()
        .filter(|i| i["kind"] == "intruder")
        .filter_map(|i| Some((i["cpu"].as_u64()? as u32, i["tid"].as_u64()? as u32)))
        .collect())
}

/// `bpftool map dump name THREADS --json` without BTF: each entry's key and
/// value as hex byte strings. Key `ThreadKey { cpu: u32, tid: u32 }`, value
/// `ThreadStats` starting with `run_ns: u64` (pin-common, `#[repr(C)]`,
/// little-endian here): (cpu, tid) -> run_ns.
pub fn parse_threads_map(dump: &Value) -> HashMap<(u32, u32), u64> {
    let bytes = |v: &Value| -> Option<Vec<u8>> {
        v.as_array()?
            .iter()
            .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
            .collect()
    };
    let u32_at = |b: &[u8], i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
    dump.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let k = bytes(&e["key"])?;
            let v = bytes(&e["value"])?;
            let run = u64::from_le_bytes(v.get(0..8)?.try_into().ok()?);
            Some(((u32_at(&k, 0)?, u32_at(&k, 4)?), run))
        })
        .collect()
}

/// The daemon's `/intruders`: (cpu, tid) -> run_ns.
pub fn parse_intruders(body: &str) -> Result<HashMap<(u32, u32), u64>> {
    let v: Value = serde_json::from_str(body).context("/intruders is not JSON")?;
    let list = v.as_array().context("/intruders is not a JSON array")?;
    Ok(list
        .iter()
        .filter_map(|i| {
            Some((
                (i["cpu"].as_u64()? as u32, i["tid"].as_u64()? as u32),
                i["run_ns"].as_u64()?,
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftrace_map_lines() {
        let out: Vec<String> = [
            "Attaching 1 probe...",
            "",
            "",
            "@[25428]: 1",
            "@[25581]: 229",
            "@[x]: 2",
        ]
        .map(String::from)
        .to_vec();
        let m = parse_bpftrace_counts(&out);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&25581], 229);
    }

    #[test]
    fn ps_lines_on_the_guarded_cpu() {
        let text = "      1   0 systemd\n  4242   1 CPU 0/KVM\n  4243   1 intruder-20us\n 77 0 rustc\ngarbage\n";
        let s = ps_tids_on(text, 1);
        assert_eq!(s, [4242, 4243].into());
    }

    #[test]
    fn perf_runtime_per_cpu() {
        let text = "\
[001]   10.000000000:       sched:sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=intruder-20us next_pid=500 next_prio=120
[000]   10.000001000: sched:sched_stat_runtime: comm=a b pid=500 runtime=999 [ns]
[001]   10.000020500: sched:sched_stat_runtime: comm=intruder-20us pid=500 runtime=20500 [ns]
[001]   10.000020600:       sched:sched_switch: prev_comm=intruder-20us prev_pid=500 prev_prio=120 prev_state=S ==> next_comm=opt 9x pid=3 next_pid=600 next_prio=120
[001]   10.000030500: sched:sched_wakeup: comm=x pid=1 prio=120 target_cpu=001
[001]   10.000050500: sched:sched_stat_runtime: comm=intruder-20us pid=500 runtime=500 [ns]
";
        let t = switch_run_times(text, 1);
        assert_eq!(t[&500], 21_000, "CPU 0's accounting is not CPU 1's");
        assert_eq!(t[&600], 0, "seen in a switch, no run time accounted");
        assert!(!t.contains_key(&0) && !t.contains_key(&1));
    }

    #[test]
    fn stat_ticks_include_children() {
        let stat = "4242 (sh) S 1 4242 4242 0 -1 4194560 500 0 0 0 3 2 40 50 20 0 1 0 100";
        assert_eq!(parse_cpu_ticks_with_children(stat), Some(95));
        assert_eq!(parse_cpu_ticks(stat), Some(5));
    }

    #[test]
    fn threads_map_dump() {
        let dump: Value = serde_json::from_str(
            r#"[{"key":["0x01","0x00","0x00","0x00","0xd1","0x1e","0x00","0x00"],
                 "value":["0x90","0x60","0x83","0x00","0x00","0x00","0x00","0x00","0x03"]},
                {"key":["0x01"],"value":[]}]"#,
        )
        .unwrap();
        let m = parse_threads_map(&dump);
        assert_eq!(m.len(), 1);
        assert_eq!(m[&(1, 0x1ed1)], 0x836090);
        let v = r#"[{"kind":"intruder","cpu":1,"tid":5,"tgid":5,"comm":"x","detail":""},
                    {"kind":"migration_in","cpu":1,"tid":6,"tgid":6,"comm":"y","detail":""}]"#;
        assert_eq!(parse_violation_tids(v).unwrap(), [(1, 5)].into());
    }

    #[test]
    fn intruders_json() {
        let body = r#"[{"cpu":1,"tid":42,"tgid":40,"comm":"x","class":"user","run_ns":20500,"slices":1,"max_slice_ns":20500}]"#;
        let m = parse_intruders(body).unwrap();
        assert_eq!(m[&(1, 42)], 20500);
        assert!(parse_intruders("nope").is_err());
    }
}
