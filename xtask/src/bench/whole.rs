//! The whole daemon against its floor and its peers, in one run.
//!
//! Suites `daemon-overhead` and `peers`. A guest is present throughout: the
//! bench's one-vCPU KVM guest ([`VcpuGuest`]), its vCPU thread bound to
//! guarded CPU 1. Two loads, both driven from housekeeping CPU 0:
//! - housekeeping: `taskset -c 0 perf bench sched pipe -l N` (two processes
//!   ping-ponging on CPU 0: most of a host's context switches are there);
//! - guarded: N wake-ups of the guest's vCPU from CPU 0, each followed by a
//!   guest entry and a halt (the vCPU halt/wake pattern: CPU 1 alternates the
//!   vCPU and idle).
//!
//! Each tool (pinguard with its defaults, the floor, bpftrace, perf sched,
//! the ps loop) is measured in interleaved pairs without/with it (A B B A
//! ..., see [`noise`]), so the machine's drift hits both sides. Then, for the
//! peers suite, all of them watch the same intruders ([`Intruders`]) and each
//! is scored on which it found and on the run time it reported.
use std::{
    collections::HashMap,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{
    BenchArgs, GUARDED_CPU, OTHER_CPU, W, daemon,
    intruders::{BURSTS_US, Intruders, Intrusion},
    noise::{self, Comparison},
    observer::run_perf_pipe,
    peers::{self, Output, Running, Tool},
    prog_stats, spread,
    vcpu_guest::VcpuGuest,
};
use crate::util;

/// Targets of issue 13.
pub const TARGET_HOUSEKEEPING_LOSS_PCT: f64 = 5.0;
pub const TARGET_GUARDED_LOSS_PCT: f64 = 7.0;
pub const TARGET_NS_PER_EVENT: f64 = 100.0;
pub const TARGET_FOUND_PCT: f64 = 100.0;
pub const TARGET_ERROR_PCT: f64 = 1.0;
const GUEST_NAME: &str = "pinguard-bench";
/// The daemon's sched_switch program.
const SWITCH_PROGRAM: &str = "switch_tp_btf";
const SCHED_DEBUG: &str = "/sys/kernel/debug/sched/debug";

pub struct Plan {
    pairs: usize,
    run_len: Duration,
    tools: Vec<Tool>,
    /// Intrusions per burst length, and the gap between intrusions.
    detection: Option<(usize, Duration)>,
}

impl Plan {
    pub fn from_args(args: &BenchArgs, overhead: bool, peers: bool) -> Result<Self> {
        let pairs = args.pairs.unwrap_or(if args.quick { 3 } else { 7 });
        if pairs == 0 {
            bail!("--pairs must be at least 1");
        }
        let mut tools = vec![Tool::Pinguard];
        if overhead {
            tools.extend([Tool::PinguardStats, Tool::Floor]);
        }
        let mut needed = vec!["perf"];
        if peers {
            tools.extend([Tool::Bpftrace, Tool::PerfSched, Tool::Ps]);
            needed.extend(["bpftrace", "ps"]);
        }
        for tool in needed {
            if testkit::which(tool).is_err() {
                bail!(
                    "the daemon-overhead and peers suites need {tool} (cargo xtask setup installs it)"
                );
            }
        }
        if !Path::new("/dev/kvm").exists() {
            bail!(
                "the daemon-overhead and peers suites start a KVM guest but /dev/kvm does not exist"
            );
        }
        if !cfg!(target_arch = "x86_64") {
            bail!("the bench's KVM guest is x86 real-mode code: x86_64 only");
        }
        Ok(Self {
            pairs,
            run_len: Duration::from_millis(if args.quick { 300 } else { 700 }),
            tools,
            detection: peers.then_some(if args.quick {
                (4, Duration::from_millis(60))
            } else {
                (10, Duration::from_millis(120))
            }),
        })
    }
}

/// One load's throughput, per second.
#[derive(Clone, Copy)]
struct Sample {
    housekeeping: f64,
    guarded: f64,
}

/// Cost of the daemon's programs over the with-runs of one load (bpf_stats:
/// the daemon turns BPF statistics on itself with `bpf_stats = true`).
#[derive(Default, Clone)]
struct ProgCost {
    /// name -> (run_time_ns, run_cnt)
    programs: HashMap<String, (u64, u64)>,
    /// Context switches per CPU over the same windows (sched debug's nr_switches).
    switches: Option<[u64; 2]>,
    window: Duration,
}

struct ToolResult {
    tool: Tool,
    /// (without, with) throughputs per pair.
    pairs: Vec<(Sample, Sample)>,
    /// The tool's own CPU time during its with-runs, and their wall time.
    cpu_ns: u64,
    cpu_window: Duration,
    /// Bytes it wrote (files, stdout, its log) over its lifetime.
    bytes: u64,
    lifetime: Duration,
    /// pinguard only: program costs during the housekeeping and guarded loads.
    costs: Option<[ProgCost; 2]>,
}

impl ToolResult {
    fn comparison(&self, guarded: bool) -> Option<Comparison> {
        let pick = |s: &Sample| if guarded { s.guarded } else { s.housekeeping };
        let pairs: Vec<(f64, f64)> = self.pairs.iter().map(|(a, b)| (pick(a), pick(b))).collect();
        Comparison::from_pairs(&pairs)
    }
    fn cpu_pct(&self) -> f64 {
        self.cpu_ns as f64 / self.cpu_window.as_nanos().max(1) as f64 * 100.0
    }
    fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.lifetime.as_secs_f64().max(1e-9)
    }
}

