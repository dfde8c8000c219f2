//! `cargo xtask bench --only scale`: pinguard on a crowded host.
//!
//! The host gets [`Plan::threads`] extra threads (sleeping, in
//! [`PROFILES`]-shaped processes with the names real services give their
//! threads) and [`Plan::guests`] paused 1-vCPU QEMU/KVM guests with QMP
//! sockets. Then:
//! a) `pinguard audit --guard 1` (a /proc snapshot plus guest discovery)
//!    against `ps -eLo tid,psr,comm` and `ps -eLo pid,tid,psr,comm,cls,rtprio`,
//!    interleaved (the order rotates each round), wall and CPU time per run;
//! b) `pinguard run --guard 1` (observe, defaults) with all the guests:
//!    time to find them, then CPU, RSS and discovery cost over a steady
//!    window and over a churn window (one guest started and one stopped
//!    every second), with the daemon's own loss counters and suppressed
//!    log lines.
//!
//! The thread holders die with us (PR_SET_PDEATHSIG) and are stopped by
//! Drop like the guests, on every exit path including Ctrl-C.
use std::{
    collections::VecDeque,
    fs,
    io::Read as _,
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use testkit::{
    daemon::{Daemon, DaemonOptions},
    guest::{Guest, GuestOptions},
    process::Process,
    threads::{process_run_ns, run_ns},
    wait, which,
};

use super::{BenchArgs, GUARDED_CPU, W, others_running, spread};

/// The environment variable that turns an xtask process into a thread
/// holder (see [`hold_threads_if_asked`]): "PROCESS_NAME:COUNT:PROFILE".
const HOLDER_ENV: &str = "PINGUARD_XTASK_HOLD_THREADS";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A full rescan comes every 30 s by default: after churn the daemon must
/// have caught up within one.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);
const QUIET_TIMEOUT: Duration = Duration::from_secs(90);
/// Threads per holder process: a host's threads live in services of tens to
/// hundreds of threads each, and both tools pay per process too.
const THREADS_PER_PROCESS: u32 = 250;
/// Guest memory (MiB): `-S` guests touch almost none of it.
const GUEST_MIB: u32 = 32;

/// Process name and the names its threads get (`{}` is the thread's index),
/// as JVMs, Go/Tokio services, databases and storage daemons name theirs.
const PROFILES: &[(&str, &[&str])] = &[
    (
        "java",
        &[
            "GC Thread#{}",
            "C2 CompilerThre",
            "pool-{}-thread-1",
            "http-nio-8080-e",
            "ForkJoinPool-1-",
        ],
    ),
    (
        "envoy",
        &["wrk:worker_{}", "envoy", "GrpcGoogClient", "dog:main"],
    ),
    ("mysqld", &["ib_io_wr-{}", "connection", "ib_pg_flush-{}"]),
    (
        "ceph-osd",
        &["tp_osd_tp", "msgr-worker-{}", "bstore_kv_sync", "log"],
    ),
    ("node", &["node", "libuv-worker", "V8Worker"]),
    ("containerd", &["containerd", "containerd-shim"]),
];

/// In a thread-holder child: become `NAME` with `COUNT` sleeping threads,
/// print "ready", and sleep until killed (or until the bench that started
/// us dies). Called first thing in main; returns when not asked.
pub fn hold_threads_if_asked() {
    let Ok(spec) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let (Some(name), Some(count), Some(profile)) = (parts.next(), parts.next(), parts.next())
    else {
        eprintln!("{HOLDER_ENV}={spec}: expected NAME:COUNT:PROFILE");
        std::process::exit(2);
    };
    let count: u32 = count.parse().unwrap_or(0);
    let names: &[&str] = PROFILES
        .iter()
        .find(|(p, _)| *p == profile)
        .map_or(&["worker"], |(_, n)| n);
    // SAFETY: prctl with integer arguments: die with the bench (SIGKILL).
    unsafe { nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL, 0, 0, 0) };
    let _ = fs::write("/proc/thread-self/comm", name);
    for i in 0..count {
        let pattern = names[i as usize % names.len()];
        let thread_name = pattern.replace("{}", &(i / names.len() as u32).to_string());
        let spawned = std::thread::Builder::new()
            .name(thread_name.chars().take(15).collect())
            // Sleeping threads: the smallest stack std accepts is plenty.
            .stack_size(64 * 1024)
            .spawn(|| {
                loop {
                    std::thread::park();
                }
            });
        if let Err(e) = spawned {
            eprintln!("thread holder {name}: thread {i}: {e}");
            std::process::exit(1);
        }
    }
    println!("ready");
    loop {
        std::thread::park();
    }
}

