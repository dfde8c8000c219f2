//! The daemon's configuration: a TOML file, overridden by command-line flags.
//!
//! Unknown keys and bad values are errors that name the key and what was
//! expected; the daemon refuses to start with them (and on SIGHUP keeps the
//! configuration it has).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use thiserror::Error;

use crate::{
    host::cpulist::{CpuSeq, CpuSet},
    placement::{
        plan::{EmulatorPolicy, PlanOptions, SmtPolicy},
        sched::VcpuSched,
    },
    units::parse_duration,
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";
/// The file every command reads its placement policy from when no
/// `--config` is given and it exists: one policy for `pin`, `audit`,
/// `watch`, `latency` and `run`.
pub const DEFAULT_PATH: &str = "/etc/pinguard/pinguard.toml";
pub const MIN_EVENT_INTERVAL: Duration = Duration::from_millis(10);
pub const MIN_VERIFY_INTERVAL: Duration = Duration::from_millis(50);
pub const MIN_RESCAN_INTERVAL: Duration = Duration::from_millis(100);
pub const MIN_ISOLATION_INTERVAL: Duration = Duration::from_millis(100);

/// What `pinguard run` does about the host's isolation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Leave it to the boot parameters and `pinguard isolate`.
    #[default]
    Off,
    /// Apply `pinguard isolate` at start and keep it applied.
    Runtime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Watch and report only; never change an affinity.
    Observe,
    /// Re-pin drifted vCPUs and evict intruders.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Observe => "observe",
            Self::Enforce => "enforce",
        }
    }
}

/// What the command line says on top of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub path: Option<PathBuf>,
    pub guard: Option<CpuSet>,
    pub mode: Option<Mode>,
    pub listen: Option<SocketAddr>,
    pub qmp: Vec<PathBuf>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The file as written (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    guard: Option<CpuSet>,
    mode: Option<Mode>,
    listen: Option<SocketAddr>,
    #[serde(default)]
    qmp: Vec<PathBuf>,
    event_interval: Option<String>,
    verify_interval: Option<String>,
    rescan_interval: Option<String>,
    bpf_stats: Option<bool>,
    isolation: Option<Isolation>,
    isolation_interval: Option<String>,
    isolation_undo_on_exit: Option<bool>,
    keep_sensors_on_exit: Option<bool>,
    #[serde(default)]
    placement: PlacementFile,
    #[serde(default)]
    vm: Vec<VmFile>,
    #[serde(default)]
    allow: Vec<AllowRule>,
    #[serde(default)]
    enforce: EnforceFile,
    #[serde(default)]
    observer: ObserverFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObserverFile {
    affinity_syscalls: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementFile {
    emulator: Option<String>,
    smt: Option<SmtPolicy>,
    allow_shared: Option<bool>,
    vcpu_sched: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    name: String,
    cpus: CpuSeq,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnforceFile {
    min_interval: Option<String>,
    max_backoff: Option<String>,
}

/// A thread permitted on guarded CPUs. Every given criterion must match.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// Thread name pattern (`*` and `?` wildcards), e.g. "chronyd" or "irq/*".
    pub comm: Option<String>,
    /// cgroup v2 path prefix, e.g. "/system.slice/rt-app.service".
    pub cgroup: Option<String>,
    /// Process id.
    pub tgid: Option<u32>,
    /// CPUs it may use (default: every guarded CPU). The kernel keeps one CPU or "any" per
    /// thread, so a list naming only some guarded CPUs is applied to the CPU the thread is seen on.
    pub cpus: Option<CpuSet>,
}

impl AllowRule {
    /// Whether a thread with these facts is allowed (cgroup is read only if needed).
    pub fn matches(&self, comm: &str, tgid: u32, cgroup: impl FnOnce() -> Option<String>) -> bool {
        if self.comm.is_none() && self.cgroup.is_none() && self.tgid.is_none() {
            return false;
        }
        if let Some(p) = &self.comm
            && !glob(p, comm)
        {
            return false;
        }
        if let Some(t) = self.tgid
            && t != tgid
        {
            return false;
        }
        if let Some(prefix) = &self.cgroup {
            match cgroup() {
                Some(path)
                    if path == *prefix
                        || path.starts_with(&format!("{}/", prefix.trim_end_matches('/'))) => {}
                _ => return false,
            }
        }
        true
    }
}

/// Shell-style matching with `*` (any run) and `?` (any one character).
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A TOML error on one line (it goes to logs): position, the offending line, the reason.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line_no = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!(
                "line {line_no}, column {col} (`{line}`): {}",
                e.message().trim()
            )
        }
        None => e.message().trim().to_string(),
    }
}

