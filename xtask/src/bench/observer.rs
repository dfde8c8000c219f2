//! The sched_switch observer's cost, per scenario.
//!
//! a) ns/event: with `kernel.bpf_stats_enabled=1` the kernel accounts each
//!    program's run time and run count; their ratio over a fixed load is the
//!    cost of one sched_switch event (bpf_stats' own timing included, which
//!    the empty_* programs on the same hooks show: the floor).
//! b) throughput loss: the same loads detached vs attached, with bpf_stats
//!    off (it adds its own cost). Shared VMs drift by several percent, so
//!    every attached run sits between two detached runs (D A1 D A2 D ...),
//!    the program order rotates per round, and we report the median and
//!    spread of the per-round ratios attached / mean(detached neighbours).
//!
//! Scenarios (what the program does on each switch decides its cost):
//! - housekeeping: the load runs on CPU 0, which is not guarded: the program
//!   reads one array slot and returns. Most switches of a real host are here.
//! - owner: the load runs on guarded CPU 1 and one of its threads is
//!   registered as CPU 1's owner with its waits measured and the `wakeup`
//!   program attached beside (what the daemon does for a vCPU): `pipe`
//!   alternates the owner (cached owner, no lookup) with an intruding peer;
//!   `cross` is the vCPU pattern, owner <-> idle on CPU 1 with the peer on CPU 0.
//! - intruder: only intruders on CPU 1: every switch takes the slowest path
//!   (per-thread accounting in a hash map). The worst case.
use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::Command,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use testkit::{
    host,
    process::Process,
    threads::{affinity, gettid, pin_current_thread},
    wait::check_interrupted,
    which,
};

use super::{
    BenchArgs, BpfStats, GUARDED_CPU, OTHER_CPU, W, Witness, bpftool_progs, prog_name_matches,
    prog_stats, spread,
};
use crate::util;

/// The real observer on three hook kinds, then empty programs on the same hooks (the floor).
pub const PROGRAMS: &[&str] = &[
    "switch_tp_btf",
    "switch_raw_tp",
    "switch_tracepoint",
    "empty_tp_btf",
    "empty_raw_tp",
    "empty_tracepoint",
];
/// Pseudo-program: attach nothing. Its "loss" is the noise of a detached-vs-detached pair.
const NONE: &str = "none";
/// The sched_wakeup program, attached beside the measured one in the owner scenario.
const WAKEUP: &str = "wakeup";
/// What `pinguard run` attaches.
const SHIPPED: &str = "switch_tp_btf";

pub const TARGET_NS_PER_EVENT: f64 = 100.0;
pub const TARGET_LOSS_PCT: f64 = 3.0;
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Each load run is split into this many chunks; its throughput is their median.
const CHUNKS: u64 = 5;
/// Bound on one ping-pong chunk (a stuck pipe must not hang the benchmark).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Scenario {
    /// Load on housekeeping CPU 0: the program bails out after one array read.
    Housekeeping,
    /// Load on guarded CPU 1 with one of its threads registered as the owner.
    Owner,
    /// Load of intruders on guarded CPU 1: the slowest path (worst case).
    Intruder,
}

impl Scenario {
    const ALL: [Scenario; 3] = [Scenario::Housekeeping, Scenario::Owner, Scenario::Intruder];