/// Who reported: a peer, or one of pinguard's three views.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reporter {
    /// `/intruders`: the top intruders by run time (it listed `listed`).
    Intruders {
        listed: usize,
    },
    /// `/violations`: the recent violations (an intruder's first event).
    Violations,
    /// The kernel's THREADS map `/intruders` is read from, every entry
    /// (`bpftool map dump name THREADS`).
    ThreadsMap,
    Tool(Tool),
}

impl Reporter {
    fn label(self) -> String {
        match self {
            Reporter::Intruders { listed } => {
                format!(
                    "pinguard `/intruders` (top {}; listed {listed})",
                    peers::TOP_INTRUDERS
                )
            }
            Reporter::Violations => "pinguard `/violations` (who, not how long)".into(),
            Reporter::ThreadsMap => "pinguard's THREADS map, all entries (bpftool)".into(),
            Reporter::Tool(t) => t.label().into(),
        }
    }
    fn key(self) -> &'static str {
        match self {
            Reporter::Intruders { .. } => "pinguard_intruders_endpoint",
            Reporter::Violations => "pinguard_violations_endpoint",
            Reporter::ThreadsMap => "pinguard_threads_map",
            Reporter::Tool(t) => t.key(),
        }
    }
    fn reports_run_time(self) -> bool {
        match self {
            Reporter::Intruders { .. } | Reporter::ThreadsMap => true,
            Reporter::Violations => false,
            Reporter::Tool(t) => t.reports_run_time(),
        }
    }
}

/// What one tool reported about one intrusion.
#[derive(Clone, Copy)]
struct Found {
    found: bool,
    run_ns: Option<u64>,
}

struct DetectionResult {
    intrusions: Vec<Intrusion>,
    /// Per reporter, per intrusion (same order).
    tools: Vec<(Reporter, Vec<Found>)>,
    window: Duration,
}

pub struct WholeReport {
    pairs: usize,
    run_len: Duration,
    loads: [String; 2],
    vcpu_tid: u32,
    tools: Vec<ToolResult>,
    detection: Option<DetectionResult>,
    steal: Vec<(String, f64)>,
    busiest: Vec<(String, f64)>,
    strangers: Vec<String>,
    took: Duration,
}

pub fn run(plan: &Plan, bin: &Path) -> Result<WholeReport> {
    let t0 = Instant::now();
    daemon::wait_until_alone()?;
    let dir = util::target_dir()?.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // The bench's side of both loads stays on the housekeeping CPU.
    let _pinned = daemon::PollerSetup::new(OTHER_CPU)?;
    let mut guest = VcpuGuest::start(GUEST_NAME, GUARDED_CPU)?;
    eprintln!(
        "{W}: whole daemon: guest {GUEST_NAME:?} pid {}, vCPU thread {} on CPU {GUARDED_CPU}",
        guest.pid(),
        guest.vcpu_tid
    );
    let (hk_n, g_n) = calibrate(&mut guest, plan.run_len)?;
    let loads = [
        format!("`{}`, {CHUNKS} times (median)", housekeeping_command(hk_n)),
        format!(
            "{CHUNKS} × {} wake-ups of the guest's vCPU (CPU {GUARDED_CPU}, SCHED_FIFO {LOAD_FIFO_PRIORITY}) \
             from a SCHED_FIFO {LOAD_FIFO_PRIORITY} thread on CPU {OTHER_CPU}, each a guest entry and a halt (median)",
            (g_n / CHUNKS).max(1)
        ),
    ];
    eprintln!("{W}: whole daemon: loads: {}; {}", loads[0], loads[1]);
    let stat0 = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let procs0 = proc_cpu_ticks();
    let mut witness = super::Witness::default();
    let mut tools = Vec::new();
    for &tool in &plan.tools {
        tools.push(measure_tool(
            tool,
            plan,
            bin,
            &dir,
            &mut guest,
            (hk_n, g_n),
            &mut witness,
        )?);
    }
    let detection = match plan.detection {
        Some((per_burst, gap)) => Some(detect(bin, &dir, per_burst, gap)?),
        None => None,
    };
    let stat1 = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let busiest = busiest(&procs0, &proc_cpu_ticks(), t0.elapsed(), guest.pid());
    let vcpu_tid = guest.vcpu_tid;
    drop(guest);
    Ok(WholeReport {
        pairs: plan.pairs,
        run_len: plan.run_len,
        loads,
        vcpu_tid,
        tools,
        detection,
        steal: noise::steal_pct(&stat0, &stat1),
        busiest,
        strangers: witness.into_list(),
        took: t0.elapsed(),
    })
}

