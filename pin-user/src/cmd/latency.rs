//! `pinguard latency`: run cyclictest on a guarded CPU while the probe records
//! every noise source there, then report the latency and why its worst
//! wake-ups were late. `--compare` tabulates saved reports.
use std::{
    io::Write as _,
    os::unix::{fs::DirBuilderExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use pin_common::watch;
use tokio::io::unix::AsyncFd;

use crate::{
    bpf::{
        class::ThreadClass,
        events::{DecodeError, KernelEvent},
        probe::{Counters, EventReader, Probe, ProbeConfig},
    },
    cli::LatencyArgs,
    cmd::{move_self_to, policy, runtime, wait_for_stop},
    control::{self, Allow, Client, DaemonInfo},
    exit,
    host::Host,
    host::cpulist::CpuSet,
    host::irq::irq_name,
    host::procfs::{Proc, Sched},
    host::topology::Topology,
    latency::{
        CyclictestConfig, CyclictestHistogram, CyclictestJson, SchedPolicy,
        attribution::Recorder,
        check_sched, compare, find_cyclictest,
        host::{HostFacts, steal_ticks, ticks_per_second},
        parse_cyclictest_json, parse_histogram, plot,
        report::{CyclictestInfo, Inputs, NoiseTotals, ProbeHealth, ProbeMaps, Report, RunInfo},
    },
    placement::plan::Plan,
};

/// How long cyclictest may take to start its measurement thread.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long cyclictest may take to print its results after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the measurement thread may run before its scheduling policy must
/// be the asked one: the thread sets it itself, right after it starts.
const POLICY_GRACE: Duration = Duration::from_millis(300);

pub fn run(args: LatencyArgs) -> anyhow::Result<ExitCode> {
    if !args.compare.is_empty() {
        return compare(&args);
    }
    let topo = Topology::read()?;
    let policy_config = policy::load(&args.policy)?;
    let guard = policy::guard(&topo, &args.guard, &policy_config)?;
    let cpu = match args.cpu {
        Some(c) if guard.guarded.contains(c) => c,
        Some(c) => bail!(
            "--cpu {c}: CPU {c} is not guarded (guarded CPUs: {}); add it to --guard",
            guard.guarded
        ),
        None => guard.guarded.first().context("no guarded CPU to measure")?,
    };
    let sched_policy: SchedPolicy = args.sched_policy.into();
    let config = CyclictestConfig {
        cpu,
        main_cpus: guard.housekeeping.clone(),
        policy: sched_policy,
        priority: args
            .priority
            .unwrap_or_else(|| sched_policy.default_priority()),
        interval: args.interval,
        duration: args.duration,
        histogram_max: args.histogram_max,
        extra: args.extra.clone(),
    };
    config.validate()?;
    if let Some(vm) = &args.vm {
        return super::latency_vm::run(&args, vm, &topo, &guard, &policy_config, config);
    }
    let cyclictest = find_cyclictest()?;
    if args.svg.is_some() || args.png.is_some() {
        // Fail before a long run, not after it.
        plot::ensure_font()?;
    }
    // vCPUs on the measured CPU are named as such, not as intruders.
    let plan = policy::plan_for_observers(&topo, &guard, &policy_config);
    move_self_to(&guard.housekeeping)?;
    let host = HostFacts::read(
        &Host::default(),
        &guard.guarded.to_string(),
        &guard.housekeeping.to_string(),
    );
    let mut report = runtime()?.block_on(measure(&cyclictest, &config, args.worst, host, &plan))?;
    let pictures = plot::write_pictures(&report, args.svg.as_deref(), args.png.as_deref())?;
    report.pictures = pictures.iter().map(|p| p.display().to_string()).collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", crate::latency::report::render_text(&report))?;
    }
    out.flush()?;
    Ok(ExitCode::from(exit::OK))
}

fn compare(args: &LatencyArgs) -> anyhow::Result<ExitCode> {
    let thresholds: Vec<u64> = if args.above.is_empty() {
        compare::DEFAULT_THRESHOLDS_US.to_vec()
    } else {
        args.above.iter().map(|d| d.as_micros() as u64).collect()
    };
    if args.svg.is_some() || args.png.is_some() {
        plot::ensure_font()?;
    }
    let mut runs = Vec::new();
    for p in &args.compare {
        runs.push(compare::load(p, &thresholds)?);
    }
    compare::label_runs(&mut runs, &args.label)?;
    let mut table = compare::Comparison::new(runs, &thresholds);
    let pictures = plot::write_overlay(&table.runs, args.svg.as_deref(), args.png.as_deref())?;
    table.pictures = pictures.iter().map(|p| p.display().to_string()).collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&table)?)?;
    } else {
        write!(out, "{}", compare::render(&table, !args.label.is_empty()))?;
    }
    out.flush()?;
    Ok(ExitCode::from(exit::OK))
}

