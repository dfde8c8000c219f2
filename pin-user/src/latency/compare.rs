//! `pinguard latency --compare`: runs side by side as the lab lays them out
//! (one column per run, labelled where × kernel × policy; rows min / avg /
//! p50 / p99 / p99.9 / max and the samples above thresholds), from pinguard's
//! JSON reports and from plain cyclictest output (`-h` histograms, `-v`
//! per-sample lines), each recognised by its content.
use std::{fmt::Write as _, path::Path};

use super::{
    CyclictestHistogram, LatencyError, SchedPolicy,
    report::{FORMAT, LatencyStats, Report, fmt_ns},
};

/// Value of the `format` field of `--compare --json`.
pub const COMPARE_FORMAT: &str = "pinguard-latency-compare/1";

/// The thresholds of the table's "> T" rows when none are given (µs).
pub const DEFAULT_THRESHOLDS_US: &[u64] = &[50, 100, 1000];

/// What a compared file was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `pinguard latency --json`.
    Pinguard,
    /// cyclictest's `-h` histogram output.
    CyclictestHistogram,
    /// cyclictest's `-v` per-sample output.
    CyclictestVerbose,
}

impl Source {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Pinguard => "pinguard report",
            Self::CyclictestHistogram => "cyclictest -h",
            Self::CyclictestVerbose => "cyclictest -v",
        }
    }
}

/// How many samples were above a threshold. Exact when `at_least ==
/// at_most`; cyclictest's histogram overflows (samples past its `-h` range)
/// make it a range when the threshold lies beyond that range: an overflow
/// may be just past the range or far beyond the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Above {
    pub threshold_us: u64,
    pub at_least: u64,
    pub at_most: u64,
}

impl Above {
    pub fn exact(&self) -> bool {
        self.at_least == self.at_most
    }

    fn cell(&self) -> String {
        if self.exact() {
            self.at_least.to_string()
        } else {
            format!("{}-{}", self.at_least, self.at_most)
        }
    }
}

/// Samples above `threshold_us` in a histogram of 1-µs `buckets` with
/// `overflows` samples at or beyond `range_us` (cyclictest's `-h` value;
/// `None`: unknown) and the largest sample `max_us`.
pub fn above(
    buckets: &[(u64, u64)],
    overflows: u64,
    range_us: Option<u64>,
    max_us: u64,
    threshold_us: u64,
) -> Above {
    let in_buckets: u64 = buckets
        .iter()
        .filter(|(us, _)| *us > threshold_us)
        .map(|(_, c)| c)
        .sum();
    let (at_least, at_most) = if overflows == 0 || max_us <= threshold_us {
        // No overflow, or every sample (overflows too) is at most the threshold.
        (in_buckets, in_buckets)
    } else if range_us.is_some_and(|r| r > threshold_us) {
        // Every overflow is at least the range, so above the threshold.
        (in_buckets + overflows, in_buckets + overflows)
    } else {
        // The largest sample is an overflow above the threshold; the others may not be.
        (in_buckets + 1, in_buckets + overflows)
    };
    Above {
        threshold_us,
        at_least,
        at_most,
    }
}

/// One column of the table: a run, whatever file it came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Run {
    /// The column's label (`--label`, or where × kernel × preemption × policy).
    pub label: String,
    pub file: String,
    pub source: Source,
    /// "host", "guest NAME"; `None` when the file does not say.
    #[serde(rename = "where")]
    pub place: Option<String>,
    pub kernel_release: Option<String>,
    pub preemption_model: Option<String>,
    pub preemption_mode: Option<String>,
    pub policy: Option<SchedPolicy>,
    pub priority: Option<u32>,
    pub interval_us: Option<u64>,
    pub duration_ns: Option<u64>,
    pub samples: u64,
    pub min_us: u64,
    pub avg_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p99_9_us: u64,
    pub max_us: u64,
    /// Percentiles that fell among the overflows: shown as the max, an upper bound.
    pub above_histogram: Vec<String>,
    /// Samples at or beyond cyclictest's histogram range (`-h`).
    pub overflows: u64,
    pub histogram_range_us: Option<u64>,
    pub above: Vec<Above>,
    /// A pinguard daemon that ran meanwhile: "enforce (pid 1234)".
    pub daemon: Option<String>,
    /// "1.23s intruder rustc (tid 4242)": what ran longest on the CPU.
    pub top_noise_source: Option<String>,
    /// "5.32ms intruder git (tid 27346)": the longest wait and its cause.
    pub worst_wait: Option<String>,
    pub notes: Vec<String>,
    /// Non-empty 1-µs buckets `[µs, count]` (for the overlay plot).
    #[serde(skip)]
    pub buckets: Vec<(u64, u64)>,
}