/// Warm up, then N for each load so that one run takes about `len`.
fn calibrate(guest: &mut VcpuGuest, len: Duration) -> Result<(u64, u64)> {
    perf_pipe_fifo(2_000)?;
    let hk_rate = perf_pipe_fifo(10_000)?;
    guarded(guest, 500)?;
    let g_rate = guarded(guest, 2_000)?;
    let n = |rate: f64| ((rate * len.as_secs_f64()) as u64).clamp(1_000, 50_000_000);
    Ok((n(hk_rate), n(g_rate)))
}

/// The loads' priority. Other people's compilers share this lab's two CPUs;
/// at SCHED_OTHER, even at nice −20, a ping-pong's throughput swung by 2x
/// from run to run with whether a compiler thread was runnable on its CPU
/// (every wake-up then waited for, or interleaved with, its slice). As
/// SCHED_FIFO both loads run undisturbed by them: the housekeeping load's
/// perf processes, the guarded load's vCPU thread (as a latency-sensitive
/// guest's vCPU is: pinguard's `vcpu_sched`) and its waker. The tools
/// measured keep their normal priority, as in production. What remains is
/// the kernel's fair server (it gives starved normal threads 50 ms a
/// second): each run is the median of [`CHUNKS`] chunks, so one such gap
/// does not move it.
pub const LOAD_FIFO_PRIORITY: i32 = 1;
/// Chunks per run; a run's throughput is their median.
const CHUNKS: u64 = 5;

/// The calling thread SCHED_FIFO at [`LOAD_FIFO_PRIORITY`] while alive.
struct Fifo;

impl Fifo {
    fn new() -> Result<Self> {
        let param = nix::libc::sched_param {
            sched_priority: LOAD_FIFO_PRIORITY,
        };
        // SAFETY: plain syscall on the calling thread.
        if unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_FIFO, &param) } != 0 {
            bail!("becoming SCHED_FIFO: {}", std::io::Error::last_os_error());
        }
        Ok(Self)
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let param = nix::libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscall on the calling thread.
        unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_OTHER, &param) };
    }
}

/// The guarded load: round trips per second, median of [`CHUNKS`].
fn guarded(guest: &mut VcpuGuest, n: u64) -> Result<f64> {
    let _fifo = Fifo::new()?;
    let chunk = (n / CHUNKS).max(1);
    let mut rates = Vec::new();
    for _ in 0..CHUNKS {
        rates.push(chunk as f64 / guest.round_trips(chunk)?.as_secs_f64());
    }
    Ok(spread(&rates).context("no chunks")?.1)
}

/// The housekeeping load: `chrt -f 1 taskset -c 0 perf bench sched pipe -l
/// N/CHUNKS`, [`CHUNKS`] times: ops per second (perf's own timing of its
/// loop, without its start-up), median.
fn housekeeping(n: u64) -> Result<f64> {
    let chunk = (n / CHUNKS).max(1);
    let mut rates = Vec::new();
    for _ in 0..CHUNKS {
        rates.push(perf_pipe_fifo(chunk)?);
    }
    Ok(spread(&rates).context("no chunks")?.1)
}

fn housekeeping_command(n: u64) -> String {
    format!(
        "chrt -f {LOAD_FIFO_PRIORITY} taskset -c {OTHER_CPU} perf bench sched pipe -l {}",
        (n / CHUNKS).max(1)
    )
}

fn perf_pipe_fifo(loops: u64) -> Result<f64> {
    let mut cmd = std::process::Command::new("chrt");
    cmd.args([
        "-f",
        &LOAD_FIFO_PRIORITY.to_string(),
        "taskset",
        "-c",
        &OTHER_CPU.to_string(),
        "perf",
        "bench",
        "sched",
        "pipe",
        "-l",
        &loops.to_string(),
    ]);
    run_perf_pipe(&mut cmd)
}

fn sample(guest: &mut VcpuGuest, (hk_n, g_n): (u64, u64)) -> Result<Sample> {
    testkit::wait::check_interrupted()?;
    let housekeeping = housekeeping(hk_n)?;
    let guarded = guarded(guest, g_n)?;
    Ok(Sample {
        housekeeping,
        guarded,
    })
}

/// Per-CPU context switches from the scheduler's debug file (CPUs 0 and 1).
fn nr_switches() -> Option<[u64; 2]> {
    parse_nr_switches(&fs::read_to_string(SCHED_DEBUG).ok()?)
}

fn parse_nr_switches(text: &str) -> Option<[u64; 2]> {
    let mut out = [None, None];
    let mut cpu: Option<usize> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("cpu#") {
            cpu = rest.split(',').next().and_then(|c| c.trim().parse().ok());
        } else if let Some(v) = line.trim().strip_prefix(".nr_switches")
            && let Some(c) = cpu.filter(|&c| c < 2)
        {
            out[c] = v.trim().trim_start_matches(':').trim().parse().ok();
        }
    }
    Some([out[0]?, out[1]?])
}