pub struct Plan {
    threads: u32,
    guests: u32,
    rounds: u32,
    steady: Duration,
    churn: Duration,
}

impl Plan {
    pub fn from_args(args: &BenchArgs) -> Result<Self> {
        for tool in ["qemu-system-x86_64", "ps"] {
            if which(tool).is_err() {
                bail!("the scale suite needs {tool} (cargo xtask setup installs it)");
            }
        }
        if !Path::new("/dev/kvm").exists() {
            bail!("the scale suite starts KVM guests but /dev/kvm does not exist");
        }
        Ok(Self {
            threads: 10_000,
            guests: 50,
            rounds: args.rounds.unwrap_or(if args.quick { 3 } else { 9 }),
            steady: Duration::from_secs(if args.quick { 10 } else { 30 }),
            churn: Duration::from_secs(args.load_secs.unwrap_or(if args.quick { 15 } else { 60 })),
        })
    }
}

/// Processes holding the extra threads; SIGTERM (then SIGKILL) on drop.
struct Crowd {
    holders: Vec<Process>,
}

impl Crowd {
    fn start(threads: u32) -> Result<Self> {
        let exe = std::env::current_exe().context("finding our own executable")?;
        let mut crowd = Self {
            holders: Vec::new(),
        };
        let mut left = threads;
        let mut i = 0;
        while left > 0 {
            let n = left.min(THREADS_PER_PROCESS);
            let (name, _) = PROFILES[i % PROFILES.len()];
            let mut cmd = Command::new(&exe);
            cmd.env(HOLDER_ENV, format!("{name}:{n}:{name}"));
            crowd.holders.push(Process::try_spawn_group(&mut cmd)?);
            left -= n;
            i += 1;
        }
        for p in &mut crowd.holders {
            p.try_wait_stdout("\"ready\"", START_TIMEOUT, |l| l == "ready")?;
        }
        Ok(crowd)
    }

    fn pids(&self) -> Vec<u32> {
        self.holders.iter().map(Process::pid).collect()
    }
}

/// The guests, oldest first; each is killed (and waited for) on drop.
struct Fleet {
    guests: VecDeque<Guest>,
    next: u32,
}

impl Fleet {
    fn start(n: u32) -> Result<Self> {
        let mut fleet = Self {
            guests: VecDeque::new(),
            next: 0,
        };
        for _ in 0..n {
            fleet.add()?;
        }
        Ok(fleet)
    }

    fn add(&mut self) -> Result<()> {
        let name = format!("scale{}", self.next);
        self.next += 1;
        let g = Guest::try_start(GuestOptions {
            memory_mib: GUEST_MIB,
            ..GuestOptions::new(&name)
        })
        .with_context(|| format!("starting guest {name}"))?;
        self.guests.push_back(g);
        Ok(())
    }

    /// Stops the oldest guest (waits until its threads are gone).
    fn remove_oldest(&mut self) {
        self.guests.pop_front();
    }

    fn pids(&self) -> Vec<u32> {
        self.guests.iter().map(Guest::pid).collect()
    }
}

/// One tool whose snapshot of the host is timed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Audit,
    PsShort,
    PsFull,
}