/// Short form of a kernel release for labels: "6.18.0-1-amd64" -> "6.18".
pub fn kernel_short(release: &str) -> String {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => format!("{a}.{b}"),
        _ => release.to_string(),
    }
}

/// "fifo95", "rr80", "other".
pub fn policy_short(policy: SchedPolicy, priority: u32) -> String {
    if policy.is_realtime() {
        format!("{}{priority}", policy.cyclictest_name())
    } else {
        policy.cyclictest_name().to_string()
    }
}

impl Run {
    /// The automatic label: "host 6.18 PREEMPT_DYNAMIC fifo95"; the file
    /// name when the file says nothing about where and on what it ran.
    pub fn auto_label(&self) -> String {
        let mut parts = Vec::new();
        parts.extend(self.place.clone());
        parts.extend(self.kernel_release.as_deref().map(kernel_short));
        parts.extend(self.preemption_model.clone());
        if let (Some(p), Some(prio)) = (self.policy, self.priority) {
            parts.push(policy_short(p, prio));
        }
        if self.place.is_none() && self.kernel_release.is_none() {
            let name = Path::new(&self.file)
                .file_name()
                .map_or_else(|| self.file.clone(), |n| n.to_string_lossy().into_owned());
            parts.insert(0, name);
        }
        parts.join(" ")
    }

    fn from_report(file: &str, r: &Report, thresholds: &[u64]) -> Self {
        let l = &r.latency;
        let h = &r.histogram;
        let notes = r.notes.clone();
        // Inside a guest: the guest's kernel, not the host's.
        let (kernel, preemption) = r.measured_kernel();
        let mut run = Self {
            label: String::new(),
            file: file.to_string(),
            source: Source::Pinguard,
            place: Some(r.measured_where()),
            kernel_release: Some(kernel.to_string()).filter(|k| !k.is_empty()),
            preemption_model: Some(preemption.model.clone()),
            preemption_mode: preemption.mode.clone(),
            policy: Some(r.run.policy),
            priority: Some(r.run.priority),
            interval_us: Some(r.run.interval_us),
            duration_ns: Some(r.run.elapsed_ns),
            samples: l.samples,
            min_us: l.min_us,
            avg_us: l.avg_us,
            p50_us: l.p50_us,
            p90_us: l.p90_us,
            p99_us: l.p99_us,
            p99_9_us: l.p99_9_us,
            max_us: l.max_us,
            above_histogram: l.above_histogram.clone(),
            overflows: h.overflows,
            histogram_range_us: Some(h.max_us),
            above: Vec::new(),
            daemon: daemon_of(r),
            top_noise_source: r
                .noise
                .top_source
                .as_ref()
                .map(|s| format!("{} {}", fmt_ns(s.ns), s.label)),
            worst_wait: r
                .worst
                .first()
                .map(|w| format!("{} {}", fmt_ns(w.wait_ns), w.cause.who())),
            notes,
            buckets: h.buckets.clone(),
        };
        run.above = thresholds
            .iter()
            .map(|t| {
                above(
                    &run.buckets,
                    run.overflows,
                    run.histogram_range_us,
                    run.max_us,
                    *t,
                )
            })
            .collect();
        run
    }

    fn from_cyclictest(
        file: &str,
        source: Source,
        ct: &CyclictestText,
        thresholds: &[u64],
    ) -> Self {
        let h = &ct.histogram;
        let range = ct.range_us;
        let l = LatencyStats::new(h, None, range.unwrap_or(h.buckets.len() as u64));
        let buckets: Vec<(u64, u64)> = h
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(u, c)| (u as u64, *c))
            .collect();
        let mut run = Self {
            label: String::new(),
            file: file.to_string(),
            source,
            place: None,
            kernel_release: None,
            preemption_model: None,
            preemption_mode: None,
            policy: ct.policy,
            priority: ct.priority,
            interval_us: ct.interval_us,
            duration_ns: ct.interval_us.and_then(|i| ct.loops.map(|n| n * i * 1000)),
            samples: l.samples,
            min_us: l.min_us,
            avg_us: l.avg_us,
            p50_us: l.p50_us,
            p90_us: l.p90_us,
            p99_us: l.p99_us,
            p99_9_us: l.p99_9_us,
            max_us: l.max_us,
            above_histogram: l.above_histogram.clone(),
            overflows: h.overflows,
            histogram_range_us: range,
            above: Vec::new(),
            daemon: None,
            top_noise_source: None,
            worst_wait: None,
            notes: ct.notes.clone(),
            buckets,
        };
        run.above = thresholds
            .iter()
            .map(|t| above(&run.buckets, run.overflows, range, run.max_us, *t))
            .collect();
        run
    }
}

