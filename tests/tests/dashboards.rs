//! The shipped Grafana dashboard and Prometheus rules (dashboards/) against
//! pinguard's metric contract.
//!
//! The first tests need no privileges: dashboard structure, every metric,
//! label and label value any expression uses is in the contract, alerts have
//! runbooks and unit tests, and promtool accepts and unit-tests the rules.
//! The last one runs the real daemon, a real running QEMU/KVM guest whose
//! vCPU shares its guarded CPU with a real intruder thread, scrapes them with
//! a real Prometheus and executes every dashboard expression and recording
//! rule through its HTTP API.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use integration_tests::promql::{self, PromExpr, Rule, Source};
use nix::sys::signal::Signal;
use serde_json::Value;
use testkit::{
    daemon::{Daemon, DaemonOptions},
    env::missing_kvm,
    guest::{Guest, GuestOptions},
    metrics,
    prometheus::{Prometheus, missing_prometheus},
    threads::{Bursty, pin_current_thread, set_affinity},
    wait::wait_for,
};

/// pinguard's metrics and their labels (Prometheus adds `instance` and `job`).
const CONTRACT: &[(&str, &[&str])] = &[
    ("pinguard_build_info", &["version"]),
    ("pinguard_cpu_guarded", &["cpu"]),
    ("pinguard_cpu_run_seconds_total", &["cpu", "class"]),
    ("pinguard_intruder_run_seconds_total", &["cpu", "source"]),
    ("pinguard_intrusions_total", &["cpu", "source"]),
    ("pinguard_violations_total", &["cpu", "kind"]),
    ("pinguard_vms", &[]),
    ("pinguard_vcpu_info", &["vm", "vcpu", "cpu"]),
    ("pinguard_vcpu_pinned", &["vm", "vcpu"]),
    ("pinguard_repins_total", &["vm"]),
    ("pinguard_evictions_total", &["cpu"]),
    ("pinguard_enforcement_errors_total", &["action", "errno"]),
    ("pinguard_events_lost_total", &[]),
    ("pinguard_bpf_program_run_seconds_total", &["program"]),
    ("pinguard_bpf_program_runs_total", &["program"]),
    ("pinguard_mode", &["mode"]),
    ("pinguard_irq_seconds_total", &["cpu", "irq", "name"]),
    ("pinguard_irqs_total", &["cpu", "irq", "name"]),
    ("pinguard_softirq_seconds_total", &["cpu", "vector"]),
    ("pinguard_softirqs_total", &["cpu", "vector"]),
    ("pinguard_nmis_total", &["cpu"]),
    // The histogram pinguard_vcpu_wait_seconds, as Prometheus stores it.
    ("pinguard_vcpu_wait_seconds_bucket", &["vm", "vcpu", "le"]),
    ("pinguard_vcpu_wait_seconds_sum", &["vm", "vcpu"]),
    ("pinguard_vcpu_wait_seconds_count", &["vm", "vcpu"]),
    ("pinguard_vcpu_wait_seconds_total", &["vm", "vcpu"]),
    ("pinguard_thread_map_full_total", &[]),
    ("pinguard_tasks_vanished_total", &[]),
    ("pinguard_discovery_errors_total", &[]),
    ("pinguard_discovery_scans_total", &[]),
    ("pinguard_config_reloads_total", &["result"]),
    ("pinguard_scrapes_total", &[]),
    ("pinguard_isolation_repairs_total", &["what"]),
    ("pinguard_isolation_active", &["cpu", "mechanism"]),
];

/// The values the contract allows for enumerated labels.
const LABEL_VALUES: &[(&str, &[&str])] = &[
    ("class", &["vcpu", "kernel", "allowed", "intruder", "idle"]),
    ("source", &["user", "kthread"]),
    (
        "kind",
        &[
            "intruder",
            "migration_in",
            "vcpu_drift",
            "affinity_changed",
            "shared_cpu",
        ],
    ),
    ("mode", &["observe", "enforce"]),
    (
        "vector",
        &[
            "hi", "timer", "net_tx", "net_rx", "block", "irq_poll", "tasklet", "sched", "hrtimer",
            "rcu",
        ],
    ),
    ("result", &["success", "failure"]),
    (
        "what",
        &[
            "sysctl",
            "workqueue",
            "default_irq_affinity",
            "irq",
            "cgroup",
            "task",
            "thread",
        ],
    ),
    ("mechanism", &["partition", "shield", "affinity"]),
];

/// Labels every scraped series carries.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// Series Prometheus itself makes that the rules may use.
const PROMETHEUS_SERIES: &[(&str, &[&str])] = &[("up", &[])];

