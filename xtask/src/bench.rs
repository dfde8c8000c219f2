//! `cargo xtask bench`: the eBPF observer's overhead on this machine.
//!
//! a) ns/event: with `kernel.bpf_stats_enabled=1` the kernel accounts each
//!    program's run time and run count; their ratio over a fixed load is the
//!    cost of one sched_switch event.
//! b) throughput loss: a cross-CPU pipe ping-pong (CPU 0 <-> guarded CPU 1),
//!    detached vs attached, with bpf_stats off (it adds its own cost). Shared
//!    VMs drift by several percent, so each attached run sits between two
//!    detached runs, the program order rotates per round, and we report the
//!    spread of the per-round ratios.
//!
//! Targets are printed next to the results but never fail the run: this is a
//! measurement. Errors (cannot attach, cannot pin, bpftool missing) do.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal},
    unistd::Pid,
};
use serde_json::{Value, json};

use crate::{build, util};

const W: &str = "bench";

/// The real observer on three hook kinds, then empty programs on the same hooks (the floor).
const PROGRAMS: &[&str] = &[
    "switch_tp_btf",
    "switch_raw_tp",
    "switch_tracepoint",
    "empty_tp_btf",
    "empty_raw_tp",
    "empty_tracepoint",
];
/// Pseudo-program: attach nothing. Its "loss" is the noise of a detached-vs-detached pair.
const NONE: &str = "none";

const TARGET_NS_PER_EVENT: f64 = 100.0;
const TARGET_LOSS_PCT: f64 = 3.0;
/// The guarded CPU the attach command configures, and the housekeeping CPU.
const GUARDED_CPU: usize = 1;
const OTHER_CPU: usize = 0;
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The kernel keeps BPF_OBJ_NAME_LEN - 1 characters of a program's name.
const KERNEL_NAME_LEN: usize = 15;
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Each ping-pong run is split into this many chunks; its throughput is their median.
const CHUNKS: u64 = 5;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Interleaved detached/attached rounds (default 7, or 3 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// About one minute instead of about five: fewer rounds, shorter runs.
    #[arg(long)]
    quick: bool,
    /// Program to measure (repeatable; default: all six). `none` attaches
    /// nothing: its loss is the detached-vs-detached noise floor.
    #[arg(long = "program", value_name = "NAME")]
    programs: Vec<String>,
    /// Round trips per ping-pong run (default: calibrated to the run length,
    /// then fixed for the whole benchmark).
    #[arg(long, value_name = "N")]
    round_trips: Option<u64>,
    /// Skip the second load (`perf bench sched pipe`).
    #[arg(long)]
    no_perf: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Ctrl-C / SIGTERM only set a flag, so the benchmark stops at the next step
/// and the Drop guards (bpf_stats, attached children) run.
fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { signal::sigaction(sig, &action) }
            .with_context(|| format!("installing the {sig} handler"))?;
    }
    Ok(())
}