/// The daemon a report's run shared the host with, if any.
fn daemon_of(r: &Report) -> Option<String> {
    r.run.daemon.as_ref().map(|d| d.summary())
}

/// cyclictest's text output, read into a histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct CyclictestText {
    pub histogram: CyclictestHistogram,
    /// The `-h` range: samples at or beyond it are overflows (`-v`: none).
    pub range_us: Option<u64>,
    /// From the status lines cyclictest prints without `-q`
    /// ("policy: fifo", "T: 0 (...) P:80 I:1000 C: 300 ...").
    pub policy: Option<SchedPolicy>,
    pub priority: Option<u32>,
    pub interval_us: Option<u64>,
    pub loops: Option<u64>,
    pub notes: Vec<String>,
}

/// The status lines of cyclictest without `-q`: the last `T: 0` line names
/// the priority, interval and loop count of thread 0.
fn status_lines(text: &str, out: &mut CyclictestText) {
    for line in text.lines() {
        if let Some(rest) = line.split("policy:").nth(1) {
            let name = rest.split(':').next().unwrap_or("").trim();
            out.policy = match name {
                "fifo" => Some(SchedPolicy::Fifo),
                "rr" => Some(SchedPolicy::Rr),
                "other" => Some(SchedPolicy::Other),
                _ => out.policy,
            };
        }
        let line = line.trim();
        let Some(rest) = line.strip_prefix("T: 0 ") else {
            continue;
        };
        let field = |key: &str| -> Option<u64> {
            let after = rest.split(key).nth(1)?;
            after.split_whitespace().next()?.parse().ok()
        };
        out.priority = field("P:").map(|p| p as u32).or(out.priority);
        out.interval_us = field("I:").or(out.interval_us);
        out.loops = field("C:").or(out.loops);
    }
    // SCHED_OTHER reports priority 0; a real-time policy needs one.
    if out.policy.is_some() && out.priority.is_none() {
        out.policy = None;
    }
}