const TOOLS: [Tool; 3] = [Tool::Audit, Tool::PsShort, Tool::PsFull];

impl Tool {
    fn command(self, bin: &Path) -> Command {
        match self {
            Tool::Audit => {
                let mut c = Command::new(bin);
                c.args(["audit", "--guard", &GUARDED_CPU.to_string()]);
                c
            }
            Tool::PsShort => {
                let mut c = Command::new("ps");
                c.args(["-eLo", "tid,psr,comm"]);
                c
            }
            Tool::PsFull => {
                let mut c = Command::new("ps");
                c.args(["-eLo", "pid,tid,psr,comm,cls,rtprio"]);
                c
            }
        }
    }

    fn label(self) -> &'static str {
        match self {
            Tool::Audit => "`pinguard audit --guard 1`",
            Tool::PsShort => "`ps -eLo tid,psr,comm`",
            Tool::PsFull => "`ps -eLo pid,tid,psr,comm,cls,rtprio`",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Tool::Audit => "audit",
            Tool::PsShort => "ps_tid_psr_comm",
            Tool::PsFull => "ps_pid_tid_psr_comm_cls_rtprio",
        }
    }

    /// Exit codes that mean "ran": audit exits 1 when it found violations.
    fn ran(self, code: i32) -> bool {
        match self {
            Tool::Audit => code == 0 || code == 1,
            Tool::PsShort | Tool::PsFull => code == 0,
        }
    }
}

/// One run: wall time, CPU time (user + sys from wait4), bytes printed.
#[derive(Clone, Copy, Debug)]
struct Run {
    wall: Duration,
    cpu: Duration,
    bytes: usize,
}

/// Runs `cmd` with stdout read through a pipe (as an operator's terminal or
/// script would), timing it from spawn to reaping.
fn timed(mut cmd: Command, tool: Tool) -> Result<Run> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{cmd:?}");
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {shown}"))?;
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_end(&mut out)
        .with_context(|| format!("reading the output of {shown}"))?;
    let mut err = Vec::new();
    let _ = child.stderr.take().expect("piped").read_to_end(&mut err);
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: our own child, not yet reaped; pointers to live locals.
    let r = unsafe { nix::libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall = t0.elapsed();
    if r < 0 {
        bail!("wait4 for {shown}: {}", std::io::Error::last_os_error());
    }
    let status = std::process::ExitStatus::from_raw(status);
    if !status.code().is_some_and(|c| tool.ran(c)) {
        bail!(
            "{shown} failed ({status}): {}",
            String::from_utf8_lossy(&err).trim()
        );
    }
    let tv = |t: nix::libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(Run {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        bytes: out.len(),
    })
}

/// The daemon over one window.
struct Window {
    label: &'static str,
    len: Duration,
    cpu_ns: u64,
    rss_kib: [u64; 2],
    peak_kib: u64,
    scans: f64,
    /// CPU time of the discovery thread (full scans and per-pid rediscoveries).
    discover_ns: u64,
    /// Guests started and stopped during the window.
    churned: u32,
    vms_end: Option<f64>,
    /// How long after the window the daemon reported exactly the guests alive.
    settle: Option<Duration>,
    events_lost: f64,
    thread_map_full: f64,
    suppressed_lines: u64,
}

impl Window {
    fn cpu_pct(&self) -> f64 {
        self.cpu_ns as f64 / self.len.as_nanos() as f64 * 100.0
    }

    fn per_scan_ms(&self) -> Option<f64> {
        (self.scans >= 1.0).then(|| self.discover_ns as f64 / 1e6 / self.scans)
    }
}

pub struct ScaleReport {
    threads_total: usize,
    processes_total: usize,
    guests: u32,
    threads_added: u32,
    runs: Vec<(Tool, Vec<Run>)>,
    /// Per round, ps's wall time / audit's (above 1: audit faster).
    ratios: Vec<(Tool, Vec<f64>)>,
    first_scan: Duration,
    rss_after_start_kib: u64,
    windows: Vec<Window>,
    /// Compilers and other helpers' work seen meanwhile.
    busy: Vec<String>,
    loadavg: [String; 2],
}

fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (ns) of the daemon's thread named `comm`.
fn thread_run_ns(pid: u32, comm: &str) -> u64 {
    testkit::host::tids(pid)
        .into_iter()
        .filter(|t| testkit::host::comm(pid, *t).as_deref() == Some(comm))
        .filter_map(|t| run_ns(pid, t))
        .sum()
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Other people's work that competes for the CPUs: compilers, linkers, test
/// runners ("comm ×count").
fn busy_now(seen: &mut std::collections::BTreeMap<String, usize>) {
    let noisy = |c: &str| {
        [
            "rustc",
            "cargo",
            "cc1",
            "ld",
            "clang",
            "stress-ng",
            "perf",
            "bpftrace",
        ]
        .iter()
        .any(|n| c == *n || c.starts_with("rust-lld") || c.starts_with("lld"))
    };
    let mut now = std::collections::BTreeMap::new();
    for (_, comm) in testkit::host::processes(noisy) {
        *now.entry(comm).or_insert(0usize) += 1;
    }
    for (comm, n) in now {
        let e = seen.entry(comm).or_insert(0);
        *e = (*e).max(n);
    }
}

fn wait_until_alone() -> Result<()> {
    let deadline = Instant::now() + QUIET_TIMEOUT;
    loop {
        let others = others_running();
        if others.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "other guests or pinguards still run after {}s ({}): audit and the daemon would count them",
                QUIET_TIMEOUT.as_secs(),
                others.join(", ")
            );
        }
        wait::sleep(Duration::from_secs(1))?;
    }
}

fn count_host() -> (usize, usize) {
    let pids = testkit::host::pids();
    let threads = pids.iter().map(|p| testkit::host::tids(*p).len()).sum();
    (pids.len(), threads)
}