/// The daemon's program stats, by name (summed over programs of that name).
fn program_stats(ids: &[(u64, String)]) -> Result<HashMap<String, (u64, u64)>> {
    let mut m: HashMap<String, (u64, u64)> = HashMap::new();
    for (id, name) in ids {
        let (ns, cnt) = prog_stats(*id)?;
        let e = m.entry(name.clone()).or_default();
        e.0 += ns;
        e.1 += cnt;
    }
    Ok(m)
}

fn measure_tool(
    tool: Tool,
    plan: &Plan,
    bin: &Path,
    dir: &Path,
    guest: &mut VcpuGuest,
    n: (u64, u64),
    witness: &mut super::Witness,
) -> Result<ToolResult> {
    eprintln!(
        "{W}: whole daemon: {} ({} pairs, A B B A ...)",
        tool.label(),
        plan.pairs
    );
    let mut res = ToolResult {
        tool,
        pairs: Vec::new(),
        cpu_ns: 0,
        cpu_window: Duration::ZERO,
        bytes: 0,
        lifetime: Duration::ZERO,
        costs: (tool == Tool::PinguardStats).then(Default::default),
    };
    let mut running: Option<Running> = None;
    let stop = |r: Running, res: &mut ToolResult| -> Result<()> {
        let s = r.stop(false)?;
        res.bytes += s.bytes;
        res.lifetime += s.lifetime;
        Ok(())
    };
    for p in 0..plan.pairs {
        let first_with = noise::with_first(p);
        let mut pair = [None, None];
        for with in [first_with, !first_with] {
            if with && running.is_none() {
                running = Some(Running::start(tool, bin, dir, GUEST_NAME)?);
            }
            if !with && let Some(r) = running.take() {
                stop(r, &mut res)?;
            }
            let s = match &running {
                Some(r) => {
                    witness.look(&[r.pid(), guest.pid()]);
                    let cpu0 = r.cpu_ns();
                    let t = Instant::now();
                    let s = match (&mut res.costs, r.daemon()) {
                        (Some(costs), Some(d)) => sample_with_costs(guest, n, d.pid(), costs)?,
                        _ => sample(guest, n)?,
                    };
                    res.cpu_window += t.elapsed();
                    res.cpu_ns += r.cpu_ns().saturating_sub(cpu0);
                    s
                }
                None => sample(guest, n)?,
            };
            pair[usize::from(with)] = Some(s);
        }
        let (Some(a), Some(b)) = (pair[0], pair[1]) else {
            unreachable!("both sides of a pair ran");
        };
        eprintln!(
            "{W}: whole daemon: {} pair {}/{}: housekeeping {:.0} -> {:.0} ops/s ({:+.1}%), guarded {:.0} -> {:.0} rt/s ({:+.1}%)",
            tool.label(),
            p + 1,
            plan.pairs,
            a.housekeeping,
            b.housekeeping,
            (b.housekeeping / a.housekeeping - 1.0) * 100.0,
            a.guarded,
            b.guarded,
            (b.guarded / a.guarded - 1.0) * 100.0
        );
        res.pairs.push((a, b));
    }
    if let Some(r) = running.take() {
        stop(r, &mut res)?;
    }
    Ok(res)
}

/// One with-run of the daemon, its program costs and the per-CPU switches
/// recorded around each load.
fn sample_with_costs(
    guest: &mut VcpuGuest,
    (hk_n, g_n): (u64, u64),
    pid: u32,
    costs: &mut [ProgCost; 2],
) -> Result<Sample> {
    testkit::wait::check_interrupted()?;
    let ids = daemon::daemon_programs(pid)?;
    let mut measure = |k: usize, f: &mut dyn FnMut() -> Result<f64>| -> Result<f64> {
        let (p0, s0) = (program_stats(&ids)?, nr_switches());
        let t = Instant::now();
        let rate = f()?;
        let window = t.elapsed();
        let (p1, s1) = (program_stats(&ids)?, nr_switches());
        let c = &mut costs[k];
        for (name, (ns, cnt)) in p1 {
            let (ns0, cnt0) = p0.get(&name).copied().unwrap_or_default();
            let e = c.programs.entry(name).or_default();
            e.0 += ns.saturating_sub(ns0);
            e.1 += cnt.saturating_sub(cnt0);
        }
        c.switches = match (c.switches.or(Some([0, 0])), s0, s1) {
            (Some(acc), Some(a), Some(b)) => Some([
                acc[0] + b[0].saturating_sub(a[0]),
                acc[1] + b[1].saturating_sub(a[1]),
            ]),
            _ => None,
        };
        c.window += window;
        Ok(rate)
    };
    let housekeeping = measure(0, &mut || housekeeping(hk_n))?;
    let guarded = measure(1, &mut || guarded(guest, g_n))?;
    Ok(Sample {
        housekeeping,
        guarded,
    })
}