/// Reads cyclictest's `-h` output: the `# Histogram` block (the status
/// lines before it, printed without `-q`, name the policy and interval).
pub fn parse_cyclictest_histogram(text: &str) -> Result<CyclictestText, LatencyError> {
    let start = text
        .lines()
        .position(|l| l.trim() == "# Histogram")
        .ok_or_else(|| LatencyError::Parse("no \"# Histogram\" line".into()))?;
    let lines: Vec<&str> = text.lines().collect();
    let block = lines[start..].join("\n");
    let histogram = super::parse_histogram(&block)?;
    let columns = lines[start + 1..]
        .iter()
        .find(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map_or(0, |l| l.split_whitespace().count());
    let mut out = CyclictestText {
        range_us: Some(histogram.buckets.len() as u64),
        histogram,
        policy: None,
        priority: None,
        interval_us: None,
        loops: None,
        notes: Vec::new(),
    };
    if columns > 2 {
        out.notes.push(format!(
            "{} threads in the histogram: only thread 0 is compared",
            columns - 1
        ));
    }
    status_lines(&lines[..start].join("\n"), &mut out);
    Ok(out)
}

/// One `-v` sample line, "thread: cycle: latency" (µs).
fn verbose_sample(line: &str) -> Option<(u32, u64, u64)> {
    let mut f = line.split(':').map(str::trim);
    let (t, c, l) = (f.next()?, f.next()?, f.next()?);
    if f.next().is_some() {
        return None;
    }
    Some((t.parse().ok()?, c.parse().ok()?, l.parse().ok()?))
}

/// Reads cyclictest's `-v` output: one "thread: cycle: latency" line per
/// sample (µs), after a few header lines. Thread 0 is compared.
pub fn parse_cyclictest_verbose(text: &str) -> Result<CyclictestText, LatencyError> {
    let mut samples = Vec::new();
    let mut others = std::collections::BTreeSet::new();
    for line in text.lines() {
        match verbose_sample(line) {
            Some((0, _, us)) => samples.push(us),
            Some((t, _, _)) => {
                others.insert(t);
            }
            None => {}
        }
    }
    if samples.is_empty() {
        return Err(LatencyError::Parse(
            "no \"0: cycle: latency\" lines of thread 0".into(),
        ));
    }
    // Samples past the largest bucket pinguard keeps are overflows.
    let range = super::MAX_BUCKETS;
    let top = samples
        .iter()
        .copied()
        .filter(|s| *s < range)
        .max()
        .unwrap_or(0);
    let mut buckets = vec![0u64; top as usize + 1];
    let mut overflows = 0;
    for &s in &samples {
        match buckets.get_mut(s as usize) {
            Some(b) => *b += 1,
            None => overflows += 1,
        }
    }
    let n = samples.len() as u64;
    let histogram = CyclictestHistogram {
        total: Some(n - overflows),
        min_us: samples.iter().copied().min(),
        avg_us: Some(samples.iter().sum::<u64>() as f64 / n as f64),
        max_us: samples.iter().copied().max(),
        buckets,
        overflows,
    };
    let mut notes = Vec::new();
    if !others.is_empty() {
        notes.push(format!(
            "samples of {} more thread(s) in the file: only thread 0 is compared",
            others.len()
        ));
    }
    // "Thread 0 Interval: N" is not the interval: cyclictest prints it after
    // adding the thread distance (-d, default 500 µs).
    let mut out = CyclictestText {
        histogram,
        range_us: (overflows > 0).then_some(range),
        policy: None,
        priority: None,
        interval_us: None,
        loops: Some(n),
        notes,
    };
    status_lines(text, &mut out);
    Ok(out)
}

/// The first non-empty line, shortened, for error messages.
fn first_line(text: &str) -> (usize, String) {
    let (n, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| !l.trim().is_empty())
        .unwrap_or((0, ""));
    let mut shown: String = line.trim().chars().take(60).collect();
    if line.trim().chars().count() > 60 {
        shown.push('…');
    }
    (n + 1, shown)
}

/// Reads one file of `--compare`, recognising it by its content.
pub fn load(path: &Path, thresholds: &[u64]) -> Result<Run, LatencyError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LatencyError::Io {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let in_file = |e: LatencyError| LatencyError::InFile {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
        return match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {
                let r = Report::load(path)?;
                Ok(Run::from_report(&file, &r, thresholds))
            }
            Some(found) => Err(LatencyError::WrongFormat {
                path: path.to_owned(),
                found: found.to_string(),
                expected: FORMAT,
            }),
            None => Err(LatencyError::UnknownRunFile {
                path: path.to_owned(),
                found: "a JSON document without a \"format\" field".into(),
            }),
        };
    }
    if text.lines().any(|l| l.trim() == "# Histogram") {
        let ct = parse_cyclictest_histogram(&text).map_err(in_file)?;
        return Ok(Run::from_cyclictest(
            &file,
            Source::CyclictestHistogram,
            &ct,
            thresholds,
        ));
    }
    if text.lines().any(|l| verbose_sample(l).is_some()) {
        let ct = parse_cyclictest_verbose(&text).map_err(in_file)?;
        return Ok(Run::from_cyclictest(
            &file,
            Source::CyclictestVerbose,
            &ct,
            thresholds,
        ));
    }
    let (n, line) = first_line(&text);
    let found = if line.is_empty() {
        "the file is empty".to_string()
    } else {
        format!("line {n} is `{line}`")
    };
    Err(LatencyError::UnknownRunFile {
        path: path.to_owned(),
        found,
    })
}

/// Gives every run its label: `labels` in order, else the automatic one;
/// repeated automatic labels get " (2)", " (3)".
pub fn label_runs(runs: &mut [Run], labels: &[String]) -> Result<(), LatencyError> {
    if !labels.is_empty() && labels.len() != runs.len() {
        return Err(LatencyError::Invalid {
            field: "label",
            reason: format!(
                "{} label(s) for {} run(s): give one per file, in order",
                labels.len(),
                runs.len()
            ),
        });
    }
    for (i, run) in runs.iter_mut().enumerate() {
        run.label = labels.get(i).cloned().unwrap_or_else(|| run.auto_label());
    }
    if labels.is_empty() {
        let all: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
        for (i, run) in runs.iter_mut().enumerate() {
            let same = all.iter().filter(|l| **l == all[i]).count();
            if same > 1 {
                let nth = all[..=i].iter().filter(|l| **l == all[i]).count();
                run.label = format!("{} ({nth})", all[i]);
            }
        }
    }
    Ok(())
}

/// `--compare --json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Comparison {
    pub format: &'static str,
    pub thresholds_us: Vec<u64>,
    pub runs: Vec<Run>,
    /// What the table's footnotes say.
    pub notes: Vec<String>,
    /// Files written by --svg/--png.
    pub pictures: Vec<String>,
}

impl Comparison {
    pub fn new(runs: Vec<Run>, thresholds: &[u64]) -> Self {
        let notes = footnotes(&runs);
        Self {
            format: COMPARE_FORMAT,
            thresholds_us: thresholds.to_vec(),
            runs,
            notes,
            pictures: Vec::new(),
        }
    }
}

/// "> 50 µs", "> 1 ms".
pub fn threshold_name(us: u64) -> String {
    if us >= 1000 && us.is_multiple_of(1000) {
        format!("> {} ms", us / 1000)
    } else {
        format!("> {us} µs")
    }
}