pub fn run(plan: &Plan, bin: &Path) -> Result<ScaleReport> {
    wait_until_alone()?;
    let mut busy = std::collections::BTreeMap::new();
    let load0 = loadavg();
    eprintln!(
        "{W}: scale: starting {} sleeping threads and {} paused guests",
        plan.threads, plan.guests
    );
    let crowd = Crowd::start(plan.threads)?;
    let mut fleet = Fleet::start(plan.guests)?;
    let (processes_total, threads_total) = count_host();
    eprintln!(
        "{W}: scale: the host has {threads_total} threads in {processes_total} processes \
         (holders {:?})",
        crowd.pids()
    );

    // a) snapshot tools, interleaved; one untimed warm-up each (page cache, dentries).
    for t in TOOLS {
        timed(t.command(bin), t)?;
    }
    let mut runs: Vec<(Tool, Vec<Run>)> = TOOLS.iter().map(|t| (*t, Vec::new())).collect();
    for round in 0..plan.rounds as usize {
        busy_now(&mut busy);
        for k in 0..TOOLS.len() {
            let i = (round + k) % TOOLS.len();
            let tool = TOOLS[i];
            let r = timed(tool.command(bin), tool)?;
            runs[i].1.push(r);
        }
        wait::check_interrupted()?;
    }
    let audit = runs[0].1.clone();
    let ratios = runs[1..]
        .iter()
        .map(|(t, v)| {
            let r = v
                .iter()
                .zip(&audit)
                .map(|(p, a)| p.wall.as_secs_f64() / a.wall.as_secs_f64())
                .collect();
            (*t, r)
        })
        .collect::<Vec<_>>();
    for (t, v) in &runs {
        let wall: Vec<f64> = v.iter().map(|r| ms(r.wall)).collect();
        if let Some((lo, med, hi)) = spread(&wall) {
            eprintln!("{W}: scale: {}: {med:.1} ms ({lo:.1}-{hi:.1})", t.label());
        }
    }

    // b) the daemon with every guest.
    let opts = DaemonOptions {
        bin: bin.to_path_buf(),
        guard: GUARDED_CPU,
        config: "# cargo xtask bench --only scale: the defaults\n".into(),
        args: Vec::new(),
        env: vec![("RUST_LOG".into(), "info".into())],
        own_group: true,
        wrapper: Vec::new(),
    };
    let t0 = Instant::now();
    let mut daemon = Daemon::try_start(&opts).context("starting pinguard run")?;
    let want = f64::from(plan.guests);
    daemon.try_wait_metric(
        "the daemon to find every guest",
        "pinguard_vms",
        &[],
        START_TIMEOUT,
        |v| v >= want,
    )?;
    let first_scan = t0.elapsed();
    let rss_after_start_kib = status_kib(daemon.pid(), "VmRSS");
    eprintln!(
        "{W}: scale: daemon found {} guests {:.2} s after start, RSS {rss_after_start_kib} KiB",
        plan.guests,
        first_scan.as_secs_f64()
    );
    let steady = measure(
        &mut daemon,
        &mut fleet,
        "steady",
        plan.steady,
        false,
        &mut busy,
    )?;
    let churn = measure(
        &mut daemon,
        &mut fleet,
        "churn",
        plan.churn,
        true,
        &mut busy,
    )?;
    let mut windows = vec![steady, churn];
    let stderr = daemon.try_stop().context("stopping the daemon")?;
    // Lines after our windows cannot be told apart by time; the churn
    // window is the only one expected to have any.
    let suppressed: u64 = stderr.iter().filter_map(|l| suppressed_count(l)).sum();
    if let Some(w) = windows.last_mut() {
        w.suppressed_lines = suppressed;
    }
    drop(fleet);
    drop(crowd);
    let load1 = loadavg();
    Ok(ScaleReport {
        threads_total,
        processes_total,
        guests: plan.guests,
        threads_added: plan.threads,
        runs,
        ratios,
        first_scan,
        rss_after_start_kib,
        windows,
        busy: busy.into_iter().map(|(c, n)| format!("{c} ×{n}")).collect(),
        loadavg: [load0, load1],
    })
}

/// "N log lines about single threads suppressed ..." (daemon::state's tick).
fn suppressed_count(line: &str) -> Option<u64> {
    let (before, _) = line.split_once(" log lines about single threads suppressed")?;
    before.rsplit(' ').next()?.parse().ok()
}

fn counter(daemon: &Daemon, name: &str) -> f64 {
    daemon.try_metric(name, &[]).ok().flatten().unwrap_or(0.0)
}