/// All peers and pinguard watch the same intrusions; each is scored.
fn detect(bin: &Path, dir: &Path, per_burst: usize, gap: Duration) -> Result<DetectionResult> {
    eprintln!(
        "{W}: whole daemon: detection: {per_burst} intrusions each of {BURSTS_US:?} µs on CPU {GUARDED_CPU}, \
         watched by pinguard, bpftrace, perf sched record and the ps loop at once"
    );
    let mut running = Vec::new();
    for tool in [Tool::Pinguard, Tool::Bpftrace, Tool::PerfSched, Tool::Ps] {
        running.push(Running::start(tool, bin, dir, GUEST_NAME)?);
    }
    // The ps loop samples once a second: let it take one sample with all running.
    testkit::wait::sleep(Duration::from_millis(1_100))?;
    let t = Instant::now();
    let intruders = Intruders::run(per_burst, gap)?;
    // One more ps sample after the last intrusion, as an operator would.
    testkit::wait::sleep(Duration::from_millis(1_100))?;
    let window = t.elapsed();
    // pinguard's three views, read while the intruders still live: the
    // endpoint (the top intruders by run time), the recent violations, and
    // the kernel map the endpoint reads (all of it).
    let (listed, listed_len, violations, map) = {
        let d = running[0].daemon().context("pinguard runs first")?;
        let get = |path: &str| -> Result<String> {
            let (status, body) = d.try_get(path)?;
            if status != 200 {
                bail!("pinguard's {path} answered HTTP {status}: {body}");
            }
            Ok(body)
        };
        let listed = peers::parse_intruders(&get("/intruders")?)?;
        let violations = peers::parse_violation_tids(&get("/violations")?)?;
        let map =
            peers::parse_threads_map(&super::bpftool_json(&["map", "dump", "name", "THREADS"])?);
        (listed.clone(), listed.len(), violations, map)
    };
    let intrusions = intruders.done.clone();
    let key = |i: &Intrusion| (GUARDED_CPU as u32, i.tid);
    let with_run = |m: &HashMap<(u32, u32), u64>| -> Vec<Found> {
        intrusions
            .iter()
            .map(|i| {
                let run = m.get(&key(i)).copied();
                Found {
                    found: run.is_some(),
                    run_ns: run,
                }
            })
            .collect()
    };
    let mut tools = vec![
        (
            Reporter::Intruders { listed: listed_len },
            with_run(&listed),
        ),
        (
            Reporter::Violations,
            intrusions
                .iter()
                .map(|i| Found {
                    found: violations.contains(&key(i)),
                    run_ns: None,
                })
                .collect(),
        ),
        (Reporter::ThreadsMap, with_run(&map)),
    ];
    for r in running.drain(..) {
        let tool = r.tool;
        let stopped = r.stop(true)?;
        let found: Vec<Found> = intrusions
            .iter()
            .map(|i| match &stopped.output {
                Output::Counts(m) => Found {
                    found: m.get(&i.tid).is_some_and(|&c| c > 0),
                    run_ns: None,
                },
                Output::RunTimes(m) => {
                    let run = m.get(&i.tid).copied();
                    Found {
                        found: run.is_some(),
                        run_ns: run,
                    }
                }
                Output::Seen(s) => Found {
                    found: s.contains(&i.tid),
                    run_ns: None,
                },
                Output::Daemon | Output::Nothing => Found {
                    found: false,
                    run_ns: None,
                },
            })
            .collect();
        if tool != Tool::Pinguard {
            tools.push((Reporter::Tool(tool), found));
        }
    }
    drop(intruders);
    Ok(DetectionResult {
        intrusions,
        tools,
        window,
    })
}

/// utime+stime per process, by pid (with its comm), from /proc.
fn proc_cpu_ticks() -> HashMap<u32, (String, u64)> {
    let mut m = HashMap::new();
    for pid in testkit::host::pids() {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or(String::new(), |(c, _)| c.to_string());
        if let Some(t) = peers::parse_cpu_ticks(&stat) {
            m.insert(pid, (comm, t));
        }
    }
    m
}

/// The processes that used the most CPU meanwhile, other than ours: what
/// else was running on the machine, % of one core, by command name.
fn busiest(
    before: &HashMap<u32, (String, u64)>,
    after: &HashMap<u32, (String, u64)>,
    over: Duration,
    guest: u32,
) -> Vec<(String, f64)> {
    let me = std::process::id();
    let mut by_comm: HashMap<String, u64> = HashMap::new();
    for (pid, (comm, t1)) in after {
        if *pid == me || *pid == guest {
            continue;
        }
        let t0 = before.get(pid).map_or(0, |(_, t)| *t);
        *by_comm.entry(comm.clone()).or_default() += t1.saturating_sub(t0);
    }
    // SAFETY: sysconf has no preconditions.
    let hz = match unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    let mut v: Vec<(String, f64)> = by_comm
        .into_iter()
        .map(|(c, t)| (c, t as f64 / hz / over.as_secs_f64() * 100.0))
        .filter(|(_, pct)| *pct >= 1.0)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(8);
    v
}

fn pct(v: f64) -> String {
    format!("{v:.1}%")
}

