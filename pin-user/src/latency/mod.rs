//! `pinguard latency`: cyclictest on a guarded CPU, and why its spikes happened.
//!
//! cyclictest (rt-tests) measures the latency the classic way: a SCHED_FIFO
//! thread sleeps until an absolute time and records how late it woke up. It
//! says THAT a spike happened. The eBPF probe watches that thread
//! (`watch::PROBE`) and everything else on its CPU at the same time, so every
//! wake-up-to-run wait comes with what overlapped it: hard IRQs, softirqs,
//! NMIs, and the threads that ran instead. That says WHY.
//!
//! This module holds the pure parts (cyclictest's command line and output,
//! statistics); [`attribution`] turns probe events into causes, [`host`]
//! records the kernel facts a run must be compared by, [`report`] is the JSON
//! document and its text rendering, [`compare`] the table of `--compare`
//! (pinguard reports and plain cyclictest output), [`plot`] draws the pictures.
pub mod attribution;
pub mod compare;
pub mod guest;
pub mod host;
pub mod plot;
pub mod report;

use std::{path::PathBuf, time::Duration};

use thiserror::Error;

use crate::host::{cpulist::CpuSet, procfs::Sched};

#[derive(Debug, Error)]
pub enum LatencyError {
    #[error(
        "cyclictest is not installed (it is in PATH nowhere): install rt-tests with `apt-get install rt-tests` \
         (Debian/Ubuntu), `dnf install realtime-tests` (Fedora/RHEL), or run `cargo xtask setup`"
    )]
    CyclictestMissing,
    #[error("cyclictest argument {arg:?} after `--` conflicts with pinguard: {hint}")]
    ConflictingArg { arg: String, hint: &'static str },
    #[error("invalid --{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unexpected cyclictest output: {0}")]
    Parse(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a pinguard latency report ({source})")]
    NotAReport {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: a {found:?} document, expected {expected:?} (written by another pinguard version?)"
    )]
    WrongFormat {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error(
        "cyclictest's measurement thread (tid {tid}) runs {found}, not the asked {expected}: \
         cyclictest changed the policy (e.g. \"policy and priority don't match\"){stderr}"
    )]
    PolicyMismatch {
        tid: u32,
        expected: String,
        found: String,
        /// cyclictest's own complaint, if it printed one.
        stderr: String,
    },
    #[error("{path}: {reason}")]
    InFile { path: PathBuf, reason: String },
    #[error(
        "{path}: {found}: not a pinguard-latency JSON report (no \"format\" field), not cyclictest -h \
         output (no '# Histogram' line), not cyclictest -v output (no \"thread: cycle: latency\" lines)"
    )]
    UnknownRunFile { path: PathBuf, found: String },
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

/// The measurement thread's scheduling policy: `other` is what a
/// general-purpose workload gets, `fifo`/`rr` the real-time classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedPolicy {
    Other,
    /// Reports written before the policy was recorded were all SCHED_FIFO.
    #[default]
    Fifo,
    Rr,
}

impl SchedPolicy {
    /// The `SCHED_*` number, as /proc/PID/task/TID/stat field 41 shows it.
    pub fn number(self) -> u32 {
        match self {
            Self::Other => 0,
            Self::Fifo => 1,
            Self::Rr => 2,
        }
    }

    /// cyclictest's `--policy` value.
    pub fn cyclictest_name(self) -> &'static str {
        match self {
            Self::Other => "other",
            Self::Fifo => "fifo",
            Self::Rr => "rr",
        }
    }

    pub fn is_realtime(self) -> bool {
        self != Self::Other
    }

    /// The priority used when none is given: 0 for other (the only valid
    /// one), 95 for the real-time classes (above the kernel's threaded IRQs
    /// at 50, below the watchdogs at 99).
    pub fn default_priority(self) -> u32 {
        if self.is_realtime() { 95 } else { 0 }
    }

    /// Whether a thread's scheduling class, read from /proc, is this policy
    /// at `priority`.
    pub fn matches(self, priority: u32, seen: &Sched) -> bool {
        seen.policy == self.number() && seen.rtprio == priority
    }
}

impl std::fmt::Display for SchedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Other => "SCHED_OTHER",
            Self::Fifo => "SCHED_FIFO",
            Self::Rr => "SCHED_RR",
        })
    }
}

/// How a policy and priority read: "SCHED_FIFO 95", "SCHED_OTHER".
pub fn policy_label(policy: SchedPolicy, priority: u32) -> String {
    if policy.is_realtime() {
        format!("{policy} {priority}")
    } else {
        policy.to_string()
    }
}