fn measure(
    daemon: &mut Daemon,
    fleet: &mut Fleet,
    label: &'static str,
    len: Duration,
    churn: bool,
    busy: &mut std::collections::BTreeMap<String, usize>,
) -> Result<Window> {
    eprintln!(
        "{W}: scale: daemon, {label} for {} s{}",
        len.as_secs(),
        if churn {
            " (one guest started and one stopped every second)"
        } else {
            ""
        }
    );
    let pid = daemon.pid();
    let scans0 = counter(daemon, "pinguard_discovery_scans_total");
    let lost0 = counter(daemon, "pinguard_events_lost_total");
    let full0 = counter(daemon, "pinguard_thread_map_full_total");
    let (cpu0, disc0, rss0) = (
        process_run_ns(pid),
        thread_run_ns(pid, "pinguard-discov"),
        status_kib(pid, "VmRSS"),
    );
    let t0 = Instant::now();
    let mut peak = rss0;
    let mut churned = 0;
    let mut next = t0;
    while t0.elapsed() < len {
        next += Duration::from_secs(1);
        if churn {
            fleet.remove_oldest();
            fleet.add()?;
            churned += 1;
        }
        peak = peak.max(status_kib(pid, "VmRSS"));
        busy_now(busy);
        wait::sleep(next.saturating_duration_since(Instant::now()))?;
    }
    let window = t0.elapsed();
    let (cpu1, disc1, rss1) = (
        process_run_ns(pid),
        thread_run_ns(pid, "pinguard-discov"),
        status_kib(pid, "VmRSS"),
    );
    let scans = counter(daemon, "pinguard_discovery_scans_total") - scans0;
    let vms_end = daemon.try_metric("pinguard_vms", &[]).ok().flatten();
    // Caught up: the daemon reports exactly the guests alive now.
    let alive = fleet.pids().len() as f64;
    let t1 = Instant::now();
    let settle = daemon
        .try_wait_metric(
            "the daemon to report the guests alive",
            "pinguard_vms",
            &[],
            SETTLE_TIMEOUT,
            |v| v == alive,
        )
        .ok()
        .map(|_| t1.elapsed());
    Ok(Window {
        label,
        len: window,
        cpu_ns: cpu1.saturating_sub(cpu0),
        rss_kib: [rss0, rss1],
        peak_kib: peak.max(rss1).max(status_kib(pid, "VmHWM")),
        scans,
        discover_ns: disc1.saturating_sub(disc0),
        churned,
        vms_end,
        settle,
        events_lost: counter(daemon, "pinguard_events_lost_total") - lost0,
        thread_map_full: counter(daemon, "pinguard_thread_map_full_total") - full0,
        suppressed_lines: 0,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_spread(v: &[f64], digits: usize) -> String {
    match spread(v) {
        Some((lo, med, hi)) => format!("{med:.digits$} ({lo:.digits$}–{hi:.digits$})"),
        None => "–".into(),
    }
}

impl ScaleReport {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str("### Scale\n\n");
        s.push_str(&format!(
            "Host: {} threads in {} processes ({} of them sleeping threads added in {}-thread processes \
             named like java, envoy, mysqld, ceph-osd, node, containerd threads), {} paused 1-vCPU QEMU/KVM \
             guests (`-S -m {GUEST_MIB}`, QMP socket, `debug-threads=on`). Release build. \
             Load average before/after: {} / {}. Also running meanwhile (max count seen): {}.\n\n",
            self.threads_total,
            self.processes_total,
            self.threads_added,
            THREADS_PER_PROCESS,
            self.guests,
            self.loadavg[0],
            self.loadavg[1],
            if self.busy.is_empty() {
                "nothing of note".to_string()
            } else {
                self.busy.join(", ")
            }
        ));
        let rounds = self.runs.first().map_or(0, |r| r.1.len());
        s.push_str(&format!(
            "Snapshot of the host, {rounds} interleaved rounds (order rotating), output read through a pipe; \
             median (min–max). CPU = user + sys of the process (wait4).\n\n"
        ));
        s.push_str("| tool | wall ms | CPU ms | output KiB | wall time / audit's (per round) |\n");
        s.push_str("|---|---:|---:|---:|---:|\n");
        for (t, v) in &self.runs {
            let wall: Vec<f64> = v.iter().map(|r| ms(r.wall)).collect();
            let cpu: Vec<f64> = v.iter().map(|r| ms(r.cpu)).collect();
            let kib = v.first().map_or(0.0, |r| r.bytes as f64 / 1024.0);
            let ratio = self
                .ratios
                .iter()
                .find(|(rt, _)| rt == t)
                .map_or("1".to_string(), |(_, r)| fmt_spread(r, 2));
            s.push_str(&format!(
                "| {} | {} | {} | {kib:.0} | {ratio} |\n",
                t.label(),
                fmt_spread(&wall, 1),
                fmt_spread(&cpu, 1)
            ));
        }
        s.push('\n');
        s.push_str(&format!(
            "Daemon: `pinguard run --guard {GUARDED_CPU}` (observe mode, default config: 1 s verify \
             interval, 30 s rescan), found all {} guests {:.2} s after it was started (RSS then {} KiB). \
             CPU = sum of its threads' schedstat run time over the window; discovery = run time of its \
             `pinguard-discover` thread (full scans and per-process rediscoveries after an exec) per full \
             scan counted by `pinguard_discovery_scans_total`; caught up = time after the window until \
             `pinguard_vms` equals the guests alive.\n\n",
            self.guests,
            self.first_scan.as_secs_f64(),
            self.rss_after_start_kib
        ));
        s.push_str("| window | s | guests started + stopped | daemon CPU, % of one core | RSS start → end KiB (peak) | full scans | discovery CPU ms / scan | pinguard_vms at end | caught up after | events lost | thread map full | log lines suppressed |\n");
        s.push_str("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for w in &self.windows {
            s.push_str(&format!(
                "| {} | {:.0} | {} | {:.2} | {} → {} ({}) | {:.0} | {} | {} | {} | {:.0} | {:.0} | {} |\n",
                w.label,
                w.len.as_secs_f64(),
                w.churned,
                w.cpu_pct(),
                w.rss_kib[0],
                w.rss_kib[1],
                w.peak_kib,
                w.scans,
                w.per_scan_ms().map_or("–".into(), |v| format!("{v:.1}")),
                w.vms_end.map_or("–".into(), |v| format!("{v:.0}")),
                w.settle
                    .map_or(format!("> {} s", SETTLE_TIMEOUT.as_secs()), |d| format!(
                        "{:.1} s",
                        d.as_secs_f64()
                    )),
                w.events_lost,
                w.thread_map_full,
                w.suppressed_lines
            ));
        }
        s.push('\n');
        s
    }

    pub fn json(&self) -> Value {
        json!({
            "threads_total": self.threads_total,
            "processes_total": self.processes_total,
            "threads_added": self.threads_added,
            "guests": self.guests,
            "loadavg": self.loadavg,
            "busy": self.busy,
            "snapshot": self.runs.iter().map(|(t, v)| json!({
                "tool": t.key(),
                "wall_ms": v.iter().map(|r| ms(r.wall)).collect::<Vec<_>>(),
                "cpu_ms": v.iter().map(|r| ms(r.cpu)).collect::<Vec<_>>(),
                "output_bytes": v.first().map_or(0, |r| r.bytes),
                "wall_over_audit": self.ratios.iter().find(|(rt, _)| rt == t).map(|(_, r)| r.clone()),
            })).collect::<Vec<_>>(),
            "daemon": {
                "first_scan_s": self.first_scan.as_secs_f64(),
                "rss_after_start_kib": self.rss_after_start_kib,
                "windows": self.windows.iter().map(|w| json!({
                    "label": w.label,
                    "window_s": w.len.as_secs_f64(),
                    "churned": w.churned,
                    "cpu_pct_of_one_core": w.cpu_pct(),
                    "rss_kib_start": w.rss_kib[0],
                    "rss_kib_end": w.rss_kib[1],
                    "rss_kib_peak": w.peak_kib,
                    "full_scans": w.scans,
                    "discovery_cpu_ms_per_scan": w.per_scan_ms(),
                    "vms_end": w.vms_end,
                    "caught_up_s": w.settle.map(|d| d.as_secs_f64()),
                    "events_lost": w.events_lost,
                    "thread_map_full": w.thread_map_full,
                    "log_lines_suppressed": w.suppressed_lines,
                })).collect::<Vec<_>>(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_suppressed_line() {
        let line = "[2026-12-02T10:00:00Z WARN  pinguard::daemon::state] 37 log lines about single \
                    threads suppressed (more than 5/s after a burst of 200); /violations ...";
        assert_eq!(suppressed_count(line), Some(37));
        assert_eq!(suppressed_count("pinguard running"), None);
    }

    #[test]
    fn profiles_name_threads_within_comm_length() {
        for (process, names) in PROFILES {
            assert!(process.len() <= 15, "{process}");
            assert!(!names.is_empty(), "{process}");
        }
    }
}
