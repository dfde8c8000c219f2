//! `pinguard latency --vm NAME`: cyclictest inside a guest, through its
//! guest agent, pinned to a vCPU whose host thread is on a guarded CPU,
//! while the probe records what ran on that CPU; then each of the guest's
//! worst wake-ups is matched with the host's account of the same moment.
//!
//! Clock alignment (the report and the README say the same): the guest's
//! CLOCK_MONOTONIC is its CLOCK_REALTIME (`guest-get-time`) minus
//! `offs_real` (the `.offset` of CLOCK_REALTIME's base in its
//! `/proc/timer_list`). Eight `guest-get-time` exchanges before the run and
//! eight after are each bracketed by two host CLOCK_MONOTONIC reads; the
//! shortest round trip of each set gives `offset = midpoint - guest` with an
//! error of at most half that round trip (plus the agent's 1 µs
//! resolution), and guest times in between are mapped by interpolating the
//! two offsets. cyclictest runs with `--secaligned`, so its wake-up targets
//! are whole seconds plus multiples of the interval on the guest's clock
//! (the start second from the thread's start time in its /proc stat), and
//! each sample's `-v` line gives its latency after that target.
use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, anyhow, bail};
use pin_common::watch;

use super::latency::{load_probe, monotonic_ns, read_noise, resolve_class, steal_ns};
use crate::{
    bpf::{
        events::{DecodeError, KernelEvent},
        probe::EventReader,
    },
    cli::LatencyArgs,
    cmd::{move_self_to, policy, runtime, wait_for_stop},
    config::Config,
    control::DaemonInfo,
    exit,
    guests::{
        DiscoverOptions, Discoverer, MeasurableGuest,
        agent::{Agent, AgentError, ExecResult},
    },
    host::{
        Host, affinity,
        cmdline::KernelCmdline,
        cpulist::CpuSet,
        procfs::Sched,
        topology::{Guard, Topology},
    },
    latency::{
        CyclictestConfig,
        attribution::Recorder,
        check_sched,
        guest::{
            ClockAlignment, ClockMap, ClockReading, GuestRun, GuestWakeup, Sample, estimate,
            explain, host_cause, parse_verbose_output, realtime_offset, secaligned_base,
            wake_targets, worst_samples,
        },
        host::{HostFacts, preemption},
        plot,
        report::{CyclictestInfo, Inputs, ProbeHealth, Report, RunInfo, render_text},
    },
};

/// One agent exchange (a command and its answer).
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Exchanges per clock alignment (before the run, and after it).
const CLOCK_READINGS: usize = 8;
/// The agent's clock (`guest-get-time`) has microsecond resolution.
const AGENT_CLOCK_RESOLUTION_NS: u64 = 1_000;
/// How long the guest's measurement thread may take to appear and to take
/// the asked policy (a guest under TCG starts programs slowly).
const GUEST_POLICY_GRACE: Duration = Duration::from_secs(3);
/// `--secaligned` waits for the next full second (up to two).
const ALIGN_WAIT: Duration = Duration::from_secs(2);
/// The guest's USER_HZ, the unit of /proc stat start times (100 on every
/// architecture Linux runs KVM guests on).
const GUEST_USER_HZ: u64 = 100;