    fn name(self) -> &'static str {
        match self {
            Scenario::Housekeeping => "housekeeping",
            Scenario::Owner => "owner",
            Scenario::Intruder => "intruder",
        }
    }

    /// Where the long-lived pong thread sits (the owner, in the owner scenario).
    fn pong_cpu(self) -> usize {
        match self {
            Scenario::Housekeeping => OTHER_CPU,
            Scenario::Owner | Scenario::Intruder => GUARDED_CPU,
        }
    }

    fn loads(self, perf: bool) -> Vec<Load> {
        match self {
            Scenario::Housekeeping => {
                let mut l = vec![Load::Pipe { cpu: OTHER_CPU }];
                if perf {
                    l.push(Load::Perf { cpu: OTHER_CPU });
                }
                l
            }
            // perf's processes do not exist before attach, so they cannot be owners.
            Scenario::Owner => vec![Load::Pipe { cpu: GUARDED_CPU }, Load::Cross],
            Scenario::Intruder => {
                let mut l = vec![Load::Pipe { cpu: GUARDED_CPU }];
                if perf {
                    l.push(Load::Perf { cpu: GUARDED_CPU });
                }
                l
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Scenario::Housekeeping => {
                "Load on housekeeping CPU 0 (not guarded). The program reads CPU 0's slot of \
                 the GUARDED array and returns. Most context switches of a real host happen on \
                 housekeeping CPUs, so this is the cost pinguard adds to the host in general."
            }
            Scenario::Owner => {
                "Load on guarded CPU 1, the pong thread registered as CPU 1's owner and its \
                 waits measured, with the `wakeup` program attached beside every program measured \
                 (`pinguard attach --owner 1=TID --watch-owners --program wakeup`, as the daemon \
                 does for a vCPU; the floor includes wakeup's cost). `pipe`: \
                 owner and an intruding ping thread alternate on CPU 1, so half the switches \
                 take the owner's fast path (its tid is cached per CPU, no lookup) and half the \
                 known-intruder path. `cross`: the ping thread is on CPU 0, so CPU 1 alternates \
                 owner and idle — the pattern of a vCPU that halts and is woken — and CPU 0's \
                 switches bail out."
            }
            Scenario::Intruder => {
                "Only intruders on guarded CPU 1 (no owner): every switch on CPU 1 classifies \
                 the thread (THREADS hash lookup), accounts its slice in its per-thread entry and \
                 rate-checks an event. The worst case: on a healthy host nothing but the owner and \
                 per-CPU kernel threads runs on a guarded CPU."
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Load {
    /// Our two threads on one CPU, 1-byte round trips over two pipes.
    Pipe { cpu: usize },
    /// Our ping thread on CPU 0, the pong thread on CPU 1.
    Cross,
    /// `taskset -c CPU perf bench sched pipe`: two processes on one CPU.
    Perf { cpu: usize },
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Pipe { .. } => "pipe",
            Load::Cross => "cross",
            Load::Perf { .. } => "perf",
        }
    }

    fn describe(self, n: u64) -> String {
        match self {
            Load::Pipe { cpu } => format!(
                "`pipe`: {n} one-byte round trips between two threads pinned to CPU {cpu} (two pipes)"
            ),
            Load::Cross => format!(
                "`cross`: {n} one-byte round trips between a thread on CPU {OTHER_CPU} and the owner on CPU {GUARDED_CPU}"
            ),
            Load::Perf { cpu } => {
                format!("`perf`: `taskset -c {cpu} perf bench sched pipe -l {n}` (two processes)")
            }
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Load::Perf { .. } => "ops/s",
            _ => "rt/s",
        }
    }
}

pub struct Plan {
    rounds: u32,
    programs: Vec<String>,
    scenarios: Vec<Scenario>,
    /// Wall time one load run should take, used to calibrate N.
    run_len: Duration,
    perf: bool,
}

impl Plan {
    pub fn from_args(args: &BenchArgs) -> Result<Self> {
        let programs: Vec<String> = if args.programs.is_empty() {
            PROGRAMS
                .iter()
                .chain(&[NONE])
                .map(|p| p.to_string())
                .collect()
        } else {
            args.programs.clone()
        };
        for p in &programs {
            if p != NONE && !PROGRAMS.contains(&p.as_str()) {
                bail!(
                    "unknown --program {p:?}: expected one of {}, or {NONE}",
                    PROGRAMS.join(", ")
                );
            }
        }
        let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 5 });
        if rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        let mut scenarios = if args.scenarios.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            args.scenarios.clone()
        };
        scenarios.dedup();
        let perf = !args.no_perf && which("perf").is_ok();
        if !args.no_perf && !perf {
            eprintln!(
                "{W}: note: perf not found (cargo xtask setup installs linux-perf): skipping the perf loads"
            );
        }
        Ok(Self {
            rounds,
            programs,
            scenarios,
            run_len: Duration::from_millis(if args.quick { 200 } else { 500 }),
            perf,
        })
    }

    pub fn loads_bpf(&self) -> bool {
        self.programs.iter().any(|p| p != NONE)
    }
}

/// Two long-lived threads doing pipe round trips on command: their tids are
/// known before anything is attached, so one can be registered as an owner.
/// The pong thread stays on its CPU; the ping thread moves to the CPU each
/// run asks for.
struct PingPong {
    cmd: Option<mpsc::Sender<(usize, u64)>>,
    done: mpsc::Receiver<Result<Duration>>,
    threads: Vec<JoinHandle<()>>,
    ping_tid: u32,
    pong_tid: u32,
    pong_cpu: usize,
}