struct Plan {
    rounds: u32,
    programs: Vec<String>,
    /// Wall time one load run should take, used to calibrate N.
    run_len: Duration,
    round_trips: u64,
    perf_loops: Option<u64>,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let programs = if args.programs.is_empty() {
        PROGRAMS.iter().map(|p| p.to_string()).collect()
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
    let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 7 });
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let real: Vec<String> = programs.iter().filter(|p| *p != NONE).cloned().collect();
    if !real.is_empty() && !util::is_root() {
        bail!("bench loads eBPF programs and sets kernel.bpf_stats_enabled: run it as root");
    }
    install_signal_handlers()?;

    let bin = if real.is_empty() {
        None
    } else {
        build::run()?;
        let bin = util::pinguard_bin()?;
        which("bpftool").context("bpftool not found (cargo xtask setup installs it)")?;
        Some(bin)
    };

    let run_len = Duration::from_millis(if args.quick { 300 } else { 600 });
    let idle_before = idle_pct(Duration::from_secs(1))?;
    warn_if_busy(idle_before, "before");
    eprintln!("{W}: warming up and calibrating the loads");
    let round_trips = match args.round_trips {
        Some(0) => bail!("--round-trips must be at least 1"),
        Some(n) => n,
        None => calibrate_ping_pong(run_len)?,
    };
    let perf_loops = if args.no_perf {
        None
    } else {
        calibrate_perf(run_len)
    };
    let plan = Plan {
        rounds,
        programs,
        run_len,
        round_trips,
        perf_loops,
    };
    eprintln!(
        "{W}: {} rounds x {} programs; ping-pong {} round trips CPU {OTHER_CPU}<->{GUARDED_CPU}{}",
        plan.rounds,
        plan.programs.len(),
        plan.round_trips,
        match plan.perf_loops {
            Some(n) => format!("; taskset -c {GUARDED_CPU} perf bench sched pipe -l {n}"),
            None => String::new(),
        }
    );

    let mut results: Vec<ProgResult> = plan
        .programs
        .iter()
        .map(|p| ProgResult::new(p.clone()))
        .collect();

    // Restores the sysctl on every exit path, including errors and Ctrl-C.
    let stats = match &bin {
        Some(_) => Some(BpfStats::capture()?),
        None => None,
    };
    if let (Some(bin), Some(stats)) = (&bin, &stats) {
        stats.set(true)?;
        for r in results.iter_mut().filter(|r| r.name != NONE) {
            check_interrupted()?;
            r.stats = Some(measure_ns_per_event(bin, &r.name, plan.round_trips)?);
        }
    }
    if let Some(stats) = &stats {
        stats.set(false)?;
    }

    for round in 0..plan.rounds {
        let n = results.len();
        for i in 0..n {
            check_interrupted()?;
            let r = &mut results[(i + round as usize) % n];
            let (d, a) = sandwich(bin.as_deref(), &r.name, &plan)?;
            r.ping_pong.push(a.ping_pong / d.ping_pong);
            if let (Some(dp), Some(ap)) = (d.perf, a.perf) {
                r.perf.push(ap / dp);
            }
            eprintln!(
                "{W}: round {}/{}: {:<17} ping-pong {:>8.0} -> {:>8.0} rt/s ({:+.1}%){}",
                round + 1,
                plan.rounds,
                r.name,
                d.ping_pong,
                a.ping_pong,
                (a.ping_pong / d.ping_pong - 1.0) * 100.0,
                match (d.perf, a.perf) {
                    (Some(dp), Some(ap)) => format!(
                        "; perf pipe {dp:.0} -> {ap:.0} ops/s ({:+.1}%)",
                        (ap / dp - 1.0) * 100.0
                    ),
                    _ => String::new(),
                }
            );
        }
    }
    drop(stats);
    let idle_after = idle_pct(Duration::from_secs(1))?;
    warn_if_busy(idle_after, "after");

    let report = Report::new(&plan, &results, [idle_before, idle_after]);
    let md = report.markdown();
    println!("{md}");
    let out = util::root().join("bench-out");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    fs::write(out.join("bench.md"), &md).context("writing bench-out/bench.md")?;
    let json = serde_json::to_string_pretty(&report.json()).context("serializing the results")?;
    fs::write(out.join("bench.json"), json + "\n").context("writing bench-out/bench.json")?;
    eprintln!("{W}: wrote bench-out/bench.md and bench-out/bench.json");
    Ok(())
}

/// Detached, attached, detached, back to back: comparing the attached run with
/// the mean of its two neighbours cancels a linear drift of the machine.
fn sandwich(bin: Option<&Path>, program: &str, plan: &Plan) -> Result<(Sample, Sample)> {
    let d1 = Sample::take(plan)?;
    let guard = match bin {
        Some(bin) if program != NONE => Some(Attached::start(bin, program)?),
        _ => None,
    };
    let a = Sample::take(plan)?;
    if let Some(g) = guard {
        g.stop()?;
    }
    let d2 = Sample::take(plan)?;
    let d = Sample {
        ping_pong: (d1.ping_pong + d2.ping_pong) / 2.0,
        perf: d1.perf.zip(d2.perf).map(|(x, y)| (x + y) / 2.0),
    };
    Ok((d, a))
}

/// Throughput of each load in one configuration.
struct Sample {
    ping_pong: f64,
    perf: Option<f64>,
}

impl Sample {
    fn take(plan: &Plan) -> Result<Self> {
        // The median of a few chunks ignores a short burst of host noise (a
        // neighbour's vCPU, a kworker) that would otherwise move the whole run.
        let chunk = (plan.round_trips / CHUNKS).max(1);
        let mut rates = Vec::new();
        for _ in 0..CHUNKS {
            rates.push(chunk as f64 / ping_pong(chunk)?.as_secs_f64());
        }
        let (_, ping_pong, _) = spread(&rates).context("no ping-pong chunks")?;
        let perf = match plan.perf_loops {
            Some(n) => Some(perf_pipe(n)?),
            None => None,
        };
        Ok(Self { ping_pong, perf })
    }
}