fn footnotes(runs: &[Run]) -> Vec<String> {
    let mut n = Vec::new();
    if runs.iter().any(|r| r.overflows > 0) {
        n.push(
            "overflows are samples at or beyond cyclictest's histogram range (-h): they count above \
             every threshold inside that range; above a threshold beyond it they make a range \
             (at least 1 when the max is above it, at most every overflow)"
                .into(),
        );
    }
    if runs.iter().any(|r| !r.above_histogram.is_empty()) {
        n.push(
            "≤: the percentile fell among the overflows; the max is shown as its upper bound"
                .into(),
        );
    }
    if runs.iter().any(|r| r.source != Source::Pinguard) {
        n.push(
            "cyclictest's -h and -v output does not record the kernel, and -q hides the policy and \
             interval: \"?\" (name the columns with --label)"
                .into(),
        );
    }
    for r in runs {
        for note in &r.notes {
            n.push(format!("{}: {note}", r.label));
        }
    }
    n
}

/// The table's rows: (name, one cell per run).
pub fn rows(c: &Comparison) -> Vec<(String, Vec<String>)> {
    let runs = &c.runs;
    let q = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    let row = |name: &str, f: &dyn Fn(&Run) -> String| {
        (name.to_string(), runs.iter().map(f).collect::<Vec<_>>())
    };
    let pct = |r: &Run, name: &str, v: u64| {
        if r.above_histogram.iter().any(|a| a == name) {
            format!("≤{v}")
        } else {
            v.to_string()
        }
    };
    let mut rows = vec![
        row("where", &|r| q(r.place.clone())),
        row("kernel", &|r| {
            q(r.kernel_release.as_deref().map(kernel_short))
        }),
        row("preemption", &|r| q(r.preemption_model.clone())),
        row("policy", &|r| {
            q(r.policy.zip(r.priority).map(|(p, n)| policy_short(p, n)))
        }),
        row("interval (µs)", &|r| {
            q(r.interval_us.map(|i| i.to_string()))
        }),
        row("duration", &|r| q(r.duration_ns.map(fmt_ns))),
        row("samples", &|r| r.samples.to_string()),
        row("min (µs)", &|r| r.min_us.to_string()),
        row("avg (µs)", &|r| format!("{:.1}", r.avg_us)),
        row("p50 (µs)", &|r| pct(r, "p50", r.p50_us)),
        row("p99 (µs)", &|r| pct(r, "p99", r.p99_us)),
        row("p99.9 (µs)", &|r| pct(r, "p99.9", r.p99_9_us)),
        row("max (µs)", &|r| r.max_us.to_string()),
    ];
    for (i, t) in c.thresholds_us.iter().enumerate() {
        rows.push(row(&threshold_name(*t), &|r| r.above[i].cell()));
    }
    rows.push(row("overflows", &|r| match r.histogram_range_us {
        Some(range) if r.overflows > 0 => format!("{} (≥{range} µs)", r.overflows),
        _ => r.overflows.to_string(),
    }));
    if runs.iter().any(|r| r.daemon.is_some()) {
        rows.push(row("daemon", &|r| {
            r.daemon.clone().unwrap_or_else(|| "-".into())
        }));
    }
    if runs.iter().any(|r| r.source == Source::Pinguard) {
        rows.push(row("top noise source", &|r| {
            r.top_noise_source
                .as_deref()
                .map_or_else(|| "-".into(), without_tid)
        }));
        rows.push(row("worst wait", &|r| {
            r.worst_wait.as_deref().map_or_else(|| "-".into(), without_tid)
        }));
    }
    rows.push(row("file", &|r| {
        Path::new(&r.file)
            .file_name()
            .map_or_else(|| r.file.clone(), |n| n.to_string_lossy().into_owned())
    }));
    rows.push(row("source", &|r| r.source.describe().to_string()));
    rows
}

/// "intruder rustc (tid 4242)" -> "intruder rustc": thread ids make the
/// text table wide and mean nothing across runs (the JSON keeps them).
fn without_tid(s: &str) -> String {
    match (s.find(" (tid "), s.rfind(')')) {
        (Some(a), Some(b)) if b > a => format!("{}{}", &s[..a], &s[b + 1..]),
        _ => s.to_string(),
    }
}

/// Longest cell of the text table.
const MAX_CELL: usize = 30;