/// Checks what /proc says about the measurement thread against what was asked.
pub fn check_sched(
    policy: SchedPolicy,
    priority: u32,
    tid: u32,
    seen: &Sched,
    stderr: &str,
) -> Result<(), LatencyError> {
    if policy.matches(priority, seen) {
        return Ok(());
    }
    let found = match seen.policy {
        0 => "SCHED_OTHER".to_string(),
        1 => format!("SCHED_FIFO {}", seen.rtprio),
        2 => format!("SCHED_RR {}", seen.rtprio),
        n => format!("scheduling policy {n} ({} {})", seen.class, seen.rtprio),
    };
    let complaint: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Err(LatencyError::PolicyMismatch {
        tid,
        expected: policy_label(policy, priority),
        found,
        stderr: if complaint.is_empty() {
            String::new()
        } else {
            format!("; cyclictest said: {}", complaint.join(" / "))
        },
    })
}

/// Finds cyclictest in `PATH`.
pub fn find_cyclictest() -> Result<PathBuf, LatencyError> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("cyclictest"))
                .find(|p| p.is_file())
        })
        .ok_or(LatencyError::CyclictestMissing)
}

/// How cyclictest is run: one measurement thread on `cpu`, its main thread on
/// `main_cpus` (housekeeping), so the only pinguard-related thread on the
/// measured CPU is the one being measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CyclictestConfig {
    pub cpu: u32,
    pub main_cpus: CpuSet,
    pub policy: SchedPolicy,
    /// Real-time priority: 1-99 with fifo/rr, 0 with other.
    pub priority: u32,
    pub interval: Duration,
    pub duration: Duration,
    /// Latencies above this land in cyclictest's overflow count, not a bucket.
    pub histogram_max: Duration,
    /// Passed through after pinguard's own flags.
    pub extra: Vec<String>,
}

/// cyclictest flags pinguard sets itself, with what to use instead. Short
/// options also match with the value attached (`-p80`).
const OWN_FLAGS: &[(&[&str], &str)] = &[
    (&["-p", "--priority"], "use pinguard's --priority"),
    (&["-y", "--policy"], "use pinguard's --policy"),
    (&["-i", "--interval"], "use pinguard's --interval"),
    (
        &["-D", "--duration", "-l", "--loops"],
        "use pinguard's --duration",
    ),
    (
        &[
            "-a",
            "--affinity",
            "-t",
            "--threads",
            "-S",
            "--smp",
            "--mainaffinity",
        ],
        "pinguard runs one measurement thread on --cpu and cyclictest's main thread on housekeeping CPUs",
    ),
    (
        &["-h", "--histogram", "-H", "--histofall", "--histfile"],
        "pinguard asks for the histogram itself; use --histogram-max for its range",
    ),
    (
        &[
            "--json",
            "-q",
            "--quiet",
            "-v",
            "--verbose",
            "-N",
            "--nsecs",
            "-u",
            "--unbuffered",
        ],
        "pinguard reads cyclictest's output itself (quiet, microseconds, histogram and JSON)",
    ),
];

impl CyclictestConfig {
    /// Checks the values and the pass-through arguments before anything runs.
    pub fn validate(&self) -> Result<(), LatencyError> {
        let policy = self.policy.cyclictest_name();
        if self.policy.is_realtime() && !(1..=99).contains(&self.priority) {
            return Err(LatencyError::Invalid {
                field: "priority",
                reason: format!(
                    "{} does not go with --policy {policy}: real-time priorities are 1-99 \
                     (or measure a general-purpose thread with --policy other)",
                    self.priority
                ),
            });
        }
        if !self.policy.is_realtime() && self.priority != 0 {
            return Err(LatencyError::Invalid {
                field: "priority",
                reason: format!(
                    "{} does not go with --policy other: SCHED_OTHER threads have no real-time \
                     priority (use 0, or --policy fifo|rr for a real-time thread)",
                    self.priority
                ),
            });
        }
        let us = self.interval.as_nanos();
        if us < 1_000 || !us.is_multiple_of(1_000) {
            return Err(LatencyError::Invalid {
                field: "interval",
                reason: format!(
                    "{:?}: cyclictest takes whole microseconds (at least 1us), e.g. 1000us or 200us",
                    self.interval
                ),
            });
        }
        if self.duration < self.interval {
            return Err(LatencyError::Invalid {
                field: "duration",
                reason: format!(
                    "{:?} is shorter than the interval {:?}: no sample would be taken",
                    self.duration, self.interval
                ),
            });
        }
        let max = self.histogram_max.as_micros();
        if !(1..=10_000_000).contains(&max) {
            return Err(LatencyError::Invalid {
                field: "histogram-max",
                reason: format!(
                    "{:?}: expected 1us to 10s (latencies above it are only counted as overflows)",
                    self.histogram_max
                ),
            });
        }
        if self.main_cpus.is_empty() || self.main_cpus.contains(self.cpu) {
            return Err(LatencyError::Invalid {
                field: "cpu",
                reason: format!(
                    "cyclictest's main thread needs housekeeping CPUs other than CPU {} (got {:?})",
                    self.cpu,
                    self.main_cpus.to_string()
                ),
            });
        }
        for arg in &self.extra {
            check_extra(arg)?;
        }
        Ok(())
    }