pub fn run(
    args: &LatencyArgs,
    vm: &str,
    _topo: &Topology,
    guard: &Guard,
    policy_config: &Config,
    mut config: CyclictestConfig,
) -> anyhow::Result<ExitCode> {
    // The wake-up targets are computed from --secaligned's absolute timer.
    if let Some(a) = config.extra.iter().find(|a| {
        [
            "-A",
            "--aligned",
            "--secaligned",
            "-r",
            "--relative",
            "-s",
            "--system",
        ]
        .iter()
        .any(|f| a == f || a.starts_with(&format!("{f}=")) || (f.len() == 2 && a.starts_with(f)))
    }) {
        bail!(
            "cyclictest argument {a:?} after `--` conflicts with --vm: pinguard aligns the guest's \
             wake-ups itself (--secaligned, absolute timers) to match them with the host's clock"
        );
    }
    if args.svg.is_some() || args.png.is_some() {
        plot::ensure_font()?;
    }
    let guest =
        Discoverer::new(Default::default(), DiscoverOptions::default()).find_measurable(vm)?;
    let (vcpu, cpu, pin) = choose_vcpu(&guest, args.vcpu, args.cpu, &guard.guarded)?;
    config.cpu = cpu;
    let addr = guest
        .agent
        .clone()
        .map_err(|why| anyhow!("guest {vm} cannot be measured inside: {why}"))?;
    let mut agent = Agent::connect(addr.clone(), AGENT_TIMEOUT).with_context(|| {
        format!(
            "guest {vm}: its guest agent ({addr}) did not answer; is qemu-guest-agent running in \
             the guest?"
        )
    })?;
    let facts = GuestFacts::read(&mut agent, vm)?;
    if !facts.online.contains(vcpu.index) {
        bail!(
            "guest {vm}: vCPU {} is not online inside the guest (its online CPUs: {})",
            vcpu.index,
            facts.online
        );
    }
    let plan = policy::plan_for_observers(_topo, guard, policy_config);
    move_self_to(&guard.housekeeping)?;
    let host = HostFacts::read(
        &Host::default(),
        &guard.guarded.to_string(),
        &guard.housekeeping.to_string(),
    );
    // From here on a SIGINT or SIGTERM must not end the process by its
    // default action with the vCPU still pinned: tokio's handlers, once
    // installed, stay for the life of the process (one in the short set-up
    // before the measurement listens is ignored; during it, it stops the run).
    {
        let rt = runtime()?;
        let _entered = rt.enter();
        for kind in [
            tokio::signal::unix::SignalKind::interrupt(),
            tokio::signal::unix::SignalKind::terminate(),
        ] {
            let _handler = tokio::signal::unix::signal(kind).context("installing the signal handlers")?;
        }
    }
    // Pinned for the run only, put back on every way out (the guard's drop).
    let pinned = match pin {
        true => Some(PinnedForRun::pin(vcpu.tid, cpu).with_context(|| {
            format!(
                "guest {vm}: pinning vCPU {} (thread {}) to CPU {cpu} for the run; pin the guest \
                 with `pinguard pin` first",
                vcpu.index, vcpu.tid
            )
        })?),
        false => None,
    };
    let main_cpus = facts.online.difference(&CpuSet::single(vcpu.index));
    let guest_args = guest_cyclictest_args(&config, vcpu.index, &main_cpus);
    let report = measure(
        &mut agent,
        &config,
        &guest_args,
        Target {
            guest: &guest,
            vcpu_index: vcpu.index,
            vcpu_tid: vcpu.tid,
            worst: args.worst,
        },
        host,
        &plan,
        &facts,
    );
    drop(pinned);
    let mut report = report?.with_guest_pinned(pin);
    let pictures = plot::write_pictures(&report, args.svg.as_deref(), args.png.as_deref())?;
    report.pictures = pictures.iter().map(|p| p.display().to_string()).collect();
    let mut out = std::io::stdout().lock();
    use std::io::Write as _;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", render_text(&report))?;
    }
    out.flush()?;
    Ok(ExitCode::from(exit::OK))
}

trait WithPinned {
    fn with_guest_pinned(self, pinned: bool) -> Self;
}

impl WithPinned for Report {
    fn with_guest_pinned(mut self, pinned: bool) -> Self {
        if let Some(g) = self.guest.as_mut() {
            g.pinned_for_run = pinned;
        }
        self
    }
}