impl PingPong {
    fn new(pong_cpu: usize) -> Result<Self> {
        let (mut rx1, mut tx1) = std::io::pipe().context("pipe")?;
        let (mut rx2, mut tx2) = std::io::pipe().context("pipe")?;
        let (tid_tx, tid_rx) = mpsc::channel::<Result<u32>>();
        let pong_tids = tid_tx.clone();
        // Each thread owns its pipe ends: when one ends, the other sees EOF/EPIPE.
        let pong = std::thread::Builder::new()
            .name("bench-pong".into())
            .spawn(move || {
                let pinned = pin_to(pong_cpu);
                let failed = pinned.is_err();
                let _ = pong_tids.send(pinned.map(|()| gettid()));
                if failed {
                    return;
                }
                let mut b = [0u8; 1];
                while rx1.read_exact(&mut b).is_ok() && tx2.write_all(&b).is_ok() {}
            })
            .context("spawning the pong thread")?;
        let (cmd_tx, cmd_rx) = mpsc::channel::<(usize, u64)>();
        let (done_tx, done) = mpsc::channel();
        let ping = std::thread::Builder::new()
            .name("bench-ping".into())
            .spawn(move || {
                let _ = tid_tx.send(Ok(gettid()));
                let mut cpu = None;
                let mut b = [7u8; 1];
                while let Ok((want, n)) = cmd_rx.recv() {
                    let mut run = || -> Result<Duration> {
                        if cpu != Some(want) {
                            pin_to(want)?;
                            cpu = Some(want);
                        }
                        let t = Instant::now();
                        for _ in 0..n {
                            tx1.write_all(&b).context("ping write")?;
                            rx2.read_exact(&mut b).context("ping read")?;
                        }
                        Ok(t.elapsed())
                    };
                    let r = run();
                    let failed = r.is_err();
                    if done_tx.send(r).is_err() || failed {
                        break;
                    }
                }
            })
            .context("spawning the ping thread")?;
        let mut me = Self {
            cmd: Some(cmd_tx),
            done,
            threads: vec![pong, ping],
            ping_tid: 0,
            pong_tid: 0,
            pong_cpu,
        };
        for _ in 0..2 {
            let tid = tid_rx
                .recv_timeout(Duration::from_secs(10))
                .context("a ping-pong thread did not start")??;
            // The pong thread reports after pinning, the ping thread at once; tell them apart by name.
            if host::comm(std::process::id(), tid).as_deref() == Some("bench-pong") {
                me.pong_tid = tid;
            } else {
                me.ping_tid = tid;
            }
        }
        if me.pong_tid == 0 || me.ping_tid == 0 {
            bail!("could not tell the ping-pong threads apart by name");
        }
        Ok(me)
    }

    /// `n` round trips with the ping thread on `ping_cpu`: their duration.
    fn run(&self, ping_cpu: usize, n: u64) -> Result<Duration> {
        self.cmd
            .as_ref()
            .context("ping-pong stopped")?
            .send((ping_cpu, n))
            .map_err(|_| anyhow::anyhow!("the ping thread exited"))?;
        let took = match self.done.recv_timeout(CHUNK_TIMEOUT) {
            Ok(r) => r?,
            Err(_) => bail!(
                "{n} ping-pong round trips did not finish within {}s",
                CHUNK_TIMEOUT.as_secs()
            ),
        };
        self.check_pinned(ping_cpu)?;
        Ok(took)
    }

    /// A pinguard in enforce mode (or any other tool) moving our threads would
    /// silently change the scenario: refuse to report such numbers.
    fn check_pinned(&self, ping_cpu: usize) -> Result<()> {
        for (tid, cpu) in [(self.ping_tid, ping_cpu), (self.pong_tid, self.pong_cpu)] {
            let cpus = affinity(tid)
                .with_context(|| format!("reading the affinity of ping-pong thread {tid}"))?;
            if !cpus.iter().eq([&cpu]) {
                bail!(
                    "ping-pong thread {tid} should be pinned to CPU {cpu} but may run on {cpus:?}: \
                     another tool (a `pinguard run --mode enforce`?) changed its affinity; stop it and rerun"
                );
            }
        }
        Ok(())
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        // Ping exits when its command channel closes, dropping its pipe ends; pong sees EOF.
        drop(self.cmd.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn pin_to(cpu: usize) -> Result<()> {
    pin_current_thread(cpu)
        .with_context(|| format!("cannot pin a benchmark thread to CPU {cpu} (offline?)"))
}

/// One scenario's loads, each with its calibrated size.
struct Loads<'a> {
    workers: &'a PingPong,
    loads: Vec<(Load, u64)>,
}

impl<'a> Loads<'a> {
    /// Throughput of each load, in order.
    fn sample(&self) -> Result<Vec<f64>> {
        self.loads
            .iter()
            .map(|&(load, n)| self.rate(load, n))
            .collect()
    }

    fn rate(&self, load: Load, n: u64) -> Result<f64> {
        check_interrupted()?;
        match load {
            Load::Perf { cpu } => perf_pipe(cpu, n),
            Load::Pipe { .. } | Load::Cross => {
                // The median of a few chunks ignores a short burst of host noise (a
                // neighbour's vCPU, a kworker) that would otherwise move the whole run.
                let chunk = (n / CHUNKS).max(1);
                let mut rates = Vec::new();
                for _ in 0..CHUNKS {
                    rates.push(chunk as f64 / self.once(load, chunk)?.as_secs_f64());
                }
                let (_, median, _) = spread(&rates).context("no ping-pong chunks")?;
                Ok(median)
            }
        }
    }

    /// Runs `load` once with `n` round trips or ops: its duration.
    fn once(&self, load: Load, n: u64) -> Result<Duration> {
        match load {
            Load::Pipe { cpu } => self.workers.run(cpu, n),
            Load::Cross => self.workers.run(OTHER_CPU, n),
            Load::Perf { cpu } => {
                let t = Instant::now();
                perf_pipe(cpu, n)?;
                Ok(t.elapsed())
            }
        }
    }

    /// Warm up, then pick N so that one run takes about `run_len`.
    fn calibrate(workers: &'a PingPong, loads: &[Load], run_len: Duration) -> Result<Self> {
        let mut me = Loads {
            workers,
            loads: Vec::new(),
        };
        for &load in loads {
            let probe_n = match load {
                Load::Perf { .. } => 5_000,
                _ => 10_000,
            };
            me.once(load, probe_n / 4)?;
            let took = me.once(load, probe_n)?;
            let rate = probe_n as f64 / took.as_secs_f64();
            let n = ((rate * run_len.as_secs_f64()) as u64).clamp(1_000, 20_000_000);
            me.loads.push((load, n));
        }
        Ok(me)
    }
}

/// `perf bench sched pipe -l N` with both processes on `cpu`: ops/s.
fn perf_pipe(cpu: usize, loops: u64) -> Result<f64> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string()]).args([
        "perf",
        "bench",
        "sched",
        "pipe",
        "-l",
        &loops.to_string(),
    ]);
    run_perf_pipe(&mut cmd)
}