    pub fn interval_us(&self) -> u64 {
        self.interval.as_micros() as u64
    }

    pub fn histogram_max_us(&self) -> u64 {
        self.histogram_max.as_micros() as u64
    }

    /// The arguments after `cyclictest`: `-D` for whole seconds, else `-l`
    /// loops (cyclictest's -D only takes whole seconds). The policy is always
    /// explicit, after `-p` and with a priority that goes with it: cyclictest
    /// quietly switches a non-real-time policy to SCHED_FIFO when `-p` comes
    /// after it or the priority is not 0.
    pub fn args(&self, json_path: &std::path::Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "-m",
            "-q",
            "-t1",
            "-a",
            &self.cpu.to_string(),
            &format!("--mainaffinity={}", self.main_cpus),
            // -p first: cyclictest's -p turns a non-real-time policy given
            // before it into SCHED_FIFO.
            "-p",
            &self.priority.to_string(),
            &format!("--policy={}", self.policy.cyclictest_name()),
            "-i",
            &self.interval_us().to_string(),
            "-h",
            &self.histogram_max_us().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.duration.subsec_nanos() == 0 {
            a.extend(["-D".into(), self.duration.as_secs().to_string()]);
        } else {
            let loops = (self.duration.as_nanos() / self.interval.as_nanos()).max(1);
            a.extend(["-l".into(), loops.to_string()]);
        }
        a.push(format!("--json={}", json_path.display()));
        a.extend(self.extra.iter().cloned());
        a
    }
}

fn check_extra(arg: &str) -> Result<(), LatencyError> {
    for (flags, hint) in OWN_FLAGS {
        for flag in *flags {
            let hit = if flag.starts_with("--") {
                arg == *flag || arg.strip_prefix(flag).is_some_and(|r| r.starts_with('='))
            } else {
                !arg.starts_with("--") && arg.starts_with(flag)
            };
            if hit {
                return Err(LatencyError::ConflictingArg {
                    arg: arg.to_string(),
                    hint,
                });
            }
        }
    }
    Ok(())
}

/// cyclictest's histogram output (`-h`, one thread): per-microsecond counts
/// and the summary comment lines after them.
#[derive(Debug, Clone, PartialEq)]
pub struct CyclictestHistogram {
    /// `buckets[us]`: samples with that latency in microseconds.
    pub buckets: Vec<u64>,
    /// Samples above the histogram's range.
    pub overflows: u64,
    /// `# Total:` (samples in buckets), `# Min/Avg/Max Latencies:` (µs, over all samples).
    pub total: Option<u64>,
    pub min_us: Option<u64>,
    pub avg_us: Option<f64>,
    pub max_us: Option<u64>,
}

/// Largest bucket index accepted, so a corrupt line cannot allocate gigabytes.
pub(crate) const MAX_BUCKETS: u64 = 10_000_001;