/// Each recording rule and the labels (besides instance and job) its
/// series carry. A new rule must be added here, so the live test knows
/// what to expect from it.
const RECORDED: &[(&str, &[&str])] = &[
    ("pinguard:cpu_run_seconds:rate5m", &["cpu", "class"]),
    ("pinguard:cpu_class_ratio:rate5m", &["cpu", "class"]),
    ("pinguard:cpu_intruder_ratio:rate5m", &["cpu"]),
    ("pinguard:cpu_stolen_ratio:rate5m", &["cpu"]),
    ("pinguard:intruder_run_seconds:rate5m", &["cpu", "source"]),
    ("pinguard:bpf_cpu_ratio:rate5m", &["program"]),
    ("pinguard:bpf_run_seconds_per_run:rate5m", &["program"]),
    ("pinguard:irq_ratio:rate5m", &["cpu", "irq", "name"]),
    ("pinguard:softirq_ratio:rate5m", &["cpu", "vector"]),
    ("pinguard:cpu_irq_ratio:rate5m", &["cpu"]),
    ("pinguard:cpu_softirq_ratio:rate5m", &["cpu"]),
    ("pinguard:cpu_noise_ratio:rate5m", &["cpu"]),
    ("pinguard:vcpu_wait_ratio:rate5m", &["vm", "vcpu"]),
    // Fleet view: one series per host.
    ("pinguard:host_intruder_seconds:rate5m", &[]),
    ("pinguard:host_vcpus_unpinned", &[]),
    ("pinguard:host_events_lost:increase5m", &[]),
];

/// Metrics the daemon must export from its first scrape on.
const ALWAYS_PRESENT: &[&str] = &[
    "pinguard_build_info",
    "pinguard_cpu_guarded",
    "pinguard_cpu_run_seconds_total",
    "pinguard_events_lost_total",
    "pinguard_mode",
    "pinguard_vms",
    "pinguard_thread_map_full_total",
    "pinguard_tasks_vanished_total",
    "pinguard_discovery_errors_total",
    "pinguard_discovery_scans_total",
    "pinguard_scrapes_total",
    // Counters of events, at 0 for the labels known in advance.
    "pinguard_violations_total",
    "pinguard_evictions_total",
    "pinguard_enforcement_errors_total",
    "pinguard_config_reloads_total",
    "pinguard_isolation_repairs_total",
];

/// Alerts the issue asks for (more may exist).
const REQUIRED_ALERTS: &[&str] = &[
    "PinguardIsolationViolated",
    "PinguardVcpuUnpinned",
    "PinguardEnforcementFailing",
    "PinguardEventsLost",
    "PinguardDown",
    "PinguardNotScraped",
    "PinguardCpuNoiseHigh",
    "PinguardVcpuWaitHigh",
];