pub(super) fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC is what bpf_ktime_get_ns() reads.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

pub(super) fn steal_ns(cpu: u32) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    steal_ticks(&stat, cpu).map(|t| t * 1_000_000_000 / ticks_per_second())
}

/// Threads of cyclictest other than its main thread: the measurement thread.
fn measurement_threads(pid: u32) -> Vec<u32> {
    Proc::default()
        .tids(pid)
        .unwrap_or_default()
        .into_iter()
        .filter(|t| *t != pid)
        .collect()
}

/// Classifies a thread that ran before cyclictest and is no intruder (None: it is gone).
pub(super) fn resolve_class(tid: u32) -> Option<ThreadClass> {
    let proc = Proc::default();
    let info = proc
        .tgid_of(tid)
        .ok()
        .flatten()
        .and_then(|tgid| proc.thread(tgid, tid).ok().flatten());
    info.map(|t| {
        if t.is_kthread() {
            ThreadClass::Kernel
        } else {
            ThreadClass::Allowed
        }
    })
}

/// Loads the probe for `cpu` with noise events on: every intruder slice,
/// IRQ and softirq during a wait becomes an event.
pub(super) fn load_probe(cpu: u32) -> anyhow::Result<(Probe, AsyncFd<EventReader>)> {
    let mut probe_config = ProbeConfig::new(CpuSet::single(cpu));
    // Every intruder slice is an event: the worst wake-ups need all of them.
    probe_config.event_interval = Duration::ZERO;
    probe_config.migrations = false;
    probe_config.affinity = false;
    probe_config.lifecycle = false;
    probe_config.noise = true;
    // Episodes start at the probe's wake-up: only this short run pays for a
    // program on every wake-up of the host (the daemon does not attach it).
    probe_config.wakeups = true;
    // Every slice, IRQ and softirq during a wait is an event: room for bursts
    // while the reader is busy (16 MiB, against 256 KiB for the daemon).
    probe_config.events_bytes = 16 << 20;
    let mut probe = Probe::load(&probe_config)?;
    // Every IRQ and softirq too: each worst wake-up names the ones inside it.
    probe.set_noise_events(true)?;
    let events = probe
        .take_events()?
        .into_async()
        .context("polling the event ring buffer")?;
    Ok((probe, events))
}

/// Watching cyclictest while it runs: its measurement thread is handed to
/// the probe as soon as it exists, and a cyclictest that ignores SIGINT is
/// killed.
struct Supervisor<'a> {
    cpu: u32,
    pid: u32,
    policy: SchedPolicy,
    priority: u32,
    /// The measurement thread's class as last read from /proc, and when the
    /// thread was first seen.
    sched: Option<Sched>,
    seen_at: Option<Instant>,
    duration: Duration,
    cmdline: &'a str,
    start: Instant,
    /// The measurement threads, once seen.
    watched: Vec<u32>,
    interrupted_at: Option<Instant>,
    /// The running daemon, told about the measurement threads.
    control: Option<Client>,
}

