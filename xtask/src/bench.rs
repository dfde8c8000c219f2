//! `cargo xtask bench`: what pinguard costs on this machine.
//!
//! Four suites, all by default (`--only` picks some):
//! - `observer` ([`observer`]): the sched_switch program's cost per event
//!   (kernel bpf_stats) and the throughput a context-switch-heavy load loses
//!   with it attached, in three scenarios (a housekeeping CPU, a guarded CPU
//!   with its owner, a guarded CPU with intruders), for three hook kinds and
//!   empty programs on the same hooks (the floor).
//! - `daemon` ([`daemon`]): `pinguard run` against a real QEMU/KVM guest:
//!   re-pin latency after an affinity change, and the daemon's CPU, memory
//!   and in-kernel cost while the host runs a context-switch-heavy load.
//! - `daemon-overhead` and `peers` ([`whole`]): the whole daemon with its
//!   defaults against one empty program (its floor) and against bpftrace,
//!   `perf sched record` and a `ps` loop, as throughput ratios from
//!   interleaved pairs ([`noise`]), and which short intruders each one finds.
//!
//! Targets are printed next to the results but never fail the run: this is a
//! measurement. Errors (cannot attach, cannot pin, bpftool missing) do.
//! Every process and VM started here is stopped by a Drop guard, and
//! kernel.bpf_stats_enabled is put back, on every exit path including Ctrl-C.
use std::{
    fs,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use serde_json::{Value, json};
use testkit::{host, which};

use crate::{build, util};

mod daemon;
mod intruders;
mod noise;
mod observer;
mod peers;
pub mod scale;
pub mod vcpu_guest;
mod whole;

const W: &str = "bench";

/// The guarded CPU every pinguard started here is given, and the housekeeping CPU.
const GUARDED_CPU: usize = 1;
const OTHER_CPU: usize = 0;
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Below this share of idle CPU time, others' work swamps the effects we measure.
const QUIET_IDLE_PCT: f64 = 90.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Suite {
    /// The eBPF sched_switch observer: ns/event and throughput loss per scenario.
    Observer,
    /// `pinguard run` with a QEMU/KVM guest: re-pin latency, CPU and RSS under load.
    Daemon,
    /// The whole daemon (defaults) against one empty program: throughput
    /// ratios on a housekeeping CPU and a guarded vCPU, ns/event.
    DaemonOverhead,
    /// pinguard, bpftrace, perf sched and a ps loop side by side: cost and
    /// detection of short intruders.
    Peers,
    /// 10 000 threads and 50 guests: audit against ps, the daemon's CPU, RSS
    /// and rescans with guest churn (only when asked, ~2 minutes).
    Scale,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to measure (repeatable or comma-separated; default: all but scale).
    #[arg(
        long = "suite",
        visible_alias = "only",
        value_enum,
        value_name = "SUITE",
        value_delimiter = ','
    )]
    suites: Vec<Suite>,
    /// Interleaved without/with pairs per tool in daemon-overhead and peers
    /// (default 7, or 3 with --quick).
    #[arg(long, value_name = "N")]
    pairs: Option<usize>,
    /// Observer scenario (repeatable; default: all three).
    #[arg(long = "scenario", value_enum, value_name = "SCENARIO")]
    scenarios: Vec<observer::Scenario>,
    /// Interleaved detached/attached rounds per scenario (default 5, or 2 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// About 1.5 minutes instead of about 5: fewer rounds, shorter runs,
    /// fewer re-pins, a shorter daemon load.
    #[arg(long)]
    quick: bool,
    /// Program to measure (repeatable; default: all six, then `none`, which
    /// attaches nothing: its loss is the detached-vs-detached noise).
    #[arg(long = "program", value_name = "NAME")]
    programs: Vec<String>,
    /// Skip the `perf bench sched pipe` loads of the observer scenarios.
    #[arg(long)]
    no_perf: bool,
    /// Affinity changes whose re-pin latency is measured (default 100, or 20 with --quick).
    #[arg(long, value_name = "N")]
    repins: Option<u32>,
    /// Seconds of context-switch-heavy load while the daemon's CPU and RSS are
    /// sampled (default 20, or 8 with --quick).
    #[arg(long, value_name = "SECS")]
    load_secs: Option<u64>,
    /// Measure this pinguard binary instead of building target/release/pinguard
    /// (to compare two builds on the same machine: alternate runs of each).
    #[arg(long, value_name = "PATH")]
    bin: Option<std::path::PathBuf>,
}

extern "C" fn on_signal(_: nix::libc::c_int) {
    testkit::wait::interrupt();
}