/// Parses cyclictest's `-h` output: lines `000042 000017` (µs, count of
/// thread 0) and `# Key: value` comments.
pub fn parse_histogram(text: &str) -> Result<CyclictestHistogram, LatencyError> {
    let mut h = CyclictestHistogram {
        buckets: Vec::new(),
        overflows: 0,
        total: None,
        min_us: None,
        avg_us: None,
        max_us: None,
    };
    let mut data_lines = 0usize;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let Some((key, value)) = comment.split_once(':') else {
                continue;
            };
            let value = value.split_whitespace().next().unwrap_or("");
            let num = || {
                value.parse::<u64>().map_err(|_| {
                    LatencyError::Parse(format!(
                        "line {}: {key:?} is not a number: {line:?}",
                        n + 1
                    ))
                })
            };
            match key.trim() {
                "Total" => h.total = Some(num()?),
                "Min Latencies" => h.min_us = Some(num()?),
                "Max Latencies" => h.max_us = Some(num()?),
                "Avg Latencies" => {
                    h.avg_us = Some(value.parse::<f64>().map_err(|_| {
                        LatencyError::Parse(format!("line {}: bad average: {line:?}", n + 1))
                    })?)
                }
                "Histogram Overflows" => h.overflows = num()?,
                _ => {}
            }
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(us), Some(count)) = (words.next(), words.next()) else {
            return Err(LatencyError::Parse(format!(
                "line {}: expected \"<µs> <count>\": {line:?}",
                n + 1
            )));
        };
        let (Ok(us), Ok(count)) = (us.parse::<u64>(), count.parse::<u64>()) else {
            return Err(LatencyError::Parse(format!(
                "line {}: expected \"<µs> <count>\": {line:?}",
                n + 1
            )));
        };
        if us >= MAX_BUCKETS {
            return Err(LatencyError::Parse(format!(
                "line {}: bucket {us} µs is beyond any histogram cyclictest writes",
                n + 1
            )));
        }
        let us = us as usize;
        if h.buckets.len() <= us {
            h.buckets.resize(us + 1, 0);
        }
        h.buckets[us] += count;
        data_lines += 1;
    }
    if data_lines == 0 {
        return Err(LatencyError::Parse(
            "no histogram lines (did cyclictest stop before the end of the run?)".into(),
        ));
    }
    let sum: u64 = h.buckets.iter().sum();
    if let Some(total) = h.total
        && total != sum
    {
        return Err(LatencyError::Parse(format!(
            "the histogram's buckets add up to {sum} samples but cyclictest says \"# Total: {total}\""
        )));
    }
    Ok(h)
}

/// What cyclictest's `--json` file says about its run.
#[derive(Debug, Clone, PartialEq)]
pub struct CyclictestJson {
    pub version: Option<String>,
    /// Loops of the measurement thread: one sample each.
    pub cycles: u64,
    pub min_us: u64,
    pub avg_us: f64,
    pub max_us: u64,
}

/// Parses the `--json` file (rt-tests 2.x; some key names end in ':').
pub fn parse_cyclictest_json(text: &str) -> Result<CyclictestJson, LatencyError> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| LatencyError::Parse(format!("cyclictest's JSON file: {e}")))?;
    let key = |obj: &serde_json::Value, k: &str| -> Option<serde_json::Value> {
        obj.get(k).or_else(|| obj.get(format!("{k}:"))).cloned()
    };
    let thread = v
        .get("thread")
        .and_then(|t| t.get("0"))
        .ok_or_else(|| LatencyError::Parse("cyclictest's JSON file has no thread \"0\"".into()))?;
    let num = |k: &str| {
        thread
            .get(k)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| {
                LatencyError::Parse(format!(
                    "cyclictest's JSON file: thread 0 has no number {k:?}"
                ))
            })
    };
    Ok(CyclictestJson {
        version: key(&v, "rt_test_version").and_then(|s| s.as_str().map(str::to_string)),
        cycles: num("cycles")? as u64,
        min_us: num("min")? as u64,
        avg_us: num("avg")?,
        max_us: num("max")? as u64,
    })
}

/// The nearest-rank percentile `p` (0-100] in µs, or `None` when it lies
/// among the samples above the histogram.
pub fn percentile(buckets: &[u64], overflows: u64, p: f64) -> Option<u64> {
    let n: u64 = buckets.iter().sum::<u64>() + overflows;
    if n == 0 {
        return None;
    }
    let rank = ((p / 100.0) * n as f64).ceil().clamp(1.0, n as f64) as u64;
    let mut seen = 0u64;
    for (us, c) in buckets.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(us as u64);
        }
    }
    None
}