/// Series that exist only for hardware IRQs pinguard saw on a guarded CPU:
/// a host that routes no device IRQ to the test's CPU has none of them.
const IRQ_SERIES: &[&str] = &[
    "pinguard_irq_seconds_total",
    "pinguard_irqs_total",
    "pinguard:irq_ratio:rate5m",
    "pinguard:cpu_irq_ratio:rate5m",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn rules_path() -> PathBuf {
    repo().join("dashboards/prometheus/pinguard.rules.yml")
}

fn dashboard() -> Value {
    serde_json::from_str(&read("dashboards/grafana/pinguard.json"))
        .unwrap_or_else(|e| panic!("dashboards/grafana/pinguard.json is not valid JSON: {e}"))
}

fn rules() -> Vec<Rule> {
    promql::parse_rules(&read("dashboards/prometheus/pinguard.rules.yml"))
        .unwrap_or_else(|e| panic!("dashboards/prometheus/pinguard.rules.yml: {e}"))
}

fn rule_test_files() -> Vec<PathBuf> {
    let dir = repo().join("dashboards/prometheus/tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no promtool test files in {}",
        dir.display()
    );
    files
}

/// Every expression of the dashboard and the rules.
fn all_exprs() -> Vec<PromExpr> {
    let mut exprs =
        promql::dashboard_exprs(&dashboard()).unwrap_or_else(|e| panic!("dashboard: {e}"));
    exprs.extend(rules().iter().map(Rule::to_expr));
    exprs
}

fn assert_no_failures(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} problem(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn dashboard_is_importable_and_complete() {
    let d = dashboard();
    let mut bad = Vec::new();
    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    if schema < 39 {
        bad.push(format!("schemaVersion is {schema}, expected 39 or newer"));
    }
    if d["uid"].as_str().is_none_or(str::is_empty) || d["title"].as_str().is_none_or(str::is_empty)
    {
        bad.push("dashboard needs a uid and a title".into());
    }
    if !d["id"].is_null() {
        bad.push("id must be null so the dashboard imports as a new one".into());
    }

    // Template variables: the datasource is one, the others list label values.
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    match vars.get("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => bad
            .push("variable `datasource` must be of type datasource with query prometheus".into()),
    }
    for name in ["instance", "vm", "cpu"] {
        let Some(v) = vars.get(name) else {
            bad.push(format!("variable `{name}` is missing"));
            continue;
        };
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        if v["type"] != "query"
            || !q.starts_with("label_values(")
            || !q.contains(&format!(", {name})"))
        {
            bad.push(format!(
                "variable `{name}` must be a query variable `label_values(..., {name})`, is {q:?}"
            ));
        }
        if v["datasource"]["uid"] != "${datasource}" {
            bad.push(format!(
                "variable `{name}` must use the datasource variable"
            ));
        }
    }

    // Panels.
    let mut ids = BTreeSet::new();
    for p in promql::all_panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        let Some(id) = p["id"].as_u64() else {
            bad.push(format!("panel {title:?} has no numeric id"));
            continue;
        };
        if !ids.insert(id) {
            bad.push(format!("panel id {id} is used twice"));
        }
        if p["gridPos"]["w"].as_u64().is_none() || p["gridPos"]["h"].as_u64().is_none() {
            bad.push(format!("panel {id} {title:?} has no gridPos"));
        }
        if p["type"] == "row" {
            continue;
        }
        if title.is_empty() {
            bad.push(format!("panel {id} has no title"));
        }
        if p["description"]
            .as_str()
            .is_none_or(|s| s.trim().len() < 20)
        {
            bad.push(format!(
                "panel {id} {title:?} needs a description saying what good looks like"
            ));
        }
        if p["datasource"]["uid"] != "${datasource}" || p["datasource"]["type"] != "prometheus" {
            bad.push(format!("panel {id} {title:?}: datasource must be {{type: prometheus, uid: ${{datasource}}}}"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            bad.push(format!("panel {id} {title:?} has no targets"));
        }
        let mut refs = BTreeSet::new();
        for t in &targets {
            let r = t["refId"].as_str().unwrap_or_default();
            if r.is_empty() || !refs.insert(r.to_string()) {
                bad.push(format!(
                    "panel {id} {title:?}: missing or duplicate refId {r:?}"
                ));
            }
            if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                bad.push(format!("panel {id} {title:?} target {r:?} has no expr"));
            }
            if !t["datasource"].is_null() && t["datasource"]["uid"] != "${datasource}" {
                bad.push(format!(
                    "panel {id} {title:?} target {r:?}: datasource must be ${{datasource}}"
                ));
            }
        }
    }

    // Every variable used anywhere is defined or built in.
    let mut known: BTreeSet<String> = vars.keys().map(|k| k.to_string()).collect();
    known.extend(promql::GRAFANA_BUILTINS.iter().map(|(k, _)| k.to_string()));
    let mut strings = Vec::new();
    collect_strings(&d, &mut strings);
    for s in strings {
        for v in promql::variable_refs(&s) {
            if !known.contains(&v) {
                bad.push(format!(
                    "${v} is used in {s:?} but is not a dashboard variable"
                ));
            }
        }
    }
    assert_no_failures("dashboards/grafana/pinguard.json", &bad);
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

#[test]
fn dashboard_has_the_panels_operators_need() {
    let d = dashboard();
    let panels = promql::all_panels(&d);
    let exprs_of = |p: &Value| -> String {
        p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let has = |what: &str, pred: &dyn Fn(&Value, &str) -> bool| {
        assert!(
            panels.iter().any(|p| pred(p, &exprs_of(p))),
            "the dashboard has no panel for {what}"
        );
    };
    has(
        "guarded CPU occupancy by class, stacked, one per CPU",
        &|p, e| {
            e.contains("pinguard:cpu_class_ratio:rate5m")
                && p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
                && p["repeat"] == "cpu"
        },
    );
    has("intruder time", &|_, e| {
        e.contains("pinguard:cpu_intruder_ratio:rate5m")
    });
    has("violations by kind", &|_, e| {
        e.contains("pinguard_violations_total") && e.contains("kind")
    });
    has("top CPUs by stolen time", &|_, e| {
        e.contains("topk(") && e.contains("pinguard:cpu_stolen_ratio:rate5m")
    });
    has(
        "the vCPU placement table joining info and pinned",
        &|p, e| {
            p["type"] == "table"
                && e.contains("pinguard_vcpu_info")
                && e.contains("pinguard_vcpu_pinned")
        },
    );
    has("re-pins, evictions and enforcement errors", &|_, e| {
        e.contains("pinguard_repins_total")
            && e.contains("pinguard_evictions_total")
            && e.contains("pinguard_enforcement_errors_total")
    });
    has("events lost", &|_, e| {
        e.contains("pinguard_events_lost_total")
    });
    has("BPF run time per event", &|_, e| {
        e.contains("pinguard:bpf_run_seconds_per_run:rate5m")
    });
    has("BPF run time per second", &|_, e| {
        e.contains("pinguard:bpf_cpu_ratio:rate5m")
    });
    let unit = |p: &Value| p["fieldConfig"]["defaults"]["unit"].clone();
    let legends = |p: &Value| -> String {
        p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["legendFormat"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    has("the fleet's hosts ranked by intruder time", &|p, e| {
        e.contains("pinguard:host_intruder_seconds:rate5m")
            && e.contains("sort_desc(")
            && legends(p).contains("{{instance}}")
    });
    has("hosts with unpinned vCPUs", &|p, e| {
        e.contains("pinguard:host_vcpus_unpinned") && legends(p).contains("{{instance}}")
    });
    has("hosts with lost events", &|p, e| {
        e.contains("pinguard:host_events_lost:increase5m") && legends(p).contains("{{instance}}")
    });
    has(
        "IRQ time per guarded CPU and IRQ name, as a share of the CPU",
        &|p, e| {
            e.contains("pinguard:irq_ratio:rate5m")
                && unit(p) == "percentunit"
                && legends(p).contains("{{cpu}}")
                && legends(p).contains("{{name}}")
        },
    );
    has("softirq time by vector, as a share of the CPU", &|p, e| {
        e.contains("pinguard:softirq_ratio:rate5m")
            && unit(p) == "percentunit"
            && legends(p).contains("{{vector}}")
    });
    has("IRQ, softirq and NMI rates", &|_, e| {
        e.contains("pinguard_irqs_total")
            && e.contains("pinguard_softirqs_total")
            && e.contains("pinguard_nmis_total")
    });
    has(
        "vCPU wait (CPU ready) as a share of time per vCPU",
        &|p, e| {
            e.contains("pinguard:vcpu_wait_ratio:rate5m")
                && unit(p) == "percentunit"
                && legends(p).contains("{{vm}}")
                && legends(p).contains("{{vcpu}}")
        },
    );
    has(
        "the vCPU wait p99 from the histogram (histogram_quantile over the rate of _bucket)",
        &|p, e| {
            e.contains("histogram_quantile(0.99")
                && e.contains("rate(pinguard_vcpu_wait_seconds_bucket")
                && unit(p) == "s"
        },
    );
    has("a vCPU wait latency heatmap", &|p, e| {
        p["type"] == "heatmap"
            && e.contains("pinguard_vcpu_wait_seconds_bucket")
            && p["targets"][0]["format"] == "heatmap"
            && p["options"]["calculate"] == false
    });
}

/// Panels about noise and vCPU waits filter every series by the dashboard's
/// variables: `instance` always, and `vm` and `cpu` where the series has
/// them. Series without a `cpu` label (vCPU waits) are narrowed to the
/// selected CPUs through `pinguard_vcpu_info`.
#[test]
fn noise_and_wait_panels_honour_the_variables() {
    const NOISE: &[&str] = &["irq", "softirq", "nmis", "vcpu_wait", "cpu_noise"];
    let labels_of: BTreeMap<&str, &[&str]> = CONTRACT.iter().chain(RECORDED).copied().collect();
    let d = dashboard();
    let mut bad = Vec::new();
    let mut seen = 0;
    for p in promql::all_panels(&d) {
        let title = p["title"].as_str().unwrap_or_default();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            let Ok(selectors) = promql::selectors(expr) else {
                continue; // reported by every_expression_uses_only_contract_...
            };
            if !selectors
                .iter()
                .any(|s| NOISE.iter().any(|n| s.metric.contains(n)))
            {
                continue;
            }
            seen += 1;
            for s in &selectors {
                let Some(labels) = labels_of.get(s.metric.as_str()) else {
                    continue;
                };
                for var in ["instance", "vm", "cpu"] {
                    if var != "instance" && !labels.contains(&var) {
                        continue;
                    }
                    let want = format!("${var}");
                    if !s
                        .matchers
                        .iter()
                        .any(|m| m.label == var && m.op == "=~" && m.value == want)
                    {
                        bad.push(format!(
                            "panel {title:?}: {} lacks {var}=~\"{want}\" in {expr:?}",
                            s.metric
                        ));
                    }
                }
            }
            if !expr.contains("$cpu") {
                bad.push(format!(
                    "panel {title:?}: {expr:?} ignores the cpu variable"
                ));
            }
        }
    }
    assert!(
        seen >= 6,
        "expected the noise and vCPU wait panels, found {seen} targets"
    );
    assert_no_failures("noise and vCPU wait panels", &bad);
}

#[test]
fn every_expression_uses_only_contract_metrics_labels_and_values() {
    let rules = rules();
    let recorded: BTreeSet<&str> = rules
        .iter()
        .filter(|r| !r.alert)
        .map(|r| r.name.as_str())
        .collect();
    let expected: BTreeSet<&str> = RECORDED.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        recorded, expected,
        "the recording rules in pinguard.rules.yml and RECORDED in this test must list the same rules"
    );
    let mut labels_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (metric, labels) in CONTRACT.iter().chain(RECORDED).chain(PROMETHEUS_SERIES) {
        labels_of.insert(
            metric,
            labels.iter().chain(TARGET_LABELS).copied().collect(),
        );
    }
    let enums: BTreeMap<&str, &[&str]> = LABEL_VALUES.iter().copied().collect();

    let mut bad = Vec::new();
    let mut used = BTreeSet::new();
    for e in all_exprs() {
        let selectors = match promql::selectors(&e.expr) {
            Ok(s) => s,
            Err(err) => {
                bad.push(format!("{}: cannot read {:?}: {err}", e.origin, e.expr));
                continue;
            }
        };
        if selectors.is_empty() {
            bad.push(format!("{}: selects no metric: {:?}", e.origin, e.expr));
        }
        for s in selectors {
            let name_matcher = s
                .matchers
                .iter()
                .find(|m| m.label == "__name__" && m.op == "=");
            let metric = if s.metric.is_empty() {
                name_matcher.map(|m| m.value.clone()).unwrap_or_default()
            } else {
                s.metric.clone()
            };
            let Some(allowed) = labels_of.get(metric.as_str()) else {
                bad.push(format!(
                    "{}: metric {metric:?} is not in pinguard's contract nor a recording rule",
                    e.origin
                ));
                continue;
            };
            used.insert(metric.clone());
            for m in &s.matchers {
                if m.label == "__name__" {
                    continue;
                }
                if !allowed.contains(m.label.as_str()) {
                    bad.push(format!(
                        "{}: {metric} has no label {:?} (it has {allowed:?})",
                        e.origin, m.label
                    ));
                    continue;
                }
                let Some(values) = enums.get(m.label.as_str()) else {
                    continue;
                };
                // Exact values, and the words of a plain `a|b` alternation,
                // must be values the contract allows.
                let words: Vec<&str> = match m.op.as_str() {
                    "=" | "!=" => vec![m.value.as_str()],
                    _ if m
                        .value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|') =>
                    {
                        m.value.split('|').collect()
                    }
                    _ => Vec::new(),
                };
                for w in words {
                    if !values.contains(&w) {
                        bad.push(format!(
                            "{}: {metric}{{{}}} value {w:?} is not one of {values:?}",
                            e.origin, m.label
                        ));
                    }
                }
            }
        }
    }
    for (metric, _) in CONTRACT {
        if !used.contains(*metric) {
            bad.push(format!(
                "{metric} is in the contract but neither the dashboard nor the rules use it"
            ));
        }
    }
    assert_no_failures("dashboard and rules expressions", &bad);
}

#[test]
fn alerts_have_severity_annotations_runbooks_and_unit_tests() {
    let rules = rules();
    let runbook = read("docs/ALERTS.md");
    let anchors = promql::markdown_anchors(&runbook);
    let tests: String = rule_test_files()
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("reading a promtool test file"))
        .collect::<Vec<_>>()
        .join("\n");
    let test_lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let mut bad = Vec::new();
    let alerts: Vec<&Rule> = rules.iter().filter(|r| r.alert).collect();
    for name in REQUIRED_ALERTS {
        if !alerts.iter().any(|a| a.name == *name) {
            bad.push(format!("alert {name} is missing"));
        }
    }
    for a in &alerts {
        let n = &a.name;
        if !matches!(
            a.labels.get("severity").map(String::as_str),
            Some("critical" | "warning")
        ) {
            bad.push(format!("{n}: label severity must be critical or warning"));
        }
        for key in ["summary", "description"] {
            if a.annotations.get(key).is_none_or(|s| s.trim().is_empty()) {
                bad.push(format!("{n}: annotation {key} is missing"));
            }
        }
        let anchor = promql::github_anchor(n);
        let want = format!("docs/ALERTS.md#{anchor}");
        match a.annotations.get("runbook_url") {
            Some(url) if *url == want => {}
            other => bad.push(format!("{n}: runbook_url is {other:?}, expected {want:?}")),
        }
        if !anchors.contains(&anchor) {
            bad.push(format!(
                "{n}: docs/ALERTS.md has no heading `## {n}` (anchor #{anchor})"
            ));
        }
        // promtool cases: one where it fires, one where it must not.
        let mut fires = false;
        let mut quiet = false;
        for (i, l) in test_lines.iter().enumerate() {
            if *l != format!("alertname: {n}") {
                continue;
            }
            match test_lines[i + 1..]
                .iter()
                .find(|l| !l.is_empty() && !l.starts_with('#'))
            {
                Some(&"exp_alerts: []") => quiet = true,
                Some(&"exp_alerts:") => fires = true,
                _ => {}
            }
        }
        if !fires || !quiet {
            bad.push(format!(
                "{n}: dashboards/prometheus/tests needs a case where it fires ({fires}) and one where it stays quiet ({quiet})"
            ));
        }
    }
    for r in rules.iter().filter(|r| !r.alert) {
        let tested = test_lines.iter().any(|l| {
            l.strip_prefix("- expr:")
                .or(l.strip_prefix("expr:"))
                .is_some_and(|e| e.contains(&r.name))
        });
        if !tested {
            bad.push(format!("recording rule {} has no promql_expr_test", r.name));
        }
    }
    // No runbook for an alert that no longer exists.
    for l in runbook.lines().filter(|l| l.starts_with("## ")) {
        let h = l.trim_start_matches('#').trim();
        if h.starts_with("Pinguard") && !alerts.iter().any(|a| a.name == h) {
            bad.push(format!(
                "docs/ALERTS.md has a runbook for {h}, which is not an alert"
            ));
        }
    }
    assert_no_failures("alerting rules", &bad);
}

fn missing_promtool() -> Option<String> {
    testkit::which("promtool")
        .is_err()
        .then(|| "promtool is not installed (apt-get install prometheus)".into())
}

fn promtool(args: &[&str]) -> (bool, String) {
    testkit::process::succeeds(Command::new("promtool").args(args).current_dir(repo()))
}

#[test]
fn promtool_checks_and_unit_tests_pass() {
    testkit::require!(missing_promtool());
    let (ok, out) = promtool(&["check", "rules", "dashboards/prometheus/pinguard.rules.yml"]);
    assert!(ok, "promtool check rules failed:\n{out}");
    // Cross-checks this test's own rules reader against Prometheus's.
    let count = rules().len();
    assert!(
        out.contains(&format!("SUCCESS: {count} rules found")),
        "promtool found a different number of rules than parse_rules ({count}):\n{out}"
    );

    let files = rule_test_files();
    let mut args = vec!["test".to_string(), "rules".to_string()];
    args.extend(files.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = promtool(&args);
    assert!(ok, "promtool test rules failed:\n{out}");

    let (ok, out) = promtool(&["check", "config", "dashboards/prometheus/prometheus.yml"]);
    assert!(ok, "promtool check config failed:\n{out}");
}

// ---------------------------------------------------------------------------
// Live: real daemon, real guest, real intruder, real Prometheus.

/// A thread bound to one CPU that writes and syncs a small file every 50 ms
/// until dropped, so the disk's completion IRQs keep firing (on that CPU if
/// the IRQ's affinity allows it). The file is removed on drop.
struct DiskWriter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl DiskWriter {
    fn start(cpu: usize) -> Self {
        // /var/tmp: on disk (/tmp may be tmpfs, which raises no IRQ).
        let dir = tempfile::tempdir_in("/var/tmp")
            .unwrap_or_else(|e| panic!("creating a directory in /var/tmp: {e}"));
        let path = dir.path().join("io");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("dash-disk".into())
            .spawn(move || {
                let opened = (|| {
                    pin_current_thread(cpu)
                        .map_err(|e| format!("binding the disk writer to CPU {cpu}: {e}"))?;
                    std::fs::File::create(&path)
                        .map_err(|e| format!("creating {}: {e}", path.display()))
                })();
                let file = match opened {
                    Ok(f) => {
                        let _ = ready_tx.send(Ok(()));
                        f
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let block = [0x5au8; 4096];
                while !flag.load(Ordering::Relaxed) {
                    use std::os::unix::fs::FileExt as _;
                    // Errors (e.g. a full disk) only mean fewer IRQs; the
                    // test reports a missing IRQ series with /proc/interrupts.
                    let _ = file.write_at(&block, 0);
                    let _ = file.sync_data();
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
            .expect("spawning the disk writer thread");
        let writer = Self {
            stop,
            handle: Some(handle),
            _dir: dir,
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => writer,
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("the disk writer thread did not start: {e}"),
        }
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Interrupt counts per numbered IRQ on `cpu`, from /proc/interrupts (the
/// kernel's own tally, independent of pinguard).
fn proc_irqs_on(cpu: usize) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/interrupts")
        .unwrap_or_else(|e| panic!("reading /proc/interrupts: {e}"));
    let mut lines = text.lines();
    let Some(column) = lines
        .next()
        .and_then(|h| h.split_whitespace().position(|c| c == format!("CPU{cpu}")))
    else {
        return BTreeMap::new();
    };
    lines
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let irq = parts.next()?.strip_suffix(':')?;
            irq.parse::<u32>().ok()?;
            let n = parts.nth(column)?.parse().ok()?;
            Some((irq.to_string(), n))
        })
        .collect()
}

/// Why a query result does not satisfy `e`, if it does not.
fn check_result(e: &PromExpr, series: &[Value]) -> Result<(), String> {
    if series.is_empty() {
        return Err("empty result".into());
    }
    for s in series {
        let labels = &s["metric"];
        let missing: Vec<&String> = e
            .labels
            .iter()
            .filter(|l| labels[l.as_str()].as_str().is_none())
            .collect();
        if !missing.is_empty() {
            return Err(format!("series {labels} lacks label(s) {missing:?}"));
        }
        let v = s["value"][1].as_str().unwrap_or_default();
        if !v.parse::<f64>().is_ok_and(f64::is_finite) {
            return Err(format!(
                "series {labels} has value {v:?}, not a finite number"
            ));
        }
    }
    Ok(())
}

#[test]
fn every_dashboard_and_rule_query_returns_data_from_a_live_daemon() {
    testkit::require!(missing_kvm());
    testkit::require!(missing_prometheus());
    const CPU: usize = 1;

    const VM: &str = "pg-dashboards";

    // The guest is there first, so its vCPU is found on the first scan. It
    // runs (no -S): its idle vCPU wakes on the guest's timer ticks, and
    // pinned to the guarded CPU (where pinguard measures waits) it waits
    // whenever the intruder holds that CPU.
    let guest = Guest::start(GuestOptions {
        paused: false,
        ..GuestOptions::new(VM)
    });
    set_affinity(guest.vcpu_tids()[0], &[CPU]);
    // Guests of others may run too: in observe mode pinguard changes no
    // affinity and places every vCPU it finds (sharing CPU 1 if need be);
    // their series only add to ours, and the checks below name our VM.
    let irqs_before = proc_irqs_on(CPU);
    // Observe mode (the default) with the defaults, except BPF statistics:
    // every panel must have data, the program cost panels included, and
    // those need `bpf_stats = true` (off by default).
    let mut opts = DaemonOptions::new("bpf_stats = true\n");
    opts.guard = CPU;
    let mut daemon = Daemon::start_with(&opts);
    let exposition = daemon.scrape();
    let _intruder = Bursty::start("dash-intruder", CPU);
    let _disk = DiskWriter::start(CPU);
    // A reload counts in pinguard_config_reloads_total{result="success"}
    // (at 0 before it).
    daemon.process().signal(Signal::SIGHUP);
    daemon.wait_metric(
        "a successful reload after SIGHUP",
        "pinguard_config_reloads_total",
        &[("result", "success")],
        |v| v >= 1.0,
    );

    // The contract's always-present metrics, straight from /metrics.
    let present = metrics::parse(&exposition)
        .unwrap_or_else(|e| panic!("/metrics is not an exposition ({e}):\n{exposition}"));
    let mut bad = Vec::new();
    for m in ALWAYS_PRESENT {
        if !present.iter().any(|s| s.name == *m) {
            bad.push(format!("{m} is missing from /metrics"));
        }
    }
    let cpu = CPU.to_string();
    for class in LABEL_VALUES[0].1 {
        let ok = present.iter().any(|s| {
            s.name == "pinguard_cpu_run_seconds_total" && s.has(&[("cpu", &cpu), ("class", class)])
        });
        if !ok {
            bad.push(format!("pinguard_cpu_run_seconds_total{{cpu=\"{CPU}\",class=\"{class}\"}} is missing from /metrics"));
        }
    }
    assert_no_failures(
        &format!(
            "/metrics of pinguard run (output:\n{})",
            daemon.process().stderr_lines().join("\n")
        ),
        &bad,
    );

    let prom = Prometheus::start(&daemon.addr.to_string(), &rules_path());
    wait_for(
        "Prometheus to scrape pinguard successfully",
        Duration::from_secs(30),
        || {
            prom.targets()
                .iter()
                .any(|t| t.health == "up")
                .then_some(())
        },
    );
    prom.wait_for_series("pinguard_build_info", Duration::from_secs(30));
    // Rates need two scrapes; the intruder needs pinguard to have seen it.
    prom.wait_for_series("pinguard:cpu_class_ratio:rate5m", Duration::from_secs(60));
    prom.wait_for_series(
        &format!("pinguard_intrusions_total{{cpu=\"{CPU}\",source=\"user\"}}"),
        Duration::from_secs(60),
    );
    prom.wait_for_series(
        &format!("pinguard_vcpu_wait_seconds_count{{vm=\"{VM}\",vcpu=\"0\"}} > 0"),
        Duration::from_secs(60),
    );

    // Prometheus loaded exactly the rules this test reads, and evaluates them without error.
    let rules = rules();
    let names: BTreeSet<String> = rules.iter().map(|r| r.name.clone()).collect();
    let loaded = wait_for(
        "every rule to be evaluated once",
        Duration::from_secs(30),
        || {
            let loaded = prom.rules().ok()?;
            loaded
                .iter()
                .all(|r| r.health != "unknown")
                .then_some(loaded)
        },
    );
    let loaded_names: BTreeSet<String> = loaded.iter().map(|r| r.name.clone()).collect();
    assert_eq!(
        loaded_names, names,
        "rules Prometheus loaded vs rules parsed from the file"
    );
    let broken: Vec<String> = loaded
        .iter()
        .filter(|r| r.health != "ok")
        .map(|r| format!("{} {}: {} {}", r.kind, r.name, r.health, r.last_error))
        .collect();
    assert_no_failures("rule evaluation in Prometheus", &broken);

    // Everything to run: dashboard targets and variables, each recording
    // rule's expression and its recorded series, each alert's expression.
    let recorded_labels: BTreeMap<&str, &[&str]> = RECORDED.iter().copied().collect();
    let mut exprs =
        promql::dashboard_exprs(&dashboard()).unwrap_or_else(|e| panic!("dashboard: {e}"));
    for r in &rules {
        let mut e = r.to_expr();
        if !r.alert {
            let labels: Vec<String> = recorded_labels[r.name.as_str()]
                .iter()
                .chain(TARGET_LABELS)
                .map(|l| l.to_string())
                .collect();
            e.labels = labels.clone();
            exprs.push(PromExpr {
                origin: format!("recorded series {}", r.name),
                expr: r.name.clone(),
                raw: r.name.clone(),
                labels,
                source: Source::Record,
            });
        }
        exprs.push(e);
    }
    // Scenario-specific expectations on top of "non-empty with labels".
    for class in LABEL_VALUES[0].1 {
        exprs.push(PromExpr {
            source: Source::Record,
            origin: format!("class {class} of the guarded CPU"),
            expr: format!("pinguard:cpu_class_ratio:rate5m{{cpu=\"{CPU}\",class=\"{class}\"}}"),
            raw: String::new(),
            labels: vec!["instance".into(), "job".into()],
        });
    }
    // Noise and waits are measured, not just exported as zeros.
    let measured = [
        (
            "softirq time on the guarded CPU",
            format!("pinguard:cpu_softirq_ratio:rate5m{{cpu=\"{CPU}\"}} > 0"),
        ),
        (
            "IRQ + softirq time on the guarded CPU",
            format!("pinguard:cpu_noise_ratio:rate5m{{cpu=\"{CPU}\"}} > 0"),
        ),
        (
            "IRQ time on the guarded CPU",
            format!("pinguard:cpu_irq_ratio:rate5m{{cpu=\"{CPU}\"}} > 0"),
        ),
        (
            "our vCPU's wait share",
            format!("pinguard:vcpu_wait_ratio:rate5m{{vm=\"{VM}\",vcpu=\"0\"}} > 0"),
        ),
        (
            "our vCPU's wait histogram",
            format!("pinguard_vcpu_wait_seconds_bucket{{vm=\"{VM}\",vcpu=\"0\",le=\"+Inf\"}} > 0"),
        ),
        (
            "our vCPU placed on the guarded CPU",
            format!("pinguard_vcpu_info{{vm=\"{VM}\",vcpu=\"0\",cpu=\"{CPU}\"}}"),
        ),
        (
            "the reload",
            "pinguard_config_reloads_total{result=\"success\"} > 0".to_string(),
        ),
    ];
    for (what, expr) in measured {
        exprs.push(PromExpr {
            source: Source::Record,
            origin: what.into(),
            expr,
            raw: String::new(),
            labels: vec!["instance".into(), "job".into()],
        });
    }
    exprs.push(PromExpr {
        source: Source::Record,
        origin: "PinguardIsolationViolated pending or firing for the intruder's CPU".into(),
        expr: format!("ALERTS{{alertname=\"PinguardIsolationViolated\",cpu=\"{CPU}\"}}"),
        raw: String::new(),
        labels: vec!["alertstate".into()],
    });

    // Series may need a few more scrapes (increase() needs two samples of a
    // new counter): poll what is still failing, bounded.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failing: Vec<(PromExpr, String)> =
        exprs.into_iter().map(|e| (e, String::new())).collect();
    loop {
        for (e, why) in failing.iter_mut() {
            let outcome = match e.source {
                // Alerts return series only while they fire: they must run.
                Source::Alert => prom.try_query(&e.expr).map(|_| ()),
                _ => prom.series(&e.expr).and_then(|s| check_result(e, &s)),
            };
            *why = outcome.err().unwrap_or_default();
        }
        failing.retain(|(_, why)| !why.is_empty());
        if failing.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    // IRQ series exist only for IRQs that fired on the guarded CPU. Their
    // absence is only acceptable when the kernel, too, says none did.
    let irqs_after = proc_irqs_on(CPU);
    let irq_grew: Vec<String> = irqs_after
        .iter()
        .filter(|(irq, n)| **n > irqs_before.get(*irq).copied().unwrap_or(0))
        .map(|(irq, n)| {
            format!(
                "{irq} (+{})",
                n - irqs_before.get(irq).copied().unwrap_or(0)
            )
        })
        .collect();
    let irq_only = |expr: &str| {
        promql::metric_names(expr)
            .is_ok_and(|names| names.iter().any(|n| IRQ_SERIES.contains(&n.as_str())))
    };
    if irq_grew.is_empty() {
        failing.retain(|(e, why)| {
            let excused = why == "empty result" && irq_only(&e.expr);
            if excused {
                eprintln!(
                    "note: {} is empty; allowed, /proc/interrupts shows no IRQ on CPU {CPU} during the test",
                    e.origin
                );
            }
            !excused
        });
    }

    // Alerts about pinguard being unreachable must stay quiet while it is up.
    let quiet = prom
        .series(r#"ALERTS{alertname=~"PinguardDown|PinguardNotScraped|PinguardMetricsMissing"}"#);
    let mut bad: Vec<String> = failing
        .iter()
        .map(|(e, why)| {
            let one_line = e.expr.split_whitespace().collect::<Vec<_>>().join(" ");
            format!("{}: {why}\n      {one_line}", e.origin)
        })
        .collect();
    if !quiet.as_ref().is_ok_and(Vec::is_empty) {
        bad.push(format!(
            "availability alerts are active while pinguard is scraped: {quiet:?}"
        ));
    }

    // Each metric must exist (counters of events at 0 when nothing
    // happened): a fallback like `or 0 * ...` would otherwise hide a
    // misspelt name.
    let present: BTreeSet<String> = prom
        .series(r#"group by (__name__) ({__name__=~"pinguard_.*"})"#)
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s["metric"]["__name__"].as_str().map(String::from))
        .collect();
    for (m, _) in CONTRACT {
        if present.contains(*m) {
            continue;
        }
        if *m == "pinguard_isolation_active" {
            // Only with isolation = "runtime", which this test does not
            // change the host for; tests/tests/isolate.rs awaits it.
            continue;
        }
        if IRQ_SERIES.contains(m) && irq_grew.is_empty() {
            eprintln!("note: {m} is absent; allowed, no IRQ fired on CPU {CPU} during the test");
            continue;
        }
        bad.push(format!(
            "{m} is not exported (expected with a running guest, an intruder and disk I/O on CPU {CPU}; IRQs on CPU {CPU} per /proc/interrupts: {irq_grew:?})"
        ));
    }
    assert!(
        bad.is_empty(),
        "{} check(s) failed against the live daemon:\n  {}\n\npinguard metrics present: {present:?}\ntargets: {:?}\npinguard output:\n{}",
        bad.len(),
        bad.join("\n  "),
        prom.targets(),
        daemon.process().stderr_lines().join("\n")
    );
}