/// Ctrl-C / SIGTERM only set the kit's flag, so the benchmark stops at its
/// next step or wait and the Drop guards (bpf_stats, children, the guest) run.
fn install_signal_handlers() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (testkit::wait::interrupt),
        // which is async-signal-safe.
        unsafe { signal::sigaction(sig, &action) }
            .with_context(|| format!("installing the {sig} handler"))?;
    }
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let suites = if args.suites.is_empty() {
        vec![
            Suite::Observer,
            Suite::Daemon,
            Suite::DaemonOverhead,
            Suite::Peers,
        ]
    } else {
        args.suites.clone()
    };
    let observer_plan = if suites.contains(&Suite::Observer) {
        Some(observer::Plan::from_args(args)?)
    } else {
        None
    };
    let daemon_plan = if suites.contains(&Suite::Daemon) {
        Some(daemon::Plan::from_args(args)?)
    } else {
        None
    };
    let (overhead, peers) = (
        suites.contains(&Suite::DaemonOverhead),
        suites.contains(&Suite::Peers),
    );
    let whole_plan = if overhead || peers {
        Some(whole::Plan::from_args(args, overhead, peers)?)
    } else {
        None
    };
    let scale_plan = if suites.contains(&Suite::Scale) {
        Some(scale::Plan::from_args(args)?)
    } else {
        None
    };
    let needs_bpf = daemon_plan.is_some()
        || whole_plan.is_some()
        || scale_plan.is_some()
        || observer_plan.as_ref().is_some_and(|p| p.loads_bpf());
    if needs_bpf && !util::is_root() {
        bail!(
            "bench loads eBPF programs, starts pinguard run and sets kernel.bpf_stats_enabled: run it as root"
        );
    }
    install_signal_handlers()?;
    if std::thread::available_parallelism().map_or(0, |n| n.get()) < 2 {
        bail!("bench needs CPUs {OTHER_CPU} and {GUARDED_CPU}; this machine has one CPU");
    }

    let bin = if needs_bpf {
        which("bpftool").context("bpftool not found (cargo xtask setup installs it)")?;
        match &args.bin {
            Some(path) if path.is_file() => Some(path.clone()),
            Some(path) => bail!("--bin {}: no such file", path.display()),
            None => {
                build::run()?;
                Some(util::pinguard_bin()?)
            }
        }
    } else {
        None
    };
    // Restores the sysctl on every exit path, including errors and Ctrl-C.
    let stats = if needs_bpf {
        Some(BpfStats::capture()?)
    } else {
        None
    };
    warn_about_others();

    let date = utc_now();
    let idle_before = idle_pct(Duration::from_secs(1))?;
    warn_if_busy(idle_before, "before");
    let t0 = Instant::now();
    let observer = match &observer_plan {
        Some(plan) => Some(observer::run(plan, bin.as_deref(), stats.as_ref())?),
        None => None,
    };
    let daemon = match (&daemon_plan, &bin, &stats) {
        // A failure here still reports the observer's minutes of results.
        (Some(plan), Some(bin), Some(stats)) => Some(daemon::run(plan, bin, stats)),
        _ => None,
    };
    drop(stats);
    let whole = match (&whole_plan, &bin) {
        (Some(plan), Some(bin)) => Some(whole::run(plan, bin)),
        _ => None,
    };
    let scale = match (&scale_plan, &bin) {
        (Some(plan), Some(bin)) => Some(scale::run(plan, bin)),
        _ => None,
    };
    let idle_after = idle_pct(Duration::from_secs(1))?;
    warn_if_busy(idle_after, "after");

    let host = Host::read(date, [idle_before, idle_after], t0.elapsed());
    let mut md = host.markdown();
    let mut json = host.json();
    if let Some(o) = &observer {
        md.push_str(&o.markdown());
        json["observer"] = o.json();
    }
    if let Some(Ok(d)) = &daemon {
        md.push_str(&d.markdown());
        json["daemon"] = d.json();
    }
    if let Some(Ok(w)) = &whole {
        md.push_str(&w.markdown());
        json["whole_daemon"] = w.json();
        let dir = util::target_dir()?.join("bench");
        let mut own = host.json();
        own["whole_daemon"] = w.json();
        let text = serde_json::to_string_pretty(&own).context("serializing the results")?;
        fs::write(dir.join("whole-daemon.json"), text + "\n")
            .context("writing target/bench/whole-daemon.json")?;
        fs::write(dir.join("whole-daemon.md"), host.markdown() + &w.markdown())
            .context("writing target/bench/whole-daemon.md")?;
        eprintln!("{W}: wrote {}/whole-daemon.{{json,md}}", dir.display());
    }
    if let Some(Ok(s)) = &scale {
        md.push_str(&s.markdown());
        json["scale"] = s.json();
    }
    println!("{md}");
    let out = util::root().join("bench-out");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    fs::write(out.join("bench.md"), &md).context("writing bench-out/bench.md")?;
    let json = serde_json::to_string_pretty(&json).context("serializing the results")?;
    fs::write(out.join("bench.json"), json + "\n").context("writing bench-out/bench.json")?;
    eprintln!("{W}: wrote bench-out/bench.md and bench-out/bench.json");
    if let Some(Err(e)) = scale {
        return Err(e.context("scale suite (the report above has the other results)"));
    }
    if let Some(Err(e)) = whole {
        return Err(
            e.context("daemon-overhead/peers suites (the report above has the other results)")
        );
    }
    match daemon {
        Some(Err(e)) => Err(e.context("daemon suite (the report above has the other results)")),
        _ => Ok(()),
    }
}