/// The vCPU to measure on, the host CPU, and whether its thread must be
/// pinned there for the run: a vCPU whose thread is confined to one guarded
/// CPU is measured where it is; otherwise it is pinned to `--cpu` (or the
/// first guarded CPU) for the run, since a vCPU thread that may move cannot
/// be watched on one CPU.
fn choose_vcpu(
    guest: &MeasurableGuest,
    want_vcpu: Option<u32>,
    want_cpu: Option<u32>,
    guarded: &CpuSet,
) -> anyhow::Result<(crate::guests::Vcpu, u32, bool)> {
    let on_one_guarded = |tid: u32| {
        affinity::get(tid)
            .ok()
            .filter(|a| a.len() == 1)
            .and_then(|a| a.first())
            .filter(|c| guarded.contains(*c))
    };
    let vcpu = match want_vcpu {
        Some(i) => *guest.vcpus.iter().find(|v| v.index == i).ok_or_else(|| {
            anyhow!(
                "--vcpu {i}: guest {} has vCPUs {}",
                guest.name,
                guest
                    .vcpus
                    .iter()
                    .map(|v| v.index.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None => guest
            .vcpus
            .iter()
            .find(|v| on_one_guarded(v.tid).is_some_and(|c| want_cpu.is_none_or(|w| w == c)))
            .or_else(|| guest.vcpus.first())
            .copied()
            .ok_or_else(|| anyhow!("guest {} has no vCPU", guest.name))?,
    };
    match (on_one_guarded(vcpu.tid), want_cpu) {
        (Some(c), None) => Ok((vcpu, c, false)),
        (Some(c), Some(w)) if c == w => Ok((vcpu, c, false)),
        (Some(c), Some(w)) => bail!(
            "--cpu {w}: vCPU {} of guest {} (thread {}) is pinned to CPU {c}; measure there \
             (leave out --cpu) or pin it to CPU {w} first",
            vcpu.index,
            guest.name,
            vcpu.tid
        ),
        (None, w) => {
            // A guarded CPU another guest's vCPU is pinned to is that guest's:
            // pinning this vCPU there would take CPU time from it (and a
            // registration would keep an enforcing daemon from evicting it).
            let owners = other_owners(guest.pid, guarded);
            let cpu = match w {
                Some(w) if guarded.contains(w) => {
                    if let Some(owner) = owners.get(&w) {
                        eprintln!(
                            "pinguard: warning: --cpu {w} is {owner}'s: the measured vCPU shares it for the run"
                        );
                    }
                    w
                }
                Some(w) => bail!("--cpu {w}: CPU {w} is not guarded (guarded CPUs: {guarded})"),
                None => match guarded.iter().find(|c| !owners.contains_key(c)) {
                    Some(c) => c,
                    None => bail!(
                        "every guarded CPU is another guest's ({}): pin a vCPU of {} to a guarded CPU \
                         first, or name one with --cpu to share it for the run",
                        owners
                            .iter()
                            .map(|(c, o)| format!("CPU {c}: {o}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        guest.name
                    ),
                },
            };
            Ok((vcpu, cpu, true))
        }
    }
}

/// Guarded CPUs that a vCPU of another guest (not `pid`) is pinned to alone,
/// with that vCPU's name: what discovery finds on the host now.
fn other_owners(pid: u32, guarded: &CpuSet) -> std::collections::BTreeMap<u32, String> {
    let guests = Discoverer::new(Default::default(), DiscoverOptions::default())
        .scan()
        .map(|d| d.guests)
        .unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    for g in guests.iter().filter(|g| g.pid != pid) {
        for v in &g.vcpus {
            if let Ok(a) = affinity::get(v.tid)
                && a.len() == 1
                && let Some(c) = a.first()
                && guarded.contains(c)
            {
                out.insert(c, format!("guest {} vCPU {}", g.name, v.index));
            }
        }
    }
    out
}

/// A vCPU thread pinned for the run; its affinity is put back on drop.
struct PinnedForRun {
    tid: u32,
    before: CpuSet,
}

impl PinnedForRun {
    fn pin(tid: u32, cpu: u32) -> anyhow::Result<Self> {
        let before = affinity::get(tid)?;
        affinity::apply_and_verify(tid, &CpuSet::single(cpu))?;
        eprintln!("pinguard: vCPU thread {tid} pinned to CPU {cpu} for the run (was {before})");
        Ok(Self { tid, before })
    }
}

impl Drop for PinnedForRun {
    fn drop(&mut self) {
        match affinity::apply_and_verify(self.tid, &self.before) {
            Ok(()) => eprintln!(
                "pinguard: vCPU thread {} put back on CPUs {}",
                self.tid, self.before
            ),
            Err(e) => log::warn!(
                "could not put vCPU thread {} back on CPUs {}: {e}",
                self.tid,
                self.before
            ),
        }
    }
}

/// The guest's kernel and what the measurement needs from it.
struct GuestFacts {
    release: String,
    version: String,
    preemption: crate::latency::host::Preemption,
    online: CpuSet,
    /// Its CLOCK_REALTIME minus its CLOCK_MONOTONIC.
    offs_real_ns: i64,
}

impl GuestFacts {
    fn read(agent: &mut Agent, vm: &str) -> anyhow::Result<Self> {
        let uname = run_ok(agent, vm, "uname", &["-r", "-v"])?;
        let uname = uname.trim();
        let (release, version) = uname.split_once(' ').unwrap_or((uname, ""));
        // Neither is needed; both make the preemption model more precise.
        let cmdline = run_ok(agent, vm, "cat", &["/proc/cmdline"]).unwrap_or_default();
        let realtime = run_ok(agent, vm, "cat", &["/sys/kernel/realtime"]).ok();
        let debugfs = run_ok(agent, vm, "cat", &["/sys/kernel/debug/sched/preempt"]).ok();
        let online = run_ok(agent, vm, "cat", &["/sys/devices/system/cpu/online"])?;
        let online = CpuSet::parse(online.trim())
            .map_err(|e| anyhow!("guest {vm}: /sys/devices/system/cpu/online: {e}"))?;
        let timer_list = run_ok(agent, vm, "cat", &["/proc/timer_list"])?;
        let offs_real_ns = realtime_offset(&timer_list).ok_or_else(|| {
            anyhow!(
                "guest {vm}: its /proc/timer_list has no CLOCK_REALTIME base offset (clock 1, \
                 .offset): the guest's monotonic clock cannot be aligned with the host's"
            )
        })?;
        // The measurement itself: fail now, with the fix, rather than later.
        match agent.run("cyclictest", &["--help"], AGENT_TIMEOUT) {
            Ok(_) => {}
            Err(AgentError::Rejected { desc, .. }) => bail!(
                "guest {vm} has no cyclictest ({desc}): install rt-tests in the guest \
                 (apt-get install rt-tests, dnf install realtime-tests)"
            ),
            Err(e) => return Err(e).context(format!("guest {vm}: running cyclictest")),
        }
        Ok(Self {
            release: release.to_string(),
            version: version.to_string(),
            preemption: preemption(
                version,
                realtime.as_deref(),
                debugfs.as_deref(),
                &KernelCmdline::parse(cmdline.trim()),
            ),
            online,
            offs_real_ns,
        })
    }
}

/// Runs a short command in the guest; its stdout if it succeeded.
fn run_ok(agent: &mut Agent, vm: &str, path: &str, args: &[&str]) -> anyhow::Result<String> {
    let r = agent
        .run(path, args, AGENT_TIMEOUT)
        .with_context(|| format!("guest {vm}: running {path} {}", args.join(" ")))?;
    if !r.success() {
        bail!(
            "guest {vm}: {path} {} failed ({}): {}",
            args.join(" "),
            r.status(),
            r.stderr_text().trim()
        );
    }
    Ok(r.stdout_text())
}

/// cyclictest's arguments inside the guest: one thread on the vCPU, its
/// main thread on the guest's other CPUs (if any), every sample printed
/// (`-v`) and the wake-ups aligned to whole seconds of the guest's clock.
fn guest_cyclictest_args(config: &CyclictestConfig, vcpu: u32, main_cpus: &CpuSet) -> Vec<String> {
    let mut a: Vec<String> = ["-m", "-q", "-v", "-t1", "-a"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(vcpu.to_string());
    if !main_cpus.is_empty() {
        a.push(format!("--mainaffinity={main_cpus}"));
    }
    a.extend([
        "-p".into(),
        config.priority.to_string(),
        format!("--policy={}", config.policy.cyclictest_name()),
        "-i".into(),
        config.interval_us().to_string(),
        "-h".into(),
        config.histogram_max_us().to_string(),
        "--secaligned".into(),
    ]);
    if config.duration.subsec_nanos() == 0 {
        a.extend(["-D".into(), config.duration.as_secs().to_string()]);
    } else {
        let loops = (config.duration.as_nanos() / config.interval.as_nanos()).max(1);
        a.extend(["-l".into(), loops.to_string()]);
    }
    a.extend(config.extra.iter().cloned());
    a
}

/// Host CLOCK_MONOTONIC around `guest-get-time` readings.
fn read_clock(agent: &mut Agent, offs_real_ns: i64) -> anyhow::Result<Vec<ClockReading>> {
    let mut out = Vec::with_capacity(CLOCK_READINGS);
    for _ in 0..CLOCK_READINGS {
        let before = monotonic_ns();
        let real = agent.get_time_ns(AGENT_TIMEOUT)?;
        let after = monotonic_ns();
        let mono = real.saturating_sub(offs_real_ns);
        out.push(ClockReading {
            host_before_ns: before,
            host_after_ns: after,
            guest_ns: u64::try_from(mono).unwrap_or(0),
        });
    }
    Ok(out)
}

struct Target<'a> {
    guest: &'a MeasurableGuest,
    vcpu_index: u32,
    vcpu_tid: u32,
    worst: usize,
}

/// What the agent thread brings back.
struct GuestRunResult {
    cmdline: String,
    guest_pid: i64,
    /// The measurement thread's /proc stat line as last read, and its tid.
    thread: Option<(u32, String)>,
    exec: ExecResult,
}

/// The measurement thread of guest process `pid`: its tid and stat line.
fn guest_thread(agent: &mut Agent, pid: i64) -> Option<(u32, String)> {
    let script = format!("cat /proc/{pid}/task/*/stat");
    let r = agent.run("/bin/sh", &["-c", &script], AGENT_TIMEOUT).ok()?;
    r.stdout_text().lines().find_map(|l| {
        let tid: u32 = l.split_whitespace().next()?.parse().ok()?;
        (i64::from(tid) != pid).then(|| (tid, l.to_string()))
    })
}

/// Field 22 (start time, clock ticks since boot) of a /proc stat line.
fn stat_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Runs cyclictest in the guest to its end: starts it when the guest clock
/// is early in a second (so `--secaligned`'s second is the next one, with
/// margin), checks the measurement thread's policy, and stops it (SIGINT)
/// when `stop` is set.
fn run_in_guest(
    agent: &mut Agent,
    args: &[String],
    config: &CyclictestConfig,
    clock: (i64, u64),
    stop: &AtomicBool,
) -> anyhow::Result<GuestRunResult> {
    // Wait until the guest's clock is 20-80 ms into a second.
    let guest_now = |host: u64| (host as i64 - clock.0).max(0) as u64;
    let frac = guest_now(monotonic_ns()) % 1_000_000_000;
    let wait_ns = match frac {
        ..20_000_000 => 20_000_000 - frac,
        20_000_000..=80_000_000 => 0,
        _ => 1_020_000_000 - frac,
    };
    std::thread::sleep(Duration::from_nanos(wait_ns));
    let cmdline = format!("cyclictest {}", args.join(" "));
    let pid = agent
        .exec("cyclictest", args, AGENT_TIMEOUT)
        .context("starting cyclictest in the guest")?;
    let started = Instant::now();
    let deadline = started + config.duration + ALIGN_WAIT + Duration::from_secs(30);
    let mut thread: Option<(u32, String)> = None;
    let mut policy_ok = false;
    let mut interrupted = false;
    loop {
        if let Some(exec) = agent.exec_status(pid, AGENT_TIMEOUT)? {
            return Ok(GuestRunResult {
                cmdline,
                guest_pid: pid,
                thread,
                exec,
            });
        }
        if !policy_ok && let Some((tid, stat)) = guest_thread(agent, pid) {
            if let Some(s) = Sched::parse_stat(&stat) {
                policy_ok = config.policy.matches(config.priority, &s);
                if !policy_ok && started.elapsed() > GUEST_POLICY_GRACE {
                    let _ = agent.run("kill", &["-KILL", &pid.to_string()], AGENT_TIMEOUT);
                    check_sched(config.policy, config.priority, tid, &s, "")
                        .context("inside the guest")?;
                }
            }
            thread = Some((tid, stat));
        }
        if stop.load(Ordering::Relaxed) && !interrupted {
            interrupted = true;
            let _ = agent.run("kill", &["-INT", &pid.to_string()], AGENT_TIMEOUT);
        }
        if Instant::now() > deadline {
            let _ = agent.run("kill", &["-KILL", &pid.to_string()], AGENT_TIMEOUT);
            bail!("cyclictest in the guest (pid {pid}) did not end by its deadline; killed it");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn measure(
    agent: &mut Agent,
    config: &CyclictestConfig,
    guest_args: &[String],
    target: Target<'_>,
    host: HostFacts,
    plan: &crate::placement::plan::Plan,
    facts: &GuestFacts,
) -> anyhow::Result<Report> {
    let cpu = config.cpu;
    let vm = target.guest.name.clone();
    let before = read_clock(agent, facts.offs_real_ns)?;
    let (offset_before, error_before) = estimate(&before, AGENT_CLOCK_RESOLUTION_NS)
        .context("no usable clock reading from the guest agent")?;

    let rt = runtime()?;
    // The event reader registers with the runtime it is made in.
    let _in_runtime = rt.enter();
    let (mut probe, mut events) = load_probe(cpu)?;
    policy::register(&mut probe, plan, &CpuSet::single(cpu))?;
    // The vCPU is the measured thread: its every wait is an episode, its
    // slices are no intrusions.
    probe.remove_owner(target.vcpu_tid)?;
    probe.set_watched(target.vcpu_tid, watch::PROBE)?;
    probe.set_allowed(target.vcpu_tid, Some(cpu))?;

    // An enforcing daemon would take a vCPU it does not know (a TCG guest's)
    // for an intruder and move it off the CPU: it is registered for the run.
    let control = super::latency::register_with_daemon(
        target.guest.pid,
        Some(target.vcpu_tid),
        cpu,
        "pinguard latency --vm",
        "the vCPU thread",
    )?;
    let steal_before = steal_ns(cpu);
    let started_unix_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let t0 = monotonic_ns();
    // No process's slices are the measurement here (the vCPU's are allowed):
    // tgid 0 is nobody's.
    let mut recorder = Recorder::new(
        cpu,
        t0,
        config.duration + ALIGN_WAIT + Duration::from_secs(1),
        0,
        target.worst,
        Box::new(resolve_class),
    );
    recorder.keep_history();
    let end = recorder.end();
    let mut decode_errors = 0u64;
    eprintln!(
        "pinguard: measuring inside guest {vm} ({}) on vCPU {} = host thread {} on CPU {cpu} for {:?}",
        target.guest.accelerator, target.vcpu_index, target.vcpu_tid, config.duration
    );

    // The agent works on its own thread (its exchanges block); events are
    // read here meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let guest_result = std::thread::scope(|scope| -> anyhow::Result<GuestRunResult> {
        let stop2 = stop.clone();
        let agent_ref = &mut *agent;
        scope.spawn(move || {
            let r = run_in_guest(
                agent_ref,
                guest_args,
                config,
                (offset_before, error_before),
                &stop2,
            );
            let _ = tx.send(r);
        });
        let mut handle = |r: Result<KernelEvent, DecodeError>| match r {
            Ok(ev) => recorder.on_event(&ev),
            Err(e) => {
                decode_errors += 1;
                log::warn!("undecodable event: {e}");
            }
        };
        let stop_signal = wait_for_stop();
        tokio::pin!(stop_signal);
        let mut interrupted = false;
        let result = rt.block_on(async {
            loop {
                tokio::select! {
                    r = EventReader::next_batch(&mut events, &mut handle) => r.context("reading events")?,
                    r = &mut rx => {
                        return r.map_err(|_| anyhow!("the guest agent thread ended without a result"))?;
                    }
                    r = &mut stop_signal, if !interrupted => {
                        r?;
                        interrupted = true;
                        eprintln!("pinguard: interrupted; stopping cyclictest in the guest");
                        end.set(end.get().min(monotonic_ns()));
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
        });
        if result.is_err() {
            // The agent thread must not run cyclictest to its end first.
            stop.store(true, Ordering::Relaxed);
        }
        events.get_mut().drain(&mut handle);
        result
    })?;
    let elapsed_ns = monotonic_ns().saturating_sub(t0);
    let after = read_clock(agent, facts.offs_real_ns)?;
    let (offset_after, error_after) = estimate(&after, AGENT_CLOCK_RESOLUTION_NS)
        .context("no usable clock reading from the guest agent after the run")?;

    let exec = &guest_result.exec;
    if !exec.success() {
        bail!(
            "cyclictest in guest {vm} failed ({}): {}\ncommand line: {}",
            exec.status(),
            super::latency::last_lines(&exec.stderr_text(), 10),
            guest_result.cmdline
        );
    }
    let (histogram, samples) = parse_verbose_output(&exec.stdout_text()).with_context(|| {
        format!(
            "reading cyclictest's output from guest {vm}; its stderr: {}",
            super::latency::last_lines(&exec.stderr_text(), 5)
        )
    })?;
    let (tid, stat) = guest_result
        .thread
        .clone()
        .context("the measurement thread of cyclictest in the guest was never seen")?;
    let sched = Sched::parse_stat(&stat);
    if let Some(s) = &sched {
        check_sched(config.policy, config.priority, tid, s, &exec.stderr_text())
            .context("inside the guest")?;
    }
    let start_ticks =
        stat_start_ticks(&stat).context("the guest thread's /proc stat has no start time")?;
    let base = secaligned_base(start_ticks.saturating_mul(1_000_000_000 / GUEST_USER_HZ));
    let guest_start = before.first().map(|r| r.guest_ns).unwrap_or(0);
    let guest_end = after.last().map(|r| r.guest_ns).unwrap_or(guest_start);
    let map = ClockMap {
        guest_start_ns: guest_start,
        guest_end_ns: guest_end,
        offset_start_ns: offset_before,
        offset_end_ns: offset_after,
        error_ns: error_before.max(error_after),
    };
    let targets = wake_targets(base, config.interval.as_nanos() as u64, &samples);
    let worst = match_worst(&recorder, &samples, &targets, &map, t0, target.worst);

    let steal = match (steal_before, steal_ns(cpu)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let history_dropped = recorder.history_dropped();
    let (noise, counters) = read_noise(probe, cpu, 0, steal)?;
    let recorded = recorder.finish();
    let rtts: Vec<u64> = before
        .iter()
        .chain(&after)
        .map(|r| r.host_after_ns.saturating_sub(r.host_before_ns))
        .collect();
    let guest_run = GuestRun {
        vm: vm.clone(),
        pid: target.guest.pid,
        accelerator: target.guest.accelerator.clone(),
        vcpu: target.vcpu_index,
        vcpu_tid: target.vcpu_tid,
        pinned_for_run: false,
        kernel_release: facts.release.clone(),
        kernel_version: facts.version.clone(),
        preemption: facts.preemption.clone(),
        agent: agent.addr().to_string(),
        clock: ClockAlignment {
            offset_ns: offset_before,
            error_ns: map.error_ns,
            exchanges: (before.len() + after.len()) as u32,
            rtt_min_ns: rtts.iter().copied().min().unwrap_or(0),
            rtt_max_ns: rtts.iter().copied().max().unwrap_or(0),
            method: format!(
                "guest CLOCK_MONOTONIC = guest-get-time (CLOCK_REALTIME) - offs_real from its \
                 /proc/timer_list; {CLOCK_READINGS} readings before and after the run, each \
                 bracketed by host CLOCK_MONOTONIC reads; the shortest round trip of each set \
                 gives the offset (error: half of it + 1 µs), interpolated over the run"
            ),
            drift_ns: offset_after - offset_before,
        },
        worst,
        samples_seen: samples.len() as u64,
    };
    let mut report = Report::build(Inputs {
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
                path: format!("cyclictest in guest {vm} (pid {})", guest_result.guest_pid),
                version: None,
                cmdline: guest_result.cmdline.clone(),
            },
            // The guest's thread id, not the host's.
            measurement_tids: vec![tid],
            interrupted: stop.load(Ordering::Relaxed),
            daemon: control.as_ref().map(|c| DaemonInfo {
                registered: true,
                ..c.daemon.clone()
            }),
        },
        histogram,
        json: None,
        recorded,
        noise,
        probe: ProbeHealth {
            events_lost: counters.events_lost,
            thread_map_full: counters.thread_map_full,
            decode_errors,
        },
    })
    .with_guest(guest_run);
    if history_dropped > 0 {
        report.notes.push(format!(
            "{history_dropped} host-side waits or IRQ runs were dropped from the history kept for \
             matching (a long run): the earliest wake-ups may show less than happened"
        ));
    }
    Ok(report)
}

/// The guest's `n` worst wake-ups, each with the host's account of its window.
fn match_worst(
    recorder: &Recorder,
    samples: &[Sample],
    targets: &[u64],
    map: &ClockMap,
    t0: u64,
    n: usize,
) -> Vec<GuestWakeup> {
    worst_samples(samples, n)
        .into_iter()
        .map(|i| {
            let s = samples[i];
            let target = targets[i];
            let latency_ns = s.latency_us * 1_000;
            let from = map.to_host(target).saturating_sub(map.error_ns);
            // The wake-up itself (up to 1 µs after the printed latency).
            let to = map.to_host(target + latency_ns + 1_000) + map.error_ns;
            let view = recorder.window(from, to);
            let cause = host_cause(latency_ns, &view);
            let mut w = GuestWakeup {
                cycle: s.cycle,
                latency_us: s.latency_us,
                guest_target_ns: target,
                host_from_ns: from,
                host_to_ns: to,
                offset_ns: from.saturating_sub(t0),
                vcpu_wait_ns: view.wait_ns,
                threads: view.threads,
                irq_ns: view.irq_ns,
                softirq_ns: view.softirq_ns,
                irqs: view.irqs,
                softirqs: view.softirqs,
                cause,
                explanation: String::new(),
            };
            w.explanation = explain(&w);
            w
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_command_line_prints_every_sample_and_aligns_to_seconds() {
        let config = CyclictestConfig {
            cpu: 1,
            main_cpus: CpuSet::single(0),
            policy: crate::latency::SchedPolicy::Other,
            priority: 0,
            interval: Duration::from_micros(500),
            duration: Duration::from_secs(3),
            histogram_max: Duration::from_millis(10),
            extra: vec![],
        };
        let a = guest_cyclictest_args(&config, 0, &CpuSet::default()).join(" ");
        assert_eq!(
            a,
            "-m -q -v -t1 -a 0 -p 0 --policy=other -i 500 -h 10000 --secaligned -D 3"
        );
        let a = guest_cyclictest_args(&config, 1, &CpuSet::single(0)).join(" ");
        assert!(a.contains("-a 1 --mainaffinity=0 -p 0"), "{a}");
    }

    #[test]
    fn the_start_time_is_field_22() {
        let stat = "1234 (cyclic test) S 1 1 0 0 -1 4194560 0 0 0 0 0 0 0 0 -96 0 2 0 \
                    4321 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 -1 0 95 1 0 0 0";
        assert_eq!(stat_start_ticks(stat), Some(4321));
        assert_eq!(stat_start_ticks("garbage"), None);
    }
}