/// The table as text: one column per run, the label on top (when the
/// labels were given; the automatic label is the where / kernel /
/// preemption / policy rows themselves), then the rows, then the footnotes.
pub fn render(c: &Comparison, labelled: bool) -> String {
    let mut rows = rows(c);
    if labelled {
        rows.insert(
            0,
            (
                String::new(),
                c.runs.iter().map(|r| r.label.clone()).collect(),
            ),
        );
    }
    // Free-form cells (noise sources, causes) are shortened so a table of
    // eight runs stays readable; --json has them whole.
    for (_, cells) in rows.iter_mut() {
        for cell in cells.iter_mut() {
            if cell.chars().count() > MAX_CELL {
                *cell = cell.chars().take(MAX_CELL - 1).collect::<String>() + "…";
            }
        }
    }
    let first_w = rows
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = (0..c.runs.len())
        .map(|i| {
            rows.iter()
                .map(|(_, v)| v[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut o = String::new();
    for (name, cells) in &rows {
        let _ = write!(o, "{name:<first_w$}");
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(o, "  {cell:<w$}");
        }
        o.truncate(o.trim_end().len());
        o.push('\n');
    }
    for note in &c.notes {
        let _ = writeln!(o, "note: {note}");
    }
    for p in &c.pictures {
        let _ = writeln!(o, "picture: {p}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::report::tests::sample_report;

    /// Real `cyclictest -m -t1 -a1 -i1000 -l 2000 -h 1000 -q` on the lab
    /// host (SCHED_OTHER: no -p), with 22 overflows.
    const HISTOGRAM: &str = include_str!("../../tests/fixtures/cyclictest-h.txt");
    /// Real `cyclictest -m -t1 -a1 -i1000 -l 500 -v` on the lab host.
    const VERBOSE: &str = include_str!("../../tests/fixtures/cyclictest-v.txt");

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn thresholds_count_overflows_only_where_they_are_known() {
        let buckets = [(10, 5), (60, 3), (200, 2)];
        // No overflow: exact.
        let a = above(&buckets, 0, Some(1000), 200, 50);
        assert_eq!((a.at_least, a.at_most), (5, 5));
        assert_eq!(above(&buckets, 0, Some(1000), 200, 100).at_least, 2);
        assert_eq!(above(&buckets, 0, Some(1000), 200, 200).at_least, 0);
        // 4 overflows at or beyond 1000 µs: above 100 µs for sure.
        let a = above(&buckets, 4, Some(1000), 5000, 100);
        assert_eq!((a.at_least, a.at_most), (6, 6));
        assert!(a.exact());
        // Above 2 ms: the max (5 ms) is one; the other 3 may be 1000-2000 µs.
        let a = above(&buckets, 4, Some(1000), 5000, 2000);
        assert_eq!((a.at_least, a.at_most), (1, 4));
        assert_eq!(a.cell(), "1-4");
        // Beyond the max: none, overflows or not.
        let a = above(&buckets, 4, Some(1000), 1500, 2000);
        assert_eq!((a.at_least, a.at_most), (0, 0));
        // A threshold equal to the range: an overflow of exactly the range is not above it.
        let a = above(&buckets, 4, Some(1000), 5000, 1000);
        assert_eq!((a.at_least, a.at_most), (1, 4));
    }

    #[test]
    fn reads_cyclictest_histogram_output() {
        let ct = parse_cyclictest_histogram(HISTOGRAM).unwrap();
        assert_eq!(ct.range_us, Some(1000));
        assert_eq!(ct.histogram.overflows, 22);
        assert_eq!(ct.histogram.buckets.iter().sum::<u64>(), 1978);
        assert_eq!(ct.histogram.max_us, Some(16974));
        assert_eq!(
            (ct.policy, ct.interval_us),
            (None, None),
            "-q prints no status"
        );
        // Without -q the status lines name policy, priority, interval and loops.
        let text = "policy: fifo: loadavg: 3.07 1.17 0.52 9/143 15552\n\n\
                    T: 0 (15552) P:80 I:1000 C:     10 Min:     36 Act:   55 Avg:   55 Max:      77\n\
                    \x1b[3Apolicy: fifo: loadavg: 3.07 1.17 0.52 7/143 15552\n\n\
                    T: 0 (15552) P:80 I:1000 C:    300 Min:     28 Act:   60 Avg:   53 Max:     173\n\
                    # Histogram\n000000 000001\n000001 000002\n# Total: 000000003\n\
                    # Max Latencies: 00173\n# Histogram Overflows: 00297\n";
        let ct = parse_cyclictest_histogram(text).unwrap();
        assert_eq!(ct.policy, Some(SchedPolicy::Fifo));
        assert_eq!(
            (ct.priority, ct.interval_us, ct.loops),
            (Some(80), Some(1000), Some(300))
        );
        assert_eq!(ct.range_us, Some(2));
    }

    #[test]
    fn reads_cyclictest_verbose_output() {
        let ct = parse_cyclictest_verbose(VERBOSE).unwrap();
        let h = &ct.histogram;
        assert_eq!(h.buckets.iter().sum::<u64>(), 500);
        assert_eq!(h.overflows, 0);
        assert_eq!(ct.loops, Some(500));
        let max = VERBOSE
            .lines()
            .filter_map(verbose_sample)
            .map(|s| s.2)
            .max()
            .unwrap();
        assert_eq!(h.max_us, Some(max));
        assert_eq!(h.buckets.len() as u64, max + 1);
        assert_eq!(
            ct.interval_us, None,
            "its printed interval is not the interval"
        );
        let two =
            "       0:       0:      12\n       1:       0:      40\n       0:       1:      14\n";
        let ct = parse_cyclictest_verbose(two).unwrap();
        assert_eq!(ct.histogram.buckets.iter().sum::<u64>(), 2);
        assert!(ct.notes[0].contains("1 more thread"), "{:?}", ct.notes);
    }

    #[test]
    fn files_are_recognised_by_content_and_the_rest_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = DEFAULT_THRESHOLDS_US;
        let h = load(&write(dir.path(), "a.json", HISTOGRAM), t).unwrap();
        assert_eq!(h.source, Source::CyclictestHistogram);
        let v = load(&write(dir.path(), "b", VERBOSE), t).unwrap();
        assert_eq!(v.source, Source::CyclictestVerbose);
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100);
        let p = write(dir.path(), "r.txt", &serde_json::to_string(&r).unwrap());
        assert_eq!(load(&p, t).unwrap().source, Source::Pinguard);

        let e = load(&write(dir.path(), "x.csv", "time,latency\n1,2\n"), t)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.csv: line 1 is `time,latency`")
                && e.contains("not a pinguard-latency JSON report")
                && e.contains("not cyclictest -h output (no '# Histogram' line)")
                && e.contains("not cyclictest -v output"),
            "{e}"
        );
        let e = load(&write(dir.path(), "e", "\n\n"), t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the file is empty"), "{e}");
        let e = load(&write(dir.path(), "j", r#"{"a": 1}"#), t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("without a \"format\" field"), "{e}");
        let e = load(&write(dir.path(), "w", r#"{"format": "other/2"}"#), t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"other/2\"") && e.contains(FORMAT), "{e}");
        // A broken histogram says what is wrong, in which file.
        let e = load(
            &write(
                dir.path(),
                "bad.txt",
                "# Histogram\n000001 000002\n# Total: 000000003\n",
            ),
            t,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad.txt") && e.contains("add up to 2"), "{e}");
    }

    fn four_runs() -> Comparison {
        let dir = tempfile::tempdir().unwrap();
        let t = DEFAULT_THRESHOLDS_US;
        let mut gp = sample_report("6.18.44", "PREEMPT_DYNAMIC", 717);
        gp.run.policy = SchedPolicy::Other;
        gp.run.priority = 0;
        let rt = sample_report("6.1.0-rt-amd64", "PREEMPT_RT", 95);
        let mut runs = vec![
            load(
                &write(dir.path(), "gp.json", &serde_json::to_string(&gp).unwrap()),
                t,
            )
            .unwrap(),
            load(
                &write(dir.path(), "rt.json", &serde_json::to_string(&rt).unwrap()),
                t,
            )
            .unwrap(),
            load(&write(dir.path(), "h.txt", HISTOGRAM), t).unwrap(),
            load(&write(dir.path(), "v.txt", VERBOSE), t).unwrap(),
        ];
        label_runs(&mut runs, &[]).unwrap();
        Comparison::new(runs, t)
    }

    #[test]
    fn the_table_is_laid_out_as_the_lab_does() {
        let c = four_runs();
        assert_eq!(c.runs[0].label, "host 6.18 PREEMPT_DYNAMIC other");
        assert_eq!(c.runs[1].label, "host 6.1 PREEMPT_RT fifo95");
        assert!(c.runs[2].label.ends_with("h.txt"), "{}", c.runs[2].label);
        let t = render(&c, false);
        let lines: Vec<&str> = t.lines().collect();
        let row = |name: &str| -> Vec<String> {
            let l = lines
                .iter()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name:?} row:\n{t}"));
            l[name.len()..]
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        };
        assert_eq!(row("where"), ["host", "host", "?", "?"]);
        assert_eq!(row("kernel"), ["6.18", "6.1", "?", "?"]);
        assert_eq!(row("policy"), ["other", "fifo95", "?", "?"]);
        assert_eq!(row("interval (µs)"), ["1000", "1000", "?", "?"]);
        assert_eq!(row("duration")[..2], ["3.010s", "3.010s"]);
        assert_eq!(row("max (µs)")[..3], ["717", "95", "16974"]);
        // The sample report: 998 in buckets up to 55 µs, 2 overflows (≥60 µs).
        assert_eq!(row("> 50 µs")[..2], ["7", "7"]);
        // gp's max 717 is an overflow above 100: at least 1, at most both.
        assert_eq!(row("> 100 µs")[..2], ["1-2", "0"]);
        // The histogram fixture: 22 overflows at or beyond 1000 µs.
        let h = &c.runs[2];
        let over_1ms = h.above[2];
        assert_eq!((over_1ms.at_least, over_1ms.at_most), (1, 22));
        assert_eq!(h.above[1].at_least, h.above[1].at_most);
        assert!(row("overflows")[2].starts_with("22 (≥1000 µs)"));
        assert_eq!(row("p99.9 (µs)")[..2], ["≤717", "≤95"]);
        for r in [
            "min (µs)",
            "avg (µs)",
            "p50 (µs)",
            "p99 (µs)",
            "samples",
            "source",
        ] {
            assert_eq!(row(r).len(), 4, "{r}:\n{t}");
        }
        assert!(
            t.contains("note: overflows are samples at or beyond"),
            "{t}"
        );
        // Columns line up: each run's cells start where its header does.
        let col = |line: &str, i: usize| {
            let mut starts = vec![];
            let chars: Vec<char> = line.chars().collect();
            for j in 1..chars.len() {
                if chars[j] != ' ' && chars[j - 1] == ' ' && j >= 2 && chars[j - 2] == ' ' {
                    starts.push(j);
                }
            }
            starts[i]
        };
        let kernel = lines.iter().find(|l| l.starts_with("kernel")).unwrap();
        let max = lines.iter().find(|l| l.starts_with("max (µs)")).unwrap();
        assert_eq!(col(kernel, 1), col(max, 1), "{t}");

        // The JSON names every run's facts and thresholds.
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["format"], COMPARE_FORMAT);
        assert_eq!(v["runs"][1]["where"], "host");
        assert_eq!(v["runs"][1]["preemption_model"], "PREEMPT_RT");
        assert_eq!(v["runs"][1]["policy"], "fifo");
        assert_eq!(v["runs"][2]["source"], "cyclictest_histogram");
        assert_eq!(v["runs"][2]["above"][2]["at_most"], 22);
        assert!(v["runs"][0].get("buckets").is_none());
    }

    #[test]
    fn a_guest_run_is_labelled_with_the_guests_kernel() {
        use crate::latency::report::tests::sample_guest;
        let dir = tempfile::tempdir().unwrap();
        let r = sample_report("6.18.44", "PREEMPT_DYNAMIC", 2100).with_guest(sample_guest());
        let p = write(dir.path(), "g.json", &serde_json::to_string(&r).unwrap());
        let run = load(&p, DEFAULT_THRESHOLDS_US).unwrap();
        assert_eq!(run.auto_label(), "guest lab-rt (tcg) 6.1 PREEMPT_RT fifo95");
        assert_eq!(run.kernel_release.as_deref(), Some("6.1.0-28-rt-amd64"));
    }

    #[test]
    fn noise_cells_lose_their_thread_ids() {
        assert_eq!(without_tid("1.23s intruder rustc (tid 42)"), "1.23s intruder rustc");
        assert_eq!(without_tid("2.00ms hard IRQs"), "2.00ms hard IRQs");
        let c = four_runs();
        let t = render(&c, false);
        assert!(row_cells(&t, "worst wait")[0].starts_with("1.98ms intruder pg-spiker"), "{t}");
    }

    fn row_cells(t: &str, name: &str) -> Vec<String> {
        let l = t.lines().find(|l| l.starts_with(name)).unwrap();
        l[name.len()..]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn labels_are_given_or_made_unique() {
        let mut c = four_runs();
        label_runs(
            &mut c.runs,
            &["a".into(), "b".into(), "c".into(), "d".into()],
        )
        .unwrap();
        let t = render(&c, true);
        let first = t.lines().next().unwrap();
        assert_eq!(
            first.split_whitespace().collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        let e = label_runs(&mut c.runs, &["a".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 label(s) for 4 run(s)"), "{e}");
        let mut runs = vec![c.runs[0].clone(), c.runs[0].clone()];
        label_runs(&mut runs, &[]).unwrap();
        assert_eq!(runs[0].label, "host 6.18 PREEMPT_DYNAMIC other (1)");
        assert_eq!(runs[1].label, "host 6.18 PREEMPT_DYNAMIC other (2)");
        assert_eq!(kernel_short("6.18.0-1-amd64"), "6.18");
        assert_eq!(kernel_short("weird"), "weird");
    }
}