impl Supervisor<'_> {
    /// One periodic look: `Some` once cyclictest has exited.
    fn tick(
        &mut self,
        ct: &mut Cyclictest,
        probe: &mut Probe,
    ) -> anyhow::Result<Option<ExitStatus>> {
        let (cpu, pid) = (self.cpu, self.pid);
        if let Some(status) = ct.try_wait()? {
            return Ok(Some(status));
        }
        if self.watched.is_empty() {
            for tid in measurement_threads(pid) {
                probe.set_watched(tid, watch::PROBE)?;
                // Its own slices are the measurement, not intrusions.
                probe.set_allowed(tid, Some(cpu))?;
                self.watched.push(tid);
                if let Some(c) = self.control.as_mut()
                    && let Some(start_time) = Proc::default().start_time(pid, tid).ok().flatten()
                {
                    c.allow(Allow {
                        pid,
                        tid: Some(tid),
                        start_time,
                        cpu,
                        children: false,
                        what: "pinguard latency".into(),
                    })
                    .context("registering cyclictest's measurement thread with the daemon")?;
                }
            }
            if let Some(tid) = self.watched.first() {
                self.seen_at = Some(Instant::now());
                eprintln!(
                    "pinguard: measuring CPU {cpu} for {:?}: cyclictest pid {pid}, measurement thread {tid}",
                    self.duration
                );
            } else if self.start.elapsed() > START_TIMEOUT {
                bail!(
                    "cyclictest (pid {pid}) started no measurement thread within {START_TIMEOUT:?}; its command line: {}",
                    self.cmdline
                );
            }
        }
        self.check_policy(ct)?;
        self.check_cpu(ct)?;
        if self
            .interrupted_at
            .is_some_and(|t| t.elapsed() > STOP_TIMEOUT)
        {
            log::warn!("cyclictest did not stop within {STOP_TIMEOUT:?} of SIGINT; killing it");
            ct.kill();
        }
        Ok(None)
    }

    /// Reads the measurement thread's policy from /proc (fields 40/41 of its
    /// stat) on every look: cyclictest's "policy and priority don't match"
    /// fallback, or anyone's chrt, must not pass for the asked policy. A
    /// mismatch after the grace period stops the run.
    fn check_policy(&mut self, ct: &mut Cyclictest) -> anyhow::Result<()> {
        let (Some(&tid), Some(seen_at)) = (self.watched.first(), self.seen_at) else {
            return Ok(());
        };
        let Some(sched) = Proc::default().sched(self.pid, tid) else {
            // Gone: cyclictest is exiting.
            return Ok(());
        };
        self.sched = Some(sched);
        if seen_at.elapsed() < POLICY_GRACE || self.policy.matches(self.priority, &sched) {
            return Ok(());
        }
        ct.kill();
        let (_, stderr) = ct.output();
        check_sched(self.policy, self.priority, tid, &sched, &stderr)?;
        Ok(())
    }

    /// The measurement thread must stay on the measured CPU: a report of
    /// "CPU 1" measured on CPU 0 (an enforcing daemon that evicted it, a
    /// taskset) would be wrong, so the run stops instead.
    fn check_cpu(&mut self, ct: &mut Cyclictest) -> anyhow::Result<()> {
        // The thread pins itself to the CPU right after it starts.
        let (Some(&tid), Some(seen_at)) = (self.watched.first(), self.seen_at) else {
            return Ok(());
        };
        if seen_at.elapsed() < POLICY_GRACE {
            return Ok(());
        }
        let Ok(allowed) = crate::host::affinity::get(tid) else {
            // Gone: cyclictest is exiting.
            return Ok(());
        };
        if allowed == CpuSet::single(self.cpu) {
            return Ok(());
        }
        ct.kill();
        let daemon = match &self.control {
            Some(c) => format!(
                "; a pinguard daemon (pid {}) runs in {} mode",
                c.daemon.pid, c.daemon.mode
            ),
            None => String::new(),
        };
        bail!(
            "cyclictest's measurement thread (tid {tid}) was moved off CPU {} (its affinity is now {allowed}){daemon}: \
             its samples would not be CPU {}'s; stopped",
            self.cpu,
            self.cpu
        )
    }

    /// When to look next: quickly until the measurement thread is watched, then relaxed.
    fn next_tick(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
            + if self.watched.is_empty() {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(20)
            }
    }
}