struct ProgResult {
    name: String,
    stats: Option<EventCost>,
    /// Per-round attached/detached throughput ratios.
    ping_pong: Vec<f64>,
    perf: Vec<f64>,
}

impl ProgResult {
    fn new(name: String) -> Self {
        Self {
            name,
            stats: None,
            ping_pong: Vec::new(),
            perf: Vec::new(),
        }
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

fn measure_ns_per_event(bin: &Path, program: &str, round_trips: u64) -> Result<EventCost> {
    let existing = matching_ids(&bpftool_progs()?, program, None);
    let guard = Attached::start(bin, program)?;
    let id = our_prog_id(&bpftool_progs()?, program, guard.pid(), &existing)?;
    let before = prog_stats(id)?;
    let t = Instant::now();
    ping_pong(round_trips)?;
    let window = t.elapsed();
    let after = prog_stats(id)?;
    guard.stop()?;
    let cost = EventCost {
        run_time_ns: after.0.saturating_sub(before.0),
        run_cnt: after.1.saturating_sub(before.1),
        window,
    };
    if cost.run_cnt == 0 {
        bail!(
            "{program} (BPF prog id {id}) ran 0 times during the load: loaded but not attached to sched_switch?"
        );
    }
    eprintln!(
        "{W}: {program}: {:.1} ns/event over {} events ({:.0} events/s)",
        cost.ns_per_event(),
        cost.run_cnt,
        cost.events_per_sec()
    );
    Ok(cost)
}

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new("bpftool");
    cmd.args(args).arg("--json");
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
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`{}` printed invalid JSON", util::show(&cmd)))
}

fn bpftool_progs() -> Result<Value> {
    bpftool_json(&["prog", "show"])
}

/// (run_time_ns, run_cnt) of one program. bpftool omits both while zero.
fn prog_stats(id: u64) -> Result<(u64, u64)> {
    let p = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
    Ok((
        p["run_time_ns"].as_u64().unwrap_or(0),
        p["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// IDs of programs called `program` and, when given and bpftool reports
/// holders (builds with skeleton support), held by `pid`. The kernel keeps 15
/// characters of a name; bpftool shows the full one when BTF has it.
fn matching_ids(progs: &Value, program: &str, pid: Option<u32>) -> Vec<u64> {
    let truncated: String = program.chars().take(KERNEL_NAME_LEN).collect();
    progs
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n == program || n == truncated)
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

/// Remembers kernel.bpf_stats_enabled and puts it back on drop.
struct BpfStats {
    old: String,
}

impl BpfStats {
    fn capture() -> Result<Self> {
        let old = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS} (kernel too old for BPF stats?)"))?;
        Ok(Self {
            old: old.trim().to_string(),
        })
    }

    fn set(&self, on: bool) -> Result<()> {
        let v = if on { "1" } else { "0" };
        fs::write(BPF_STATS, v).with_context(|| format!("writing {v} to {BPF_STATS}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        match fs::write(BPF_STATS, &self.old) {
            Ok(()) => eprintln!("{W}: restored kernel.bpf_stats_enabled = {}", self.old),
            Err(e) => eprintln!(
                "{W}: WARNING: could not restore kernel.bpf_stats_enabled = {}: {e}; \
                 run `sysctl kernel.bpf_stats_enabled={}`",
                self.old, self.old
            ),
        }
    }
}

/// A `pinguard attach --program NAME` child; SIGTERM + wait on drop.
struct Attached {
    child: Option<Child>,
    name: String,
    stderr: Arc<Mutex<String>>,
}

impl Attached {
    fn start(bin: &Path, name: &str) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args([
            "attach",
            "--guard",
            &GUARDED_CPU.to_string(),
            "--program",
            name,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: Ctrl-C reaches only us, and we stop it in order.
        .process_group(0);
        let shown = util::show(&cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start `{shown}`"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut stderr_pipe = child.stderr.take().context("child stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut me = Self {
            child: Some(child),
            name: name.to_string(),
            stderr: stderr.clone(),
        };
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = stderr.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        // Keeps draining stdout after the "attached" line so the child never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let want = format!("attached {name}");
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            check_interrupted()?;
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.trim() == want => return Ok(me),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "`{shown}` did not print {want:?} within {}s{}",
                        ATTACH_TIMEOUT.as_secs(),
                        me.stderr_tail()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = me.child.take().map(|mut c| c.wait());
                    let status = match status {
                        Some(Ok(s)) => util::describe(s),
                        _ => "unknown status".into(),
                    };
                    // Give the stderr reader a moment to collect the last words.
                    std::thread::sleep(Duration::from_millis(50));
                    bail!(
                        "`{shown}` exited ({status}) before printing {want:?}{}",
                        me.stderr_tail()
                    )
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stderr_tail(&self) -> String {
        let s = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = &lines[lines.len().saturating_sub(15)..];
        format!("; its stderr:\n  {}", tail.join("\n  "))
    }

    /// SIGTERM, then expect a clean exit (0) within the timeout.
    fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        if let Ok(None) = child.try_wait() {
            let _ = signal::kill(pid, Signal::SIGTERM);
        }
        match wait_timeout(&mut child, STOP_TIMEOUT)? {
            Some(s) if s.success() => Ok(()),
            Some(s) => bail!(
                "pinguard attach --program {} exited with {} on SIGTERM{}",
                self.name,
                util::describe(s),
                self.stderr_tail()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "pinguard attach --program {} did not exit within {}s of SIGTERM (killed){}",
                    self.name,
                    STOP_TIMEOUT.as_secs(),
                    self.stderr_tail()
                )
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            if !matches!(
                wait_timeout(&mut child, Duration::from_secs(5)),
                Ok(Some(_))
            ) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().context("waiting for pinguard attach")? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pin_current_thread(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} is out of range"))?;
    sched_setaffinity(Pid::from_raw(0), &set)
        .with_context(|| format!("cannot pin the ping-pong thread to CPU {cpu} (offline?)"))
}

/// `round_trips` one-byte round trips between a thread on CPU 0 and one on the
/// guarded CPU 1 over two pipes: every round trip is two context switches on
/// each CPU. Returns the time the round trips took.
fn ping_pong(round_trips: u64) -> Result<Duration> {
    let (mut rx1, mut tx1) = std::io::pipe().context("pipe")?;
    let (mut rx2, mut tx2) = std::io::pipe().context("pipe")?;
    let barrier = Barrier::new(2);
    let barrier = &barrier;
    std::thread::scope(|s| {
        // Each thread owns its pipe ends: if one fails, the other sees EOF/EPIPE
        // instead of blocking forever. Both reach the barrier even if pinning failed.
        let pong = s.spawn(move || -> Result<()> {
            let pinned = pin_current_thread(GUARDED_CPU);
            barrier.wait();
            pinned?;
            let mut b = [0u8; 1];
            for _ in 0..round_trips {
                rx1.read_exact(&mut b).context("pong read")?;
                tx2.write_all(&b).context("pong write")?;
            }
            Ok(())
        });
        let ping = s.spawn(move || -> Result<Duration> {
            let pinned = pin_current_thread(OTHER_CPU);
            barrier.wait();
            pinned?;
            let mut b = [7u8; 1];
            let t = Instant::now();
            for _ in 0..round_trips {
                tx1.write_all(&b).context("ping write")?;
                rx2.read_exact(&mut b).context("ping read")?;
            }
            Ok(t.elapsed())
        });
        let took = ping
            .join()
            .map_err(|_| anyhow::anyhow!("ping thread panicked"))?;
        let pong = pong
            .join()
            .map_err(|_| anyhow::anyhow!("pong thread panicked"))?;
        let took = took?;
        pong?;
        Ok(took)
    })
}

/// Warm up, then pick N so that one run takes about `run_len`.
fn calibrate_ping_pong(run_len: Duration) -> Result<u64> {
    ping_pong(2_000)?;
    let n = 5_000;
    let took = ping_pong(n)?;
    let rate = n as f64 / took.as_secs_f64();
    Ok(((rate * run_len.as_secs_f64()) as u64).clamp(1_000, 10_000_000))
}

/// `perf bench sched pipe -l N` with both processes on the guarded CPU: ops/s.
/// A second, different load: every op is a same-CPU context switch, each one
/// through the observer's full (guarded CPU) path. Unpinned, the scheduler's
/// placement of the pair swings the result by 2x.
fn perf_pipe(loops: u64) -> Result<f64> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &GUARDED_CPU.to_string()]).args([
        "perf",
        "bench",
        "sched",
        "pipe",
        "-l",
        &loops.to_string(),
    ]);
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`", util::show(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            util::show(&cmd),
            util::describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_perf_pipe(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
        format!(
            "no \"usecs/op\" line in the output of `{}`",
            util::show(&cmd)
        )
    })
}

/// ops/s from perf's "  26.600650 usecs/op" line (more digits than its ops/sec line).
fn parse_perf_pipe(out: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let v: f64 = it.next()?.parse().ok()?;
        (it.next()? == "usecs/op" && v > 0.0).then(|| 1e6 / v)
    })
}

/// Loops for ~`run_len`, or None (with a note) when perf cannot run here.
fn calibrate_perf(run_len: Duration) -> Option<u64> {
    match perf_pipe(2_000) {
        Ok(ops) => Some(((ops * run_len.as_secs_f64()) as u64).clamp(1_000, 10_000_000)),
        Err(e) => {
            eprintln!("{W}: note: skipping the perf load: {e:#}");
            None
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join(program))
        .find(|p| p.is_file())
}

/// min, median, max.
fn spread(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some((s[0], median, s[n - 1]))
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

/// Below this share of idle CPU time, others' work swamps the effect we measure.
const QUIET_IDLE_PCT: f64 = 90.0;

/// Share of all CPUs' time spent idle over `over`, from /proc/stat.
fn idle_pct(over: Duration) -> Result<f64> {
    let sample = || -> Result<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no \"cpu\" line")?;
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 8 {
            bail!("unexpected /proc/stat line: {line}");
        }
        Ok((v[3] + v[4], v.iter().sum()))
    };
    let (idle0, total0) = sample()?;
    std::thread::sleep(over);
    let (idle1, total1) = sample()?;
    let total = total1.saturating_sub(total0).max(1);
    Ok(idle1.saturating_sub(idle0) as f64 * 100.0 / total as f64)
}

fn warn_if_busy(idle: f64, when: &str) {
    if idle < QUIET_IDLE_PCT {
        eprintln!(
            "{W}: WARNING: CPUs only {idle:.0}% idle {when} the benchmark: other work makes the \
             throughput numbers noisy; rerun on a quiet machine"
        );
    }
}

struct Report<'a> {
    plan: &'a Plan,
    idle: [f64; 2],
    results: &'a [ProgResult],
    command: String,
    kernel: String,
    cpu: String,
    date: String,
}

impl<'a> Report<'a> {
    fn new(plan: &'a Plan, results: &'a [ProgResult], idle: [f64; 2]) -> Self {
        let command = std::iter::once("cargo xtask".to_string())
            .chain(std::env::args().skip(1).map(|a| util::shell_quote(&a)))
            .collect::<Vec<_>>()
            .join(" ");
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        Self {
            plan,
            idle,
            results,
            command,
            kernel,
            cpu,
            date: utc_now(),
        }
    }

    fn markdown(&self) -> String {
        let p = self.plan;
        let mut s = String::new();
        s.push_str("## pinguard eBPF observer overhead\n\n");
        s.push_str(&format!("Command: `{}`  \n", self.command));
        s.push_str(&format!(
            "Date: {} · kernel {} · {} · {} online CPUs  \n",
            self.date,
            self.kernel,
            self.cpu,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ));
        let [before, after] = self.idle;
        s.push_str(&format!(
            "CPUs idle before/after the run (1 s each): {before:.0}% / {after:.0}%{}  \n",
            if before.min(after) < QUIET_IDLE_PCT {
                " — **busy machine: throughput losses are mostly noise**"
            } else {
                ""
            }
        ));
        s.push_str(&format!(
            "Load: {} round trips of a 1-byte pipe ping-pong between CPU {OTHER_CPU} and guarded CPU {GUARDED_CPU}{}; \
             {} rounds; each round runs detached, attached, detached back to back (~{} ms each) per program, \
             program order rotating.  \n",
            p.round_trips,
            match p.perf_loops {
                Some(n) => format!(
                    ", and `taskset -c {GUARDED_CPU} perf bench sched pipe -l {n}` (same-CPU ping-pong)"
                ),
                None => String::new(),
            },
            p.rounds,
            p.run_len.as_millis()
        ));
        s.push_str(&format!(
            "Targets (switch_* programs; empty_* are the hook's floor): ≤ {TARGET_NS_PER_EVENT:.0} ns per \
             sched_switch event, ≤ {TARGET_LOSS_PCT:.0}% throughput loss (median). ns/event = run_time_ns / run_cnt \
             from `bpftool prog show` with kernel.bpf_stats_enabled=1, averaged over every sched_switch on both CPUs. Loss = 1 − attached / mean(detached before, after) \
             throughput per round: median [min..max] over rounds; negative = attached run was faster (noise).\n\n"
        ));
        let perf = p.perf_loops.is_some();
        s.push_str("| program | ns/event | events/s | ping-pong loss median [min..max] |");
        if perf {
            s.push_str(" perf pipe loss median [min..max] |");
        }
        s.push_str("\n|---|---:|---:|---|");
        if perf {
            s.push_str("---|");
        }
        s.push('\n');
        for r in self.results {
            let is_switch = r.name.starts_with("switch_");
            let (ns, eps) = match &r.stats {
                Some(c) => {
                    let ns = c.ns_per_event();
                    let mark = if !is_switch {
                        ""
                    } else if ns <= TARGET_NS_PER_EVENT {
                        " ✓"
                    } else {
                        " ✗ (> target)"
                    };
                    (
                        format!("{ns:.1}{mark}"),
                        format!("{:.0}", c.events_per_sec()),
                    )
                }
                None => ("–".into(), "–".into()),
            };
            let name = if r.name == NONE {
                "none (detached vs detached: noise)".to_string()
            } else {
                r.name.clone()
            };
            s.push_str(&format!(
                "| {name} | {ns} | {eps} | {} |",
                fmt_loss(&r.ping_pong, is_switch)
            ));
            if perf {
                s.push_str(&format!(" {} |", fmt_loss(&r.perf, is_switch)));
            }
            s.push('\n');
        }
        s
    }

    fn json(&self) -> Value {
        let p = self.plan;
        let loss = |v: &[f64]| match loss_pct(v) {
            Some((med, min, max)) => json!({
                "ratios": v, "loss_pct_median": med, "loss_pct_min": min, "loss_pct_max": max,
            }),
            None => Value::Null,
        };
        let programs: Vec<Value> = self
            .results
            .iter()
            .map(|r| {
                json!({
                    "program": r.name,
                    "ns_per_event": r.stats.as_ref().map(EventCost::ns_per_event),
                    "events_per_sec": r.stats.as_ref().map(EventCost::events_per_sec),
                    "run_time_ns": r.stats.as_ref().map(|c| c.run_time_ns),
                    "run_cnt": r.stats.as_ref().map(|c| c.run_cnt),
                    "ping_pong": loss(&r.ping_pong),
                    "perf_pipe": loss(&r.perf),
                })
            })
            .collect();
        json!({
            "command": self.command,
            "date": self.date,
            "kernel": self.kernel,
            "cpu": self.cpu,
            "rounds": p.rounds,
            "round_trips": p.round_trips,
            "perf_loops": p.perf_loops,
            "run_ms": p.run_len.as_millis() as u64,
            "idle_pct_before": self.idle[0],
            "idle_pct_after": self.idle[1],
            "targets": { "ns_per_event_max": TARGET_NS_PER_EVENT, "loss_pct_median_max": TARGET_LOSS_PCT },
            "programs": programs,
        })
    }
}

fn fmt_loss(ratios: &[f64], judge: bool) -> String {
    match loss_pct(ratios) {
        Some((med, min, max)) => {
            let mark = match (judge, med <= TARGET_LOSS_PCT) {
                (false, _) => "",
                (true, true) => " ✓",
                (true, false) => " ✗ (> target)",
            };
            format!("{med:+.1}% [{min:+.1}..{max:+.1}]{mark}")
        }
        None => "–".into(),
    }
}

/// "YYYY-MM-DD HH:MM UTC" without a date crate.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_loss() {
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[1.0, 0.9, 0.95]), Some((0.9, 0.95, 1.0)));
        assert_eq!(spread(&[1.0, 0.9]), Some((0.9, 0.95, 1.0)));
        let (med, min, max) = loss_pct(&[1.01, 0.97, 0.98]).unwrap();
        assert!((med - 2.0).abs() < 1e-9);
        assert!((min - -1.0).abs() < 1e-9);
        assert!((max - 3.0).abs() < 1e-9);
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
    fn date_is_civil() {
        let d = utc_now();
        assert!(d.len() == 20 && d.ends_with(" UTC"), "{d}");
        assert!(d.starts_with("20"), "{d}");
    }

    #[test]
    fn ping_pong_runs() {
        // Needs CPUs 0 and 1; every machine this project targets has them.
        if std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
            return;
        }
        let took = ping_pong(100).unwrap();
        assert!(took > Duration::ZERO);
    }
}