/// The resolved configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub guard: Option<CpuSet>,
    pub mode: Mode,
    /// The file or the command line set `mode` (a reload may change the mode
    /// only then: an empty or truncated file must not switch enforcement off).
    pub mode_explicit: bool,
    pub listen: SocketAddr,
    pub qmp: Vec<PathBuf>,
    pub event_interval: Duration,
    /// How often every vCPU's affinity is checked (a safety net behind the events).
    pub verify_interval: Duration,
    /// How often /proc is rescanned for guests (a safety net behind exec/exit events).
    pub rescan_interval: Duration,
    /// Keep kernel BPF statistics on to export pinguard's own eBPF cost. Off
    /// by default: while on, the kernel times every BPF program run of the
    /// host (~50 ns per sched_switch here: half of what pinguard costs on a
    /// housekeeping CPU, docs/BENCHMARKS.md), not only pinguard's.
    pub bpf_stats: bool,
    /// `runtime`: apply the runtime isolation at start and keep it.
    pub isolation: Isolation,
    /// How often the isolation is re-planned and what drifted put back.
    pub isolation_interval: Duration,
    /// Undo the isolation when the daemon exits (default: keep it, so a
    /// restart leaves no gap for IRQs and tasks to land on guarded CPUs).
    pub isolation_undo_on_exit: bool,
    /// Leave the eBPF programs attached and pinned in bpffs when the daemon
    /// stops (SIGTERM, SIGINT), for the next start to adopt (an upgrade
    /// without a gap in the counters). Default: detach and remove them.
    pub keep_sensors_on_exit: bool,
    pub emulator: EmulatorPolicy,
    pub smt: SmtPolicy,
    pub allow_shared: bool,
    /// Scheduling policy `pin` gives vCPU threads (`None`: leave it).
    pub vcpu_sched: Option<VcpuSched>,
    pub vm: Vec<(String, CpuSeq)>,
    pub allow: Vec<AllowRule>,
    /// Minimum time between two enforcement actions on one thread.
    pub min_interval: Duration,
    /// Longest back-off for a thread that keeps coming back.
    pub max_backoff: Duration,
    /// Attach the sched_setaffinity syscall tracepoints, which name who
    /// changed a vCPU's affinity, at the price of every syscall of every
    /// thread of the host taking the traced-syscall slow path. Off: drifts
    /// are still caught (migration events, the periodic verify), unnamed.
    pub affinity_syscalls: bool,
}

impl Config {
    /// The placement policy: emulator placement, explicit VM maps, SMT, sharing.
    pub fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            vm: self.vm.clone(),
            emulator: self.emulator.clone(),
            smt: self.smt,
            allow_shared: self.allow_shared,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            guard: None,
            mode: Mode::Observe,
            mode_explicit: false,
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            qmp: Vec::new(),
            event_interval: Duration::from_secs(1),
            verify_interval: Duration::from_secs(1),
            rescan_interval: Duration::from_secs(30),
            bpf_stats: false,
            isolation: Isolation::Off,
            isolation_interval: Duration::from_secs(5),
            isolation_undo_on_exit: false,
            keep_sensors_on_exit: false,
            emulator: EmulatorPolicy::Housekeeping,
            smt: SmtPolicy::PreferSiblings,
            allow_shared: false,
            vcpu_sched: None,
            vm: Vec::new(),
            allow: Vec::new(),
            min_interval: Duration::from_millis(100),
            max_backoff: Duration::from_secs(60),
            affinity_syscalls: false,
        }
    }
}