/// Runs a `perf bench sched pipe` command line (whatever wraps it: taskset,
/// chrt) and returns its ops/s.
pub(super) fn run_perf_pipe(cmd: &mut Command) -> Result<f64> {
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`", util::show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            util::show(cmd),
            util::describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_perf_pipe(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
        format!(
            "no \"usecs/op\" line in the output of `{}`",
            util::show(cmd)
        )
    })
}

/// ops/s from perf's "  26.600650 usecs/op" line (more digits than its ops/sec line).
pub(super) fn parse_perf_pipe(out: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let v: f64 = it.next()?.parse().ok()?;
        (it.next()? == "usecs/op" && v > 0.0).then(|| 1e6 / v)
    })
}

/// A `pinguard attach --program NAME [--owner CPU=TID]` child.
pub(super) struct Attached {
    child: Process,
    name: String,
}

impl Attached {
    pub(super) fn start(bin: &Path, name: &str, owners: &[(usize, u32)]) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args([
            "attach",
            "--guard",
            &GUARDED_CPU.to_string(),
            "--program",
            name,
        ]);
        for (cpu, tid) in owners {
            cmd.arg("--owner").arg(format!("{cpu}={tid}"));
        }
        // With an owner, run as the daemon runs for a vCPU: its waits are
        // measured (the sched_switch program's wait tracking is on) and the
        // `wakeup` program starts them. Attached beside every program,
        // including the empty floors, so the floor carries wakeup's cost too.
        if !owners.is_empty() {
            cmd.args(["--watch-owners", "--program", WAKEUP]);
        }
        let mut child = Process::try_spawn_group(&mut cmd)?;
        let want = format!("attached {name}");
        child.try_wait_stdout(&format!("{want:?}"), ATTACH_TIMEOUT, |l| l.trim() == want)?;
        Ok(Self {
            child,
            name: name.to_string(),
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub(super) fn stop(self) -> Result<()> {
        self.child
            .try_terminate(STOP_TIMEOUT)
            .map(drop)
            .with_context(|| format!("stopping the attached {}", self.name))
    }
}

struct EventCost {
    run_time_ns: u64,
    run_cnt: u64,
    window: Duration,
}

impl EventCost {
    fn ns_per_event(&self) -> f64 {
        self.run_time_ns as f64 / self.run_cnt as f64
    }
    fn events_per_sec(&self) -> f64 {
        self.run_cnt as f64 / self.window.as_secs_f64()
    }
}

/// IDs of programs called `program` and, when given and bpftool reports
/// holders (builds with skeleton support), held by `pid`.
fn matching_ids(progs: &Value, program: &str, pid: Option<u32>) -> Vec<u64> {
    progs
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| prog_name_matches(n, program))
        })
        .filter(|p| match (pid, p["pids"].as_array()) {
            (Some(pid), Some(holders)) => holders
                .iter()
                .any(|h| h["pid"].as_u64() == Some(pid.into())),
            _ => true,
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// The program our child loaded: matching name (and pid, when known), and not
/// there before it started, so a pinguard running elsewhere is not mistaken for ours.
fn our_prog_id(progs: &Value, program: &str, pid: u32, existing: &[u64]) -> Result<u64> {
    let ids: Vec<u64> = matching_ids(progs, program, Some(pid))
        .into_iter()
        .filter(|id| !existing.contains(id))
        .collect();
    match ids.as_slice() {
        [id] => Ok(*id),
        [] => bail!("`bpftool prog show` lists no new BPF program named {program:?} (pid {pid})"),
        many => bail!(
            "{} new BPF programs named {program:?} ({many:?}): another pinguard started at the same time? \
             Stop it and rerun",
            many.len()
        ),
    }
}

/// ns/event of `program` under each load (bpf_stats must be on).
fn measure_ns_per_event(
    bin: &Path,
    program: &str,
    owners: &[(usize, u32)],
    loads: &Loads,
) -> Result<Vec<EventCost>> {
    let existing = matching_ids(&bpftool_progs()?, program, None);
    let attached = Attached::start(bin, program, owners)?;
    let id = our_prog_id(&bpftool_progs()?, program, attached.pid(), &existing)?;
    let mut costs = Vec::new();
    for &(load, n) in &loads.loads {
        let before = prog_stats(id)?;
        let t = Instant::now();
        loads.once(load, n)?;
        let window = t.elapsed();
        let after = prog_stats(id)?;
        let cost = EventCost {
            run_time_ns: after.0.saturating_sub(before.0),
            run_cnt: after.1.saturating_sub(before.1),
            window,
        };
        if cost.run_cnt == 0 {
            bail!(
                "{program} (BPF prog id {id}) ran 0 times during the {} load: loaded but not attached to sched_switch?",
                load.label()
            );
        }
        eprintln!(
            "{W}:   {program:<17} {:<5} {:>6.1} ns/event over {} events ({:.0} events/s)",
            load.label(),
            cost.ns_per_event(),
            cost.run_cnt,
            cost.events_per_sec()
        );
        costs.push(cost);
    }
    attached.stop()?;
    Ok(costs)
}

struct ProgResult {
    name: String,
    /// Per load (empty when not measured).
    costs: Vec<EventCost>,
    /// Per load, the per-round attached/detached throughput ratios.
    ratios: Vec<Vec<f64>>,
}

struct ScenarioResult {
    scenario: Scenario,
    /// An attached program's run count grew while kernel.bpf_stats_enabled
    /// was 0: another process held BPF statistics on (BPF_ENABLE_STATS, as
    /// `pinguard run` with bpf_stats = true does), so the throughput runs
    /// paid bpf_stats' cost too.
    stats_leak: bool,
    loads: Vec<(Load, u64)>,
    /// The registered owner of CPU 1 (owner scenario).
    owner_tid: Option<u32>,
    progs: Vec<ProgResult>,
}

pub struct ObserverReport {
    /// Other guests and pinguards seen while measuring.
    strangers: Vec<String>,
    rounds: u32,
    run_len: Duration,
    scenarios: Vec<ScenarioResult>,
}

pub fn run(plan: &Plan, bin: Option<&Path>, stats: Option<&BpfStats>) -> Result<ObserverReport> {
    let mut scenarios = Vec::new();
    let mut witness = Witness::default();
    for &scenario in &plan.scenarios {
        scenarios.push(run_scenario(plan, scenario, bin, stats, &mut witness)?);
    }
    let strangers = witness.into_list();
    if !strangers.is_empty() {
        eprintln!(
            "{W}: WARNING: other pinguards or guests ran during the observer benchmark: {}",
            strangers.join(", ")
        );
    }
    Ok(ObserverReport {
        strangers,
        rounds: plan.rounds,
        run_len: plan.run_len,
        scenarios,
    })
}

fn run_scenario(
    plan: &Plan,
    scenario: Scenario,
    bin: Option<&Path>,
    stats: Option<&BpfStats>,
    witness: &mut Witness,
) -> Result<ScenarioResult> {
    let workers = PingPong::new(scenario.pong_cpu())?;
    let owners: Vec<(usize, u32)> = match scenario {
        Scenario::Owner => vec![(GUARDED_CPU, workers.pong_tid)],
        _ => Vec::new(),
    };
    eprintln!(
        "{W}: scenario {}: warming up and calibrating the loads",
        scenario.name()
    );
    let loads = Loads::calibrate(&workers, &scenario.loads(plan.perf), plan.run_len)?;
    eprintln!(
        "{W}: scenario {}: {}{}",
        scenario.name(),
        loads
            .loads
            .iter()
            .map(|&(l, n)| l.describe(n))
            .collect::<Vec<_>>()
            .join("; "),
        match owners.first() {
            Some((cpu, tid)) => format!("; owner of CPU {cpu}: tid {tid}"),
            None => String::new(),
        }
    );
    let mut progs: Vec<ProgResult> = plan
        .programs
        .iter()
        .map(|p| ProgResult {
            name: p.clone(),
            costs: Vec::new(),
            ratios: vec![Vec::new(); loads.loads.len()],
        })
        .collect();

    if let (Some(bin), Some(stats)) = (bin, stats) {
        stats.set(true)?;
        for r in progs.iter_mut().filter(|r| r.name != NONE) {
            check_interrupted()?;
            r.costs = measure_ns_per_event(bin, &r.name, &owners, &loads)?;
        }
        stats.set(false)?;
    }

    let mut stats_leak = false;
    for round in 0..plan.rounds {
        witness.look(&[]);
        let n = progs.len();
        // D A1 D A2 D ... An D: each attached run between two detached ones.
        let mut before = loads.sample()?;
        for i in 0..n {
            let r = &mut progs[(i + round as usize) % n];
            let attached = match bin {
                Some(bin) if r.name != NONE => {
                    let existing = matching_ids(&bpftool_progs()?, &r.name, None);
                    let a = Attached::start(bin, &r.name, &owners)?;
                    let id = our_prog_id(&bpftool_progs()?, &r.name, a.pid(), &existing)?;
                    Some((a, id, prog_stats(id)?.1))
                }
                _ => None,
            };
            let a = loads.sample()?;
            if let Some((g, id, runs)) = attached {
                if prog_stats(id)?.1 > runs && !stats_leak {
                    stats_leak = true;
                    eprintln!(
                        "{W}: WARNING: {} counted runs with kernel.bpf_stats_enabled=0: another process \
                         keeps BPF statistics on (a `pinguard run` with bpf_stats = true?); the throughput \
                         losses include bpf_stats' cost",
                        r.name
                    );
                }
                witness.look(&[g.pid()]);
                g.stop()?;
            }
            let after = loads.sample()?;
            let mut line = String::new();
            for (k, (&(load, _), ai)) in loads.loads.iter().zip(&a).enumerate() {
                let d = (before[k] + after[k]) / 2.0;
                r.ratios[k].push(ai / d);
                line.push_str(&format!(
                    "  {} {:.0} -> {:.0} {} ({:+.1}%)",
                    load.label(),
                    d,
                    ai,
                    load.unit(),
                    (ai / d - 1.0) * 100.0
                ));
            }
            eprintln!(
                "{W}: {} round {}/{}: {:<17}{line}",
                scenario.name(),
                round + 1,
                plan.rounds,
                r.name
            );
            before = after;
        }
    }
    Ok(ScenarioResult {
        scenario,
        stats_leak,
        loads: loads.loads.clone(),
        owner_tid: owners.first().map(|o| o.1),
        progs,
    })
}

/// Loss in % from attached/detached ratios: (median, least, most).
fn loss_pct(ratios: &[f64]) -> Option<(f64, f64, f64)> {
    let (min, med, max) = spread(ratios)?;
    Some((
        (1.0 - med) * 100.0,
        (1.0 - max) * 100.0,
        (1.0 - min) * 100.0,
    ))
}

fn floor_of(program: &str) -> Option<String> {
    program
        .strip_prefix("switch_")
        .map(|hook| format!("empty_{hook}"))
}

impl ScenarioResult {
    fn prog(&self, name: &str) -> Option<&ProgResult> {
        self.progs.iter().find(|p| p.name == name)
    }

    /// ns/event of `program` minus its hook's empty program, for load `k`.
    fn above_floor(&self, program: &str, k: usize) -> Option<f64> {
        let own = self.prog(program)?.costs.get(k)?.ns_per_event();
        let floor = self.prog(&floor_of(program)?)?.costs.get(k)?.ns_per_event();
        Some(own - floor)
    }
}

impl ObserverReport {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str("### Observer (sched_switch program)\n\n");
        if !self.strangers.is_empty() {
            s.push_str(&format!(
                "**Warning: other pinguards or guests ran meanwhile ({}): their programs ran on every \
                 sched_switch too.**\n\n",
                self.strangers.join(", ")
            ));
        }
        s.push_str(&format!(
            "{} rounds per scenario; in each round every program's attached run (~{} ms per load, median of \
             {CHUNKS} chunks for our ping-pongs) sits between two detached runs, program order rotating. \
             Targets for {SHIPPED} (what `pinguard run` attaches): ≤ {TARGET_NS_PER_EVENT:.0} ns per \
             sched_switch event, ≤ {TARGET_LOSS_PCT:.0}% throughput loss (median). ns/event = run_time_ns / \
             run_cnt from `bpftool prog show` with kernel.bpf_stats_enabled=1, averaged over every sched_switch \
             on both CPUs during one run of the load; it includes bpf_stats' own timing, which the empty_* \
             program on the same hook shows (the floor); \"above floor\" subtracts it. Loss = 1 − attached / \
             mean(detached before, after) per round: median [min..max]; negative = the attached run was faster \
             (noise).\n\n",
            self.rounds,
            self.run_len.as_millis()
        ));
        s.push_str(&self.summary());
        for sc in &self.scenarios {
            s.push_str(&format!("#### Scenario `{}`\n\n", sc.scenario.name()));
            s.push_str(sc.scenario.describe());
            s.push_str("  \nLoads: ");
            s.push_str(
                &sc.loads
                    .iter()
                    .map(|&(l, n)| l.describe(n))
                    .collect::<Vec<_>>()
                    .join("; "),
            );
            s.push_str(".\n\n");
            if sc.stats_leak {
                s.push_str(
                    "**Warning: another process kept BPF statistics enabled during the throughput runs \
                     (a `pinguard run` with bpf_stats = true?): the losses include bpf_stats' cost.**\n\n",
                );
            }
            s.push_str("| program |");
            for (l, _) in &sc.loads {
                let label = l.label();
                s.push_str(&format!(
                    " {label}: ns/event (above floor) | {label}: events/s | {label}: loss median [min..max] |"
                ));
            }
            s.push_str("\n|---|");
            for _ in &sc.loads {
                s.push_str("---:|---:|---|");
            }
            s.push('\n');
            for r in &sc.progs {
                let judge = r.name == SHIPPED;
                let name = if r.name == NONE {
                    "none (detached vs detached: noise)".to_string()
                } else if judge {
                    format!("**{}**", r.name)
                } else {
                    r.name.clone()
                };
                s.push_str(&format!("| {name} |"));
                for k in 0..sc.loads.len() {
                    let (ns, eps) = match r.costs.get(k) {
                        Some(c) => {
                            let ns = c.ns_per_event();
                            let above = match sc.above_floor(&r.name, k) {
                                Some(a) => format!(" ({a:+.1})"),
                                None => String::new(),
                            };
                            (
                                format!("{ns:.1}{above}{}", mark(judge, ns <= TARGET_NS_PER_EVENT)),
                                format!("{:.0}", c.events_per_sec()),
                            )
                        }
                        None => ("–".into(), "–".into()),
                    };
                    s.push_str(&format!(
                        " {ns} | {eps} | {} |",
                        fmt_loss(&r.ratios[k], judge)
                    ));
                }
                s.push('\n');
            }
            s.push('\n');
        }
        s
    }

    /// The shipped program against the targets, one row per scenario and load,
    /// with its hook's empty program next to it.
    fn summary(&self) -> String {
        let floor = floor_of(SHIPPED).unwrap_or_default();
        let mut s = format!(
            "Summary for {SHIPPED} (floor: {floor} on the same hook):\n\n\
             | scenario | load | ns/event | above floor | loss median | floor's loss median | loss above floor |\n\
             |---|---|---:|---:|---:|---:|---:|\n"
        );
        for sc in &self.scenarios {
            let (Some(prog), f) = (sc.prog(SHIPPED), sc.prog(&floor)) else {
                continue;
            };
            for (k, &(load, _)) in sc.loads.iter().enumerate() {
                let ns = prog.costs.get(k).map(EventCost::ns_per_event);
                let loss = loss_pct(&prog.ratios[k]).map(|l| l.0);
                let floor_loss = f.and_then(|f| loss_pct(&f.ratios[k])).map(|l| l.0);
                let opt = |v: Option<f64>, unit: &str| {
                    v.map_or("–".into(), |v| format!("{v:+.1}{unit}"))
                };
                s.push_str(&format!(
                    "| {} | {} | {}{} | {} | {}{} | {} | {} |\n",
                    sc.scenario.name(),
                    load.label(),
                    ns.map_or("–".into(), |v| format!("{v:.1}")),
                    ns.map_or("", |v| mark(true, v <= TARGET_NS_PER_EVENT)),
                    opt(sc.above_floor(SHIPPED, k), ""),
                    opt(loss, "%"),
                    loss.map_or("", |v| mark(true, v <= TARGET_LOSS_PCT)),
                    opt(floor_loss, "%"),
                    opt(loss.zip(floor_loss).map(|(a, b)| a - b), " pt"),
                ));
            }
        }
        s.push('\n');
        s
    }

    pub fn json(&self) -> Value {
        let loss = |v: &[f64]| match loss_pct(v) {
            Some((med, min, max)) => json!({
                "ratios": v, "loss_pct_median": med, "loss_pct_min": min, "loss_pct_max": max,
            }),
            None => Value::Null,
        };
        let scenarios: Vec<Value> = self
            .scenarios
            .iter()
            .map(|sc| {
                let loads: Vec<Value> = sc
                    .loads
                    .iter()
                    .enumerate()
                    .map(|(k, &(l, n))| {
                        let programs: Vec<Value> = sc
                            .progs
                            .iter()
                            .map(|r| {
                                let c = r.costs.get(k);
                                json!({
                                    "program": r.name,
                                    "ns_per_event": c.map(EventCost::ns_per_event),
                                    "ns_per_event_above_floor": sc.above_floor(&r.name, k),
                                    "events_per_sec": c.map(EventCost::events_per_sec),
                                    "run_time_ns": c.map(|c| c.run_time_ns),
                                    "run_cnt": c.map(|c| c.run_cnt),
                                    "throughput": loss(&r.ratios[k]),
                                })
                            })
                            .collect();
                        json!({
                            "load": l.label(),
                            "description": l.describe(n),
                            "size": n,
                            "programs": programs,
                        })
                    })
                    .collect();
                json!({
                    "scenario": sc.scenario.name(),
                    "bpf_stats_on_during_throughput_runs": sc.stats_leak,
                    "owner_tid": sc.owner_tid,
                    "loads": loads,
                })
            })
            .collect();
        json!({
            "strangers": self.strangers,
            "rounds": self.rounds,
            "run_ms": self.run_len.as_millis() as u64,
            "targets": {
                "program": SHIPPED,
                "ns_per_event_max": TARGET_NS_PER_EVENT,
                "loss_pct_median_max": TARGET_LOSS_PCT,
            },
            "scenarios": scenarios,
        })
    }
}

fn mark(judge: bool, ok: bool) -> &'static str {
    match (judge, ok) {
        (false, _) => "",
        (true, true) => " ✓",
        (true, false) => " ✗",
    }
}

fn fmt_loss(ratios: &[f64], judge: bool) -> String {
    match loss_pct(ratios) {
        Some((med, min, max)) => format!(
            "{med:+.1}% [{min:+.1}..{max:+.1}]{}",
            mark(judge, med <= TARGET_LOSS_PCT)
        ),
        None => "–".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_from_ratios() {
        let (med, min, max) = loss_pct(&[1.01, 0.97, 0.98]).unwrap();
        assert!((med - 2.0).abs() < 1e-9);
        assert!((min - -1.0).abs() < 1e-9);
        assert!((max - 3.0).abs() < 1e-9);
        assert_eq!(loss_pct(&[]), None);
    }

    #[test]
    fn perf_output_parses() {
        let out = "# Running 'sched/pipe' benchmark:\n\n     Total time: 0.532 [sec]\n\n      26.600650 usecs/op\n          37593 ops/sec\n";
        let ops = parse_perf_pipe(out).unwrap();
        assert!((ops - 37593.0).abs() < 1.0, "{ops}");
        assert_eq!(parse_perf_pipe("garbage\n"), None);
    }

    #[test]
    fn prog_matched_by_name_pid_and_novelty() {
        let progs = json!([
            {"id": 1, "name": "switch_tracepoi", "pids": [{"pid": 99, "comm": "other"}]},
            {"id": 2, "name": "switch_tracepoi", "pids": [{"pid": 42, "comm": "pinguard"}]},
            {"id": 3, "name": "empty_tracepoint"},
            {"id": 4, "name": "empty_tracepoint"},
            {"id": 5, "name": "switch_tp_btf"},
        ]);
        assert_eq!(matching_ids(&progs, "switch_tracepoint", None), [1, 2]);
        assert_eq!(
            our_prog_id(&progs, "switch_tracepoint", 42, &[]).unwrap(),
            2
        );
        // bpftool without holder info: only the program that is new counts.
        assert_eq!(our_prog_id(&progs, "empty_tracepoint", 7, &[3]).unwrap(), 4);
        assert!(our_prog_id(&progs, "empty_tracepoint", 7, &[]).is_err());
        assert!(our_prog_id(&progs, "switch_tp_btf", 7, &[5]).is_err());
        assert!(our_prog_id(&progs, "switch_raw_tp", 7, &[]).is_err());
    }

    #[test]
    fn floors_pair_by_hook() {
        assert_eq!(floor_of("switch_raw_tp").as_deref(), Some("empty_raw_tp"));
        assert_eq!(floor_of("empty_raw_tp"), None);
    }

    #[test]
    fn every_scenario_has_a_pipe_load() {
        for s in Scenario::ALL {
            for perf in [false, true] {
                let loads = s.loads(perf);
                assert!(matches!(loads[0], Load::Pipe { .. }), "{s:?}");
                assert!(loads.len() > usize::from(perf && s != Scenario::Owner));
            }
        }
    }

    #[test]
    fn ping_pong_on_one_and_two_cpus() {
        // Needs CPUs 0 and 1; every machine this project targets has them.
        if std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
            return;
        }
        let p = PingPong::new(OTHER_CPU).unwrap();
        assert_ne!(p.ping_tid, p.pong_tid);
        assert!(p.run(OTHER_CPU, 100).unwrap() > Duration::ZERO);
        assert!(p.run(GUARDED_CPU, 100).unwrap() > Duration::ZERO);
    }
}