/// Other pinguards add their own programs to every sched_switch, and other
/// guests would be managed by the daemon we start: say so up front.
fn warn_about_others() {
    let others = others_running();
    if !others.is_empty() {
        eprintln!(
            "{W}: WARNING: already running: {}; their eBPF programs and threads disturb the measurement",
            others.join(", ")
        );
    }
}

/// Guests and pinguards that are not ours, seen while measuring: their eBPF
/// programs run on every sched_switch too, our daemon manages (in enforce
/// mode: pins) their guests, and they may re-pin ours. Their presence makes
/// the numbers suspect, so the report names them.
#[derive(Default)]
struct Witness(std::collections::BTreeSet<String>);

impl Witness {
    fn look(&mut self, ours: &[u32]) {
        let me = std::process::id();
        for (pid, comm) in host::processes(is_pinguard_or_qemu) {
            if pid == me || ours.contains(&pid) {
                continue;
            }
            let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            let short: String = cmdline.trim().chars().take(100).collect();
            self.0.insert(format!("{comm} ({pid}: {short})"));
        }
    }

    fn into_list(self) -> Vec<String> {
        self.0.into_iter().collect()
    }
}

/// Processes whose eBPF programs or guests would disturb a measurement
/// (`comm` of a QEMU is its program name cut to 15 characters).
fn is_pinguard_or_qemu(comm: &str) -> bool {
    comm == "pinguard" || comm.starts_with("qemu-system-")
}

/// "comm (pid)" of the pinguards and guests running now, other than us.
fn others_running() -> Vec<String> {
    let me = std::process::id();
    host::processes(is_pinguard_or_qemu)
        .into_iter()
        .filter(|(pid, _)| *pid != me)
        .map(|(pid, comm)| format!("{comm} ({pid})"))
        .collect()
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

/// The kernel keeps BPF_OBJ_NAME_LEN - 1 characters of a program's name;
/// bpftool shows the full one when BTF has it.
const KERNEL_NAME_LEN: usize = 15;

fn prog_name_matches(shown: &str, program: &str) -> bool {
    let truncated: String = program.chars().take(KERNEL_NAME_LEN).collect();
    shown == program || shown == truncated
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

/// Nearest-rank percentile (`p` in 0..=100) of sorted values: the smallest
/// value with at least p% of the samples at or below it.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

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

/// The machine and the run, at the top of the report.
struct Host {
    command: String,
    date: String,
    kernel: String,
    cpu: String,
    cpus: usize,
    idle: [f64; 2],
    took: Duration,
}

impl Host {
    fn read(date: String, idle: [f64; 2], took: Duration) -> Self {
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
            command,
            date,
            kernel,
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            idle,
            took,
        }
    }

    fn markdown(&self) -> String {
        let [before, after] = self.idle;
        format!(
            "## pinguard benchmark\n\n\
             Command: `{}` (took {:.0} s)  \n\
             Date: {} · kernel {} · {} · {} online CPUs (CPU {GUARDED_CPU} guarded, CPU {OTHER_CPU} housekeeping)  \n\
             CPUs idle before/after the run (1 s each): {before:.0}% / {after:.0}%{}\n\n",
            self.command,
            self.took.as_secs_f64(),
            self.date,
            self.kernel,
            self.cpu,
            self.cpus,
            if before.min(after) < QUIET_IDLE_PCT {
                " — **busy machine: throughput losses and latencies are mostly noise**"
            } else {
                ""
            }
        )
    }

    fn json(&self) -> Value {
        json!({
            "command": self.command,
            "date": self.date,
            "kernel": self.kernel,
            "cpu": self.cpu,
            "online_cpus": self.cpus,
            "guarded_cpu": GUARDED_CPU,
            "housekeeping_cpu": OTHER_CPU,
            "idle_pct_before": self.idle[0],
            "idle_pct_after": self.idle[1],
            "took_s": self.took.as_secs_f64(),
        })
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
    fn spread_and_percentiles() {
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[1.0, 0.9, 0.95]), Some((0.9, 0.95, 1.0)));
        assert_eq!(spread(&[1.0, 0.9]), Some((0.9, 0.95, 1.0)));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
        // 50 samples: p99 is the largest.
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(50.0));
        assert_eq!(percentile(&v, 90.0), Some(45.0));
    }

    #[test]
    fn program_names_match_truncated() {
        assert!(prog_name_matches("switch_tracepoi", "switch_tracepoint"));
        assert!(prog_name_matches("switch_tracepoint", "switch_tracepoint"));
        assert!(!prog_name_matches("switch_tp_btf", "switch_raw_tp"));
    }

    #[test]
    fn date_is_civil() {
        let d = utc_now();
        assert!(d.len() == 20 && d.ends_with(" UTC"), "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