impl Config {
    /// Reads the file (`--config`, else [`DEFAULT_PATH`] if it exists) and
    /// applies the flags on top.
    pub fn load(args: &Overrides) -> Result<Self, ConfigError> {
        let path = args.path.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_PATH);
            default.is_file().then_some(default)
        });
        let mut config = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::parse(&text, path)?
            }
            None => Self::default(),
        };
        if let Some(g) = &args.guard {
            config.guard = Some(g.clone());
        }
        if let Some(m) = args.mode {
            config.mode = m;
            config.mode_explicit = true;
        }
        if let Some(l) = args.listen {
            config.listen = l;
        }
        config.qmp.extend(args.qmp.iter().cloned());
        Ok(config)
    }

    pub fn parse(text: &str, path: &std::path::Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line(text, &e),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.into(),
            message,
        };
        let duration =
            |key: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
                match v {
                    Some(s) => parse_duration(s).map_err(|m| invalid(key, m)),
                    None => Ok(default),
                }
            };
        let d = Self::default();
        // Floors: shorter intervals would spin the daemon (a 1 ns verify
        // interval is most of a core) or flood the ring buffer.
        let at_least = |key: &str, v: Duration, min: Duration| {
            if v < min {
                Err(invalid(
                    key,
                    format!("must be at least {}", humantime::format_duration(min)),
                ))
            } else {
                Ok(v)
            }
        };
        let vcpu_sched = match &file.placement.vcpu_sched {
            Some(v) => Some(v.parse().map_err(|m| invalid("placement.vcpu_sched", m))?),
            None => None,
        };
        let emulator = match &file.placement.emulator {
            Some(e) => e.parse().map_err(|m| invalid("placement.emulator", m))?,
            None => d.emulator.clone(),
        };
        let mut vm = Vec::new();
        for (i, v) in file.vm.into_iter().enumerate() {
            if v.name.trim().is_empty() {
                return Err(invalid(
                    &format!("vm[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if v.cpus.is_empty() {
                return Err(invalid(
                    &format!("vm[{i}].cpus"),
                    "must list one CPU per vCPU".into(),
                ));
            }
            vm.push((v.name, v.cpus));
        }
        for (i, a) in file.allow.iter().enumerate() {
            if a.comm.is_none() && a.cgroup.is_none() && a.tgid.is_none() {
                return Err(invalid(
                    &format!("allow[{i}]"),
                    "needs at least one of comm, cgroup, tgid".into(),
                ));
            }
        }
        if let Some(g) = &file.guard
            && g.is_empty()
        {
            return Err(invalid(
                "guard",
                "must list at least one CPU, e.g. \"2-3\"".into(),
            ));
        }
        Ok(Self {
            guard: file.guard,
            mode: file.mode.unwrap_or(d.mode),
            mode_explicit: file.mode.is_some(),
            listen: file.listen.unwrap_or(d.listen),
            qmp: file.qmp,
            event_interval: at_least(
                "event_interval",
                duration("event_interval", &file.event_interval, d.event_interval)?,
                MIN_EVENT_INTERVAL,
            )?,
            verify_interval: at_least(
                "verify_interval",
                duration("verify_interval", &file.verify_interval, d.verify_interval)?,
                MIN_VERIFY_INTERVAL,
            )?,
            rescan_interval: at_least(
                "rescan_interval",
                duration("rescan_interval", &file.rescan_interval, d.rescan_interval)?,
                MIN_RESCAN_INTERVAL,
            )?,
            bpf_stats: file.bpf_stats.unwrap_or(d.bpf_stats),
            isolation: file.isolation.unwrap_or(d.isolation),
            isolation_interval: at_least(
                "isolation_interval",
                duration(
                    "isolation_interval",
                    &file.isolation_interval,
                    d.isolation_interval,
                )?,
                MIN_ISOLATION_INTERVAL,
            )?,
            isolation_undo_on_exit: file
                .isolation_undo_on_exit
                .unwrap_or(d.isolation_undo_on_exit),
            keep_sensors_on_exit: file.keep_sensors_on_exit.unwrap_or(d.keep_sensors_on_exit),
            emulator,
            smt: file.placement.smt.unwrap_or(d.smt),
            allow_shared: file.placement.allow_shared.unwrap_or(d.allow_shared),
            vcpu_sched,
            vm,
            allow: file.allow,
            min_interval: at_least(
                "enforce.min_interval",
                duration(
                    "enforce.min_interval",
                    &file.enforce.min_interval,
                    d.min_interval,
                )?,
                Duration::from_millis(1),
            )?,
            max_backoff: at_least(
                "enforce.max_backoff",
                duration(
                    "enforce.max_backoff",
                    &file.enforce.max_backoff,
                    d.max_backoff,
                )?,
                Duration::from_millis(1),
            )?,
            affinity_syscalls: file
                .observer
                .affinity_syscalls
                .unwrap_or(d.affinity_syscalls),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn shipped_sample_config_is_valid_and_safe() {
        let c = parse(include_str!("../../packaging/pinguard.toml")).unwrap();
        assert_eq!(c.mode, Mode::Observe, "the sample must default to observe");
        let defaults = Config {
            mode_explicit: true,
            ..Config::default()
        };
        assert_eq!(c, defaults, "the sample documents the defaults");
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
            guard = "2-3"
            mode = "enforce"
            listen = "0.0.0.0:9000"
            event_interval = "500ms"
            bpf_stats = true
            isolation = "runtime"
            isolation_interval = "2s"
            isolation_undo_on_exit = true
            keep_sensors_on_exit = true
            [placement]
            emulator = "with-vcpu0"
            smt = "keep-siblings-free"
            [[vm]]
            name = "web"
            cpus = "2,3"
            [[allow]]
            comm = "chrony*"
            [enforce]
            min_interval = "50ms"
            [observer]
            affinity_syscalls = true
            "#,
        )
        .unwrap();
        assert!(c.affinity_syscalls);
        assert_eq!(c.guard, Some(CpuSet::parse("2-3").unwrap()));
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.event_interval, Duration::from_millis(500));
        assert_eq!(c.emulator, EmulatorPolicy::WithVcpu0);
        assert_eq!(c.smt, SmtPolicy::KeepSiblingsFree);
        assert_eq!(
            c.vm,
            vec![("web".to_string(), CpuSeq::parse("2,3").unwrap())]
        );
        assert_eq!(c.min_interval, Duration::from_millis(50));
        assert!(c.bpf_stats);
        assert_eq!(c.isolation, Isolation::Runtime);
        assert_eq!(c.isolation_interval, Duration::from_secs(2));
        assert!(c.isolation_undo_on_exit);
        assert!(c.keep_sensors_on_exit);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("gaurd = \"1\"").unwrap_err().to_string();
        assert!(e.contains("gaurd") && e.contains("test.toml"), "{e}");
        let e = parse("\nmode = \"loud\"").unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("`mode = \"loud\"`") && !e.contains('\n'),
            "{e}"
        );
        assert!(e.contains("observe") && e.contains("enforce"), "{e}");
        let e = parse("guard = \"1-x\"").unwrap_err().to_string();
        assert!(e.contains("guard") && e.contains("1-x"), "{e}");
        let e = parse("event_interval = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("key `event_interval`"), "{e}");
        let e = parse("[enforce]\nmax_backoff = \"0s\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("enforce.max_backoff") && e.contains("at least 1ms"),
            "{e}"
        );
        for (key, text) in [
            ("verify_interval", "verify_interval = \"1ns\""),
            ("rescan_interval", "rescan_interval = \"10ms\""),
            ("event_interval", "event_interval = \"0s\""),
            ("isolation_interval", "isolation_interval = \"10ms\""),
            ("enforce.min_interval", "[enforce]\nmin_interval = \"0s\""),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("key `{key}`: must be at least")), "{e}");
        }
        assert!(parse("verify_interval = \"50ms\"").is_ok());
        let e = parse("[[allow]]\ncpus = \"1\"").unwrap_err().to_string();
        assert!(e.contains("allow[0]"), "{e}");
        let e = parse("[placement]\nemulator = \"moon\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("placement.emulator"), "{e}");
        let e = parse("isolation = \"boot\"").unwrap_err().to_string();
        assert!(e.contains("isolation") && e.contains("runtime"), "{e}");
    }

    #[test]
    fn globs() {
        assert!(glob("chronyd", "chronyd"));
        assert!(glob("irq/*", "irq/24-virtio0"));
        assert!(glob("kworker/?:*", "kworker/1:2H"));
        assert!(!glob("chronyd", "chrony"));
        assert!(glob("*", ""));
        assert!(!glob("a*b", "acd"));
    }

    #[test]
    fn allow_rules() {
        let r = AllowRule {
            comm: Some("rt-*".into()),
            cgroup: Some("/rt.slice".into()),
            ..Default::default()
        };
        assert!(r.matches("rt-app", 1, || Some("/rt.slice/x.service".into())));
        assert!(!r.matches("rt-app", 1, || Some("/rt.slicex".into())));
        assert!(!r.matches("other", 1, || Some("/rt.slice".into())));
        assert!(!AllowRule::default().matches("x", 1, || None));
    }
}