fn fmt_bytes_per_sec(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1} MB/s", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB/s", b / 1e3)
    } else {
        format!("{b:.0} B/s")
    }
}

impl ProgCost {
    fn ns_per_run(&self, name: &str) -> Option<f64> {
        let (ns, cnt) = *self.programs.get(name)?;
        (cnt > 0).then(|| ns as f64 / cnt as f64)
    }
}

impl WholeReport {
    fn tool(&self, t: Tool) -> Option<&ToolResult> {
        self.tools.iter().find(|r| r.tool == t)
    }

    /// sched_switch ns/event on the guarded CPU alone, from the housekeeping
    /// and guarded loads' different mixes of CPU 0 and CPU 1 switches.
    fn per_cpu_switch_cost(&self) -> Option<[f64; 2]> {
        let costs = self.tool(Tool::PinguardStats)?.costs.as_ref()?;
        let point = |c: &ProgCost| -> Option<(f64, [f64; 2])> {
            let (ns, _) = *c.programs.get(SWITCH_PROGRAM)?;
            let [a, b] = c.switches?;
            Some((ns as f64, [a as f64, b as f64]))
        };
        noise::per_cpu_costs(point(&costs[0])?, point(&costs[1])?)
    }

    fn verdict_row(&self, what: &str, c: Option<Comparison>, target: f64) -> String {
        match c {
            Some(c) => format!(
                "| {what} | ≤ {target:.0}% lost | {} lost, ratio {} | {} |\n",
                pct(c.loss_pct()),
                c.describe(),
                c.verdict(target).mark()
            ),
            None => format!("| {what} | ≤ {target:.0}% lost | – | – |\n"),
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from("### Whole daemon against its floor and peers\n\n");
        if !self.strangers.is_empty() {
            s.push_str(&format!(
                "**Warning: other guests or pinguards ran meanwhile ({}).**\n\n",
                self.strangers.join(", ")
            ));
        }
        s.push_str(&format!(
            "Guest: the bench's one-vCPU KVM guest `{GUEST_NAME}`, its vCPU thread bound to CPU {GUARDED_CPU} \
             (the daemon makes it CPU {GUARDED_CPU}'s owner and measures its waits). Loads (≈ {:.1} s each): \
             housekeeping = {}; guarded = {}. {} pairs per tool, A B B A …, ratio = with / without per pair: \
             median [min–max]; *inconclusive* when the spread of the runs without the tool ((max − min) / \
             median) exceeds the effect |1 − ratio|. Took {:.0} s.\n\n",
            self.run_len.as_secs_f64(),
            self.loads[0],
            self.loads[1],
            self.pairs,
            self.took.as_secs_f64()
        ));
        s.push_str("| target | goal | measured | met? |\n|---|---|---|---|\n");
        if let Some(p) = self.tool(Tool::Pinguard) {
            s.push_str(&self.verdict_row(
                "pinguard run, housekeeping CPU",
                p.comparison(false),
                TARGET_HOUSEKEEPING_LOSS_PCT,
            ));
            s.push_str(&self.verdict_row(
                "pinguard run, guarded CPU (vCPU halt/wake)",
                p.comparison(true),
                TARGET_GUARDED_LOSS_PCT,
            ));
        }
        if let Some([_, c1]) = self.per_cpu_switch_cost() {
            s.push_str(&format!(
                "| sched_switch on the guarded CPU | ≤ {TARGET_NS_PER_EVENT:.0} ns/event | {c1:.1} ns/event | {} |\n",
                if c1 <= TARGET_NS_PER_EVENT { "✓" } else { "✗" }
            ));
        }
        if let Some(d) = &self.detection
            && let Some((_, found)) = d
                .tools
                .iter()
                .find(|(r, _)| matches!(r, Reporter::Intruders { .. }))
        {
            let (n, errs) = summarize(&d.intrusions, found, None);
            let max_err = errs.iter().copied().fold(0.0, f64::max);
            s.push_str(&format!(
                "| intruders found by pinguard (`/intruders`) | {TARGET_FOUND_PCT:.0}% | {}/{} | {} |\n\
                 | its run-time error against /proc/TID/schedstat | ≤ {TARGET_ERROR_PCT:.0}% | {} | {} |\n",
                n,
                d.intrusions.len(),
                if n == d.intrusions.len() { "✓" } else { "✗" },
                if errs.is_empty() {
                    "– (none listed)".to_string()
                } else {
                    format!("max {max_err:.2}%")
                },
                if errs.is_empty() {
                    "–"
                } else if max_err <= TARGET_ERROR_PCT {
                    "✓"
                } else {
                    "✗"
                }
            ));
        }
        s.push('\n');

        s.push_str(
            "| tool | housekeeping: ratio [min–max] | guarded (vCPU halt/wake): ratio [min–max] | \
             baseline spread hk / guarded | tool CPU, % of a core | data written |\n|---|---|---|---|---:|---:|\n",
        );
        for r in &self.tools {
            let (hk, g) = (r.comparison(false), r.comparison(true));
            let f = |c: &Option<Comparison>| c.as_ref().map_or("–".into(), Comparison::describe);
            let sp = |c: &Option<Comparison>| {
                c.as_ref()
                    .map_or("–".into(), |c| pct(c.baseline_spread * 100.0))
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} / {} | {:.2} | {} |\n",
                r.tool.label(),
                f(&hk),
                f(&g),
                sp(&hk),
                sp(&g),
                r.cpu_pct(),
                fmt_bytes_per_sec(r.bytes_per_sec())
            ));
        }
        s.push('\n');