/// cyclictest's histogram (stdout) and JSON summary, once it exited.
fn read_results(
    ct: &mut Cyclictest,
    status: ExitStatus,
    json_path: &Path,
    cmdline: &str,
) -> anyhow::Result<(CyclictestHistogram, Option<CyclictestJson>)> {
    let (stdout, stderr) = ct.output();
    if !status.success() {
        bail!(
            "cyclictest failed ({status}): {}\ncommand line: {cmdline}",
            last_lines(&stderr, 10)
        );
    }
    let histogram = parse_histogram(&stdout).with_context(|| {
        format!(
            "reading cyclictest's histogram; its stderr: {}",
            last_lines(&stderr, 5)
        )
    })?;
    let json = match std::fs::read_to_string(json_path) {
        Ok(text) => Some(parse_cyclictest_json(&text)?),
        Err(e) => {
            log::warn!(
                "cyclictest wrote no JSON file ({}: {e}); its loop count is unknown",
                json_path.display()
            );
            None
        }
    };
    Ok((histogram, json))
}

/// What the probe's maps add up to for `cpu` (leaving out cyclictest,
/// `pid`), and its own health counters; the probe is unloaded after.
pub(super) fn read_noise(
    probe: Probe,
    cpu: u32,
    pid: u32,
    steal: Option<u64>,
) -> anyhow::Result<(NoiseTotals, Counters)> {
    let (irqs, softirqs, nmis, threads, cpu_stats, counters) = (
        probe.irq_stats()?,
        probe.softirq_stats()?,
        probe.nmi_stats()?,
        probe.threads()?,
        probe.cpu_stats()?,
        probe.counters()?,
    );
    drop(probe);
    let noise = NoiseTotals::new(
        cpu,
        &ProbeMaps {
            irqs: &irqs,
            softirqs: &softirqs,
            nmis: &nmis,
            threads: &threads,
            cpu_stats: &cpu_stats,
        },
        pid,
        irq_name,
        steal,
    );
    Ok((noise, counters))
}