/// The most frequent latency and its count (the smallest on ties).
pub fn mode(buckets: &[u64]) -> Option<(u64, u64)> {
    buckets.iter().enumerate().filter(|(_, c)| **c > 0).fold(
        None,
        |best: Option<(u64, u64)>, (us, &c)| match best {
            Some((_, bc)) if bc >= c => best,
            _ => Some((us as u64, c)),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `cyclictest -m -q -t1 -a 1 -p 95 -i 1000 -D 2 -h 20` output (rt-tests 2.4),
    /// shortened to a 20 µs histogram.
    const OUTPUT: &str = "\
# /dev/cpu_dma_latency set to 0us
# Histogram
000000 000000
000001 000000
000002 000000
000003 000000
000004 000000
000005 000000
000006 000000
000007 000000
000008 000000
000009 000000
000010 000003
000011 000010
000012 000041
000013 000007
000014 000002
000015 000000
000016 000001
000017 000000
000018 000000
000019 000001
# Total: 000000065
# Min Latencies: 00010
# Avg Latencies: 00034
# Max Latencies: 04553
# Histogram Overflows: 00004
# Histogram Overflow at cycle number:
# Thread 0: 00189 00193 00199 00203
";

    #[test]
    fn parses_cyclictest_histogram() {
        let h = parse_histogram(OUTPUT).unwrap();
        assert_eq!(h.buckets.len(), 20);
        assert_eq!(h.buckets[12], 41);
        assert_eq!(h.buckets.iter().sum::<u64>(), 65);
        assert_eq!(h.total, Some(65));
        assert_eq!(h.overflows, 4);
        assert_eq!((h.min_us, h.max_us), (Some(10), Some(4553)));
        assert_eq!(h.avg_us, Some(34.0));
    }

    #[test]
    fn rejects_bad_histograms() {
        let e = parse_histogram("# Histogram\n# Total: 0\n").unwrap_err();
        assert!(e.to_string().contains("no histogram lines"), "{e}");
        let e = parse_histogram("000001 000002\n# Total: 000000003\n").unwrap_err();
        assert!(e.to_string().contains("add up to 2"), "{e}");
        let e = parse_histogram("000001 x\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(parse_histogram("99999999999 1\n").is_err());
    }

    #[test]
    fn parses_cyclictest_json() {
        let j = parse_cyclictest_json(
            r#"{"file_version":1,"cmdline:":"cyclictest -m","rt_test_version:":"2.40",
               "thread":{"0":{"histogram":{"12":1},"cycles":1987,"min":12,"max":4553,"avg":34.31,"cpu":1}}}"#,
        )
        .unwrap();
        assert_eq!(j.version.as_deref(), Some("2.40"));
        assert_eq!((j.cycles, j.min_us, j.max_us), (1987, 12, 4553));
        assert!((j.avg_us - 34.31).abs() < 1e-9);
        assert!(parse_cyclictest_json("{}").is_err());
        assert!(parse_cyclictest_json(r#"{"thread":{"0":{}}}"#).is_err());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        // 10 samples: 1 µs x5, 2 µs x4, 10 µs x1.
        let mut b = vec![0u64; 11];
        b[1] = 5;
        b[2] = 4;
        b[10] = 1;
        assert_eq!(percentile(&b, 0, 50.0), Some(1));
        assert_eq!(percentile(&b, 0, 51.0), Some(2));
        assert_eq!(percentile(&b, 0, 90.0), Some(2));
        assert_eq!(percentile(&b, 0, 99.0), Some(10));
        assert_eq!(percentile(&b, 0, 100.0), Some(10));
        // With 2 overflows out of 12, p90 is above the histogram.
        assert_eq!(percentile(&b, 2, 75.0), Some(2));
        assert_eq!(percentile(&b, 2, 80.0), Some(10));
        assert_eq!(percentile(&b, 2, 90.0), None);
        assert_eq!(percentile(&[], 0, 50.0), None);
        assert_eq!(mode(&b), Some((1, 5)));
        assert_eq!(mode(&[0, 3, 3]), Some((1, 3)));
        assert_eq!(mode(&[0, 0]), None);
    }

    fn config() -> CyclictestConfig {
        CyclictestConfig {
            cpu: 1,
            main_cpus: CpuSet::single(0),
            policy: SchedPolicy::Fifo,
            priority: 95,
            interval: Duration::from_micros(1000),
            duration: Duration::from_secs(10),
            histogram_max: Duration::from_millis(10),
            extra: vec![],
        }
    }

    #[test]
    fn builds_the_classic_command_line() {
        let c = config();
        c.validate().unwrap();
        let a = c.args(std::path::Path::new("/tmp/x.json")).join(" ");
        assert_eq!(
            a,
            "-m -q -t1 -a 1 --mainaffinity=0 -p 95 --policy=fifo -i 1000 -h 10000 -D 10 --json=/tmp/x.json"
        );
        let mut c = config();
        c.duration = Duration::from_millis(2500);
        c.interval = Duration::from_micros(500);
        c.extra = vec!["--latency=0".into()];
        let a = c.args(std::path::Path::new("/j")).join(" ");
        assert!(a.ends_with("-l 5000 --json=/j --latency=0"), "{a}");
        // A general-purpose thread: SCHED_OTHER with priority 0, never a
        // priority cyclictest would take as a reason to switch to FIFO.
        let mut c = config();
        c.policy = SchedPolicy::Other;
        c.priority = 0;
        c.validate().unwrap();
        let a = c.args(std::path::Path::new("/j")).join(" ");
        assert!(a.contains("-p 0 --policy=other "), "{a}");
        c.policy = SchedPolicy::Rr;
        c.priority = 80;
        let a = c.args(std::path::Path::new("/j")).join(" ");
        assert!(a.contains("-p 80 --policy=rr "), "{a}");
    }

    #[test]
    fn rejects_conflicting_or_invalid_settings() {
        for bad in [
            "-p80",
            "-p",
            "--priority=3",
            "-D",
            "--loops",
            "-a1",
            "--json=x",
            "-v",
            "-N",
            "--policy=rr",
            "-y",
        ] {
            let mut c = config();
            c.extra = vec![bad.into()];
            let e = c.validate().unwrap_err();
            assert!(
                matches!(e, LatencyError::ConflictingArg { .. }),
                "{bad}: {e}"
            );
        }
        for ok in ["--latency=0", "-x", "--default-system", "-mq"] {
            let mut c = config();
            c.extra = vec![ok.into()];
            // "-mq" only contains flags pinguard sets too (-m, -q): harmless,
            // and short option clusters are not split.
            assert!(c.validate().is_ok(), "{ok}");
        }
        let mut c = config();
        c.priority = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--priority") && e.contains("--policy fifo"),
            "{e}"
        );
        c.policy = SchedPolicy::Rr;
        c.priority = 100;
        assert!(c.validate().is_err());
        c.policy = SchedPolicy::Other;
        c.priority = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--policy other") && e.contains("use 0"), "{e}");
        let mut c = config();
        c.interval = Duration::from_nanos(1500);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("whole microseconds")
        );
        let mut c = config();
        c.duration = Duration::from_micros(10);
        assert!(c.validate().is_err());
        let mut c = config();
        c.main_cpus = CpuSet::single(1);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("housekeeping")
        );
        let mut c = config();
        c.histogram_max = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    fn sched(policy: u32, rtprio: u32) -> Sched {
        Sched {
            policy,
            class: Sched::class_name(policy),
            rtprio,
            nice: 0,
        }
    }

    #[test]
    fn the_running_policy_is_checked() {
        check_sched(SchedPolicy::Fifo, 95, 7, &sched(1, 95), "").unwrap();
        check_sched(SchedPolicy::Rr, 3, 7, &sched(2, 3), "").unwrap();
        check_sched(SchedPolicy::Other, 0, 7, &sched(0, 0), "").unwrap();
        // cyclictest's fallback: asked for other with a priority, it runs FIFO.
        let e = check_sched(
            SchedPolicy::Other,
            0,
            7,
            &sched(1, 95),
            "policy and priority don't match: setting policy to SCHED_FIFO\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tid 7")
                && e.contains("runs SCHED_FIFO 95, not the asked SCHED_OTHER")
                && e.contains("cyclictest said: policy and priority"),
            "{e}"
        );
        let e = check_sched(SchedPolicy::Fifo, 95, 7, &sched(1, 50), "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SCHED_FIFO 50, not the asked SCHED_FIFO 95"),
            "{e}"
        );
        assert!(!e.contains("said"), "{e}");
        let e = check_sched(SchedPolicy::Rr, 95, 7, &sched(3, 0), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy 3 (B 0)"), "{e}");
        assert_eq!(policy_label(SchedPolicy::Other, 0), "SCHED_OTHER");
        assert_eq!(policy_label(SchedPolicy::Rr, 9), "SCHED_RR 9");
        assert_eq!(SchedPolicy::Other.default_priority(), 0);
        assert_eq!(SchedPolicy::Fifo.default_priority(), 95);
    }

    #[test]
    fn missing_cyclictest_names_the_package() {
        let e = LatencyError::CyclictestMissing.to_string();
        assert!(e.contains("apt-get install rt-tests") && e.contains("cargo xtask setup"));
    }
}