        if let Some(d) = &self.detection {
            s.push_str(&format!(
                "Detection: {} intrusions on CPU {GUARDED_CPU} over {:.1} s, watched by all four at once. \
                 Found = the tool names the intruder's tid; error = |reported − schedstat| / schedstat \
                 (median, max) for the tools that report run time.\n\n",
                d.intrusions.len(),
                d.window.as_secs_f64()
            ));
            s.push_str("| tool |");
            for b in BURSTS_US {
                s.push_str(&format!(" {} found | error median (max) |", burst_label(b)));
            }
            s.push_str("\n|---|");
            for _ in BURSTS_US {
                s.push_str("---:|---:|");
            }
            s.push('\n');
            for (tool, found) in &d.tools {
                s.push_str(&format!("| {} |", tool.label()));
                for b in BURSTS_US {
                    let (n, errs) = summarize(&d.intrusions, found, Some(b));
                    let total = d.intrusions.iter().filter(|i| i.burst_us == b).count();
                    let err = if !tool.reports_run_time() {
                        "no run time".to_string()
                    } else {
                        match spread(&errs) {
                            Some((_, med, max)) => format!("{med:.2}% ({max:.2}%)"),
                            None => "–".into(),
                        }
                    };
                    s.push_str(&format!(" {n}/{total} | {err} |"));
                }
                s.push('\n');
            }
            s.push('\n');
        }

        if let Some(costs) = self
            .tool(Tool::PinguardStats)
            .and_then(|p| p.costs.as_ref())
        {
            s.push_str(
                "pinguard's programs during the with-runs of `bpf_stats = true` (\
                 ns/run includes bpf_stats' own timing):\n\n| program | housekeeping load: runs/s | ns/run | \
                 guarded load: runs/s | ns/run |\n|---|---:|---:|---:|---:|\n",
            );
            let mut names: Vec<&String> = costs[0]
                .programs
                .keys()
                .chain(costs[1].programs.keys())
                .collect();
            names.sort();
            names.dedup();
            for name in names {
                let col = |c: &ProgCost| match c.programs.get(name) {
                    Some(&(_, cnt)) if cnt > 0 => format!(
                        "{:.0} | {:.1}",
                        cnt as f64 / c.window.as_secs_f64(),
                        c.ns_per_run(name).unwrap_or(0.0)
                    ),
                    _ => "0 | –".into(),
                };
                s.push_str(&format!(
                    "| {name} | {} | {} |\n",
                    col(&costs[0]),
                    col(&costs[1])
                ));
            }
            if let (Some(a), Some(b)) = (costs[0].switches, costs[1].switches) {
                s.push_str(&format!(
                    "\nContext switches (CPU 0 / CPU 1, from {SCHED_DEBUG}): housekeeping load {} / {}, guarded load {} / {}.",
                    a[0], a[1], b[0], b[1]
                ));
                if let Some([c0, c1]) = self.per_cpu_switch_cost() {
                    s.push_str(&format!(
                        " Solving `run_time = n0 × c0 + n1 × c1` over the two loads: {SWITCH_PROGRAM} costs \
                         {c0:.1} ns per switch on CPU 0 and {c1:.1} ns per switch on guarded CPU 1."
                    ));
                }
                s.push('\n');
            }
            s.push('\n');
        }