async fn measure(
    path: &Path,
    config: &CyclictestConfig,
    worst: usize,
    host: HostFacts,
    plan: &Plan,
) -> anyhow::Result<Report> {
    let cpu = config.cpu;
    let (mut probe, mut events) = load_probe(cpu)?;
    policy::register(&mut probe, plan, &CpuSet::single(cpu))?;

    let tmp = PrivateDir::create()?;
    let json_path = tmp.0.join("cyclictest.json");
    let args = config.args(&json_path);
    let cmdline = format!("{} {}", path.display(), args.join(" "));
    let steal_before = steal_ns(cpu);
    let started_unix_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let control =
        register_with_daemon(std::process::id(), None, cpu, "pinguard latency", "cyclictest")?;
    let t0 = monotonic_ns();
    let mut ct = Cyclictest::spawn(path, &args)?;
    let pid = ct.pid();

    let mut recorder = Recorder::new(
        cpu,
        t0,
        config.duration,
        pid,
        worst,
        Box::new(resolve_class),
    );
    let end = recorder.end();
    let mut decode_errors = 0u64;
    let mut handle = |r: Result<KernelEvent, DecodeError>| match r {
        Ok(ev) => recorder.on_event(&ev),
        Err(e) => {
            decode_errors += 1;
            log::warn!("undecodable event: {e}");
        }
    };
    let stop = wait_for_stop();
    tokio::pin!(stop);
    let mut sup = Supervisor {
        cpu,
        pid,
        policy: config.policy,
        priority: config.priority,
        sched: None,
        seen_at: None,
        duration: config.duration,
        cmdline: &cmdline,
        start: Instant::now(),
        watched: Vec::new(),
        interrupted_at: None,
        control,
    };
    let mut next_check = tokio::time::Instant::now();
    let status: ExitStatus = loop {
        tokio::select! {
            r = EventReader::next_batch(&mut events, &mut handle) => r.context("reading events")?,
            _ = tokio::time::sleep_until(next_check) => {
                if let Some(status) = sup.tick(&mut ct, &mut probe)? {
                    break status;
                }
                next_check = sup.next_tick();
            }
            r = &mut stop, if sup.interrupted_at.is_none() => {
                r?;
                eprintln!("pinguard: interrupted; waiting for cyclictest's results");
                end.set(end.get().min(monotonic_ns()));
                ct.interrupt();
                sup.interrupted_at = Some(Instant::now());
            }
        }
    };
    let elapsed_ns = monotonic_ns().saturating_sub(t0);
    let daemon: Option<DaemonInfo> = sup.control.as_ref().map(|c| DaemonInfo {
        registered: true,
        ..c.daemon.clone()
    });
    let (measurement_tids, interrupted, sched) =
        (sup.watched, sup.interrupted_at.is_some(), sup.sched);
    // Events already in the buffer still belong to the run.
    events.get_mut().drain(&mut handle);
    let (histogram, json) = read_results(&mut ct, status, &json_path, &cmdline)?;
    // A run shorter than the grace period is judged by its last reading.
    if let (Some(s), Some(&tid)) = (&sched, measurement_tids.first()) {
        check_sched(config.policy, config.priority, tid, s, "")?;
    }
    drop(tmp);

    let steal = match (steal_before, steal_ns(cpu)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let (noise, counters) = read_noise(probe, cpu, pid, steal)?;
    let recorded = recorder.finish();
    let version = json.as_ref().and_then(|j| j.version.clone());
    Ok(Report::build(Inputs {
        host,
        run: RunInfo {
            cpu,
            started_unix_s,
            planned_duration_ns: u64::try_from(config.duration.as_nanos()).unwrap_or(u64::MAX),
            elapsed_ns,
            interval_us: config.interval_us(),
            policy: config.policy,
            priority: config.priority,
            thread_sched: sched.map(|s| format!("{} {}", s.class, s.rtprio)),
            histogram_max_us: config.histogram_max_us(),
            cyclictest: CyclictestInfo {
                path: path.display().to_string(),
                version,
                cmdline,
            },
            measurement_tids,
            interrupted,
            daemon,
        },
        histogram,
        json,
        recorded,
        noise,
        probe: ProbeHealth {
            events_lost: counters.events_lost,
            thread_map_full: counters.thread_map_full,
            decode_errors,
        },
    }))
}

/// Tells a running `pinguard run` (if any) that `pid` and its children
/// (`latency`'s cyclictest), or one thread `tid` of it (a guest's vCPU for
/// `latency --vm`), may run on `cpu` for as long as the connection is open:
/// an enforcing daemon would evict the measurement thread and count it as an
/// intruder. Registered before cyclictest starts, so its very
/// first slice there is covered; the connection stays open for the run.
pub(super) fn register_with_daemon(
    pid: u32,
    tid: Option<u32>,
    cpu: u32,
    what: &str,
    subject: &str,
) -> anyhow::Result<Option<Client>> {
    let Some(mut client) = Client::connect(std::path::Path::new(control::CONTROL_SOCKET))? else {
        return Ok(None);
    };
    let thread = tid.unwrap_or(pid);
    let start_time = Proc::default()
        .start_time(pid, thread)
        .ok()
        .flatten()
        .with_context(|| format!("reading the start time of {subject} (thread {thread})"))?;
    client
        .allow(Allow {
            pid,
            tid,
            start_time,
            cpu,
            // A whole process comes with its children (cyclictest); one thread alone.
            children: tid.is_none(),
            what: what.into(),
        })
        .with_context(|| format!("registering {subject} with the running daemon"))?;
    eprintln!(
        "pinguard: a pinguard daemon (pid {}, {} mode) guards CPUs {}: {subject} is registered with it \
         (not evicted, not an intruder)",
        client.daemon.pid, client.daemon.mode, client.daemon.guarded
    );
    Ok(Some(client))
}

pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail.join("\n")
    }
}

/// A directory only root can read, removed on drop (cyclictest's JSON file).
pub(super) struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("pinguard-latency-{}", std::process::id()));
        // A leftover of an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cyclictest child: its output is collected by two threads, and it is
/// killed if pinguard returns early (and on pinguard's death, by the kernel).
struct Cyclictest {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

fn collect(mut r: impl std::io::Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut r, &mut s);
        s
    })
}

impl Cyclictest {
    fn spawn(path: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(path);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                // SIGTERM makes cyclictest stop cleanly if pinguard dies.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let stdout = child.stdout.take().map(collect);
        let stderr = child.stderr.take().map(collect);
        Ok(Self {
            child,
            stdout,
            stderr,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child.try_wait().context("waiting for cyclictest")
    }

    /// SIGINT: cyclictest stops and prints what it measured so far.
    fn interrupt(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Everything it printed (call after it exited).
    fn output(&mut self) -> (String, String) {
        let join =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        (join(self.stdout.take()), join(self.stderr.take()))
    }
}

impl Drop for Cyclictest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