        s.push_str("Noise: steal time during the run ");
        s.push_str(
            &self
                .steal
                .iter()
                .map(|(n, p)| format!("{n} {p:.2}%"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        s.push_str("; other processes using ≥ 1% of a core meanwhile: ");
        if self.busiest.is_empty() {
            s.push_str("none");
        } else {
            s.push_str(
                &self
                    .busiest
                    .iter()
                    .map(|(c, p)| format!("{c} {p:.0}%"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        s.push_str(".\n\n");
        s
    }

    pub fn json(&self) -> Value {
        let cmp = |c: Option<Comparison>| match c {
            Some(c) => json!({
                "pairs": c.pairs, "ratio_median": c.ratio, "ratio_min": c.ratio_min,
                "ratio_max": c.ratio_max, "baseline_spread": c.baseline_spread,
                "effect": c.effect, "inconclusive": c.inconclusive,
            }),
            None => Value::Null,
        };
        let tools: Vec<Value> = self
            .tools
            .iter()
            .map(|r| {
                json!({
                    "tool": r.tool.key(),
                    "command": r.tool.command(),
                    "housekeeping": cmp(r.comparison(false)),
                    "guarded": cmp(r.comparison(true)),
                    "runs": r.pairs.iter().map(|(a, b)| json!({
                        "without": {"housekeeping_ops_s": a.housekeeping, "guarded_rt_s": a.guarded},
                        "with": {"housekeeping_ops_s": b.housekeeping, "guarded_rt_s": b.guarded},
                    })).collect::<Vec<_>>(),
                    "cpu_pct_of_one_core": r.cpu_pct(),
                    "bytes_written": r.bytes,
                    "bytes_per_sec": r.bytes_per_sec(),
                    "lifetime_s": r.lifetime.as_secs_f64(),
                    "programs": r.costs.as_ref().map(|c| c.iter().zip(["housekeeping", "guarded"]).map(|(c, load)| json!({
                        "load": load,
                        "window_s": c.window.as_secs_f64(),
                        "switches_cpu0_cpu1": c.switches,
                        "programs": c.programs.iter().map(|(n, (ns, cnt))| json!({
                            "program": n, "run_time_ns": ns, "run_cnt": cnt,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>()),
                })
            })
            .collect();
        let detection = self.detection.as_ref().map(|d| {
            json!({
                "window_s": d.window.as_secs_f64(),
                "intrusions": d.intrusions.iter().enumerate().map(|(k, i)| json!({
                    "burst_us": i.burst_us,
                    "tid": i.tid,
                    "schedstat_ns": i.ref_ns,
                    "reporters": d.tools.iter().map(|(t, f)| json!({
                        "tool": t.key(), "found": f[k].found, "run_ns": f[k].run_ns,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        });
        json!({
            "guest": GUEST_NAME,
            "vcpu_tid": self.vcpu_tid,
            "pairs": self.pairs,
            "run_s": self.run_len.as_secs_f64(),
            "loads": self.loads,
            "targets": {
                "housekeeping_loss_pct": TARGET_HOUSEKEEPING_LOSS_PCT,
                "guarded_loss_pct": TARGET_GUARDED_LOSS_PCT,
                "ns_per_event_guarded": TARGET_NS_PER_EVENT,
                "found_pct": TARGET_FOUND_PCT,
                "run_time_error_pct": TARGET_ERROR_PCT,
            },
            "switch_ns_per_event_cpu0_cpu1": self.per_cpu_switch_cost(),
            "tools": tools,
            "detection": detection,
            "steal_pct": self.steal.iter().map(|(n, p)| json!({"cpu": n, "steal_pct": p})).collect::<Vec<_>>(),
            "busiest_others_pct_of_core": self.busiest.iter().map(|(c, p)| json!({"comm": c, "pct": p})).collect::<Vec<_>>(),
            "strangers": self.strangers,
            "took_s": self.took.as_secs_f64(),
        })
    }
}

fn burst_label(us: u64) -> String {
    if us >= 1_000 {
        format!("{} ms", us / 1_000)
    } else {
        format!("{us} µs")
    }
}

/// Found count and the run-time errors (%) of the found ones, for one burst
/// length (or all).
fn summarize(intrusions: &[Intrusion], found: &[Found], burst: Option<u64>) -> (usize, Vec<f64>) {
    let mut n = 0;
    let mut errs = Vec::new();
    for (i, f) in intrusions.iter().zip(found) {
        if burst.is_some_and(|b| b != i.burst_us) {
            continue;
        }
        if f.found {
            n += 1;
        }
        if let Some(run) = f.run_ns
            && i.ref_ns > 0
        {
            errs.push((run as f64 - i.ref_ns as f64).abs() / i.ref_ns as f64 * 100.0);
        }
    }
    (n, errs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sched_debug_switches() {
        let text = "Sched Debug Version: v0.11\n\ncpu#0, 2600.000 MHz\n  .nr_running                    : 1\n  .nr_switches                   : 352798\n\ncpu#1, 2600.000 MHz\n  .nr_switches                   : 473603\n";
        assert_eq!(parse_nr_switches(text), Some([352798, 473603]));
        assert_eq!(parse_nr_switches("cpu#0, x\n  .nr_switches : 5\n"), None);
    }

    #[test]
    fn detection_summary_per_burst() {
        let intrusions = vec![
            Intrusion {
                burst_us: 20,
                tid: 1,
                ref_ns: 20_000,
            },
            Intrusion {
                burst_us: 20,
                tid: 2,
                ref_ns: 25_000,
            },
            Intrusion {
                burst_us: 200,
                tid: 3,
                ref_ns: 200_000,
            },
        ];
        let found = vec![
            Found {
                found: true,
                run_ns: Some(20_200),
            },
            Found {
                found: false,
                run_ns: None,
            },
            Found {
                found: true,
                run_ns: Some(200_000),
            },
        ];
        let (n, errs) = summarize(&intrusions, &found, Some(20));
        assert_eq!(n, 1);
        assert_eq!(errs.len(), 1);
        assert!((errs[0] - 1.0).abs() < 1e-9);
        assert_eq!(summarize(&intrusions, &found, None).0, 2);
    }
}
