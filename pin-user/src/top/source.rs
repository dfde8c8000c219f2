//! Where `pinguard top` reads its numbers: the kernel's maps through a
//! probe of its own ([`Local`]), or a running daemon's HTTP endpoints
//! ([`Remote`]: `/metrics`, `/violations`, `/intruders`). Both give a
//! [`Snapshot`] of cumulative totals; the model makes intervals of them.
use std::{collections::BTreeMap, time::Duration};

use thiserror::Error;

use crate::{
    bpf::{
        class::ThreadClass,
        probe::{Probe, ProbeError, comm_str},
    },
    host::cpulist::CpuSet,
    top::model::{CpuTotals, IntruderTotal, Share, Snapshot, ViolationRecord},
};

#[derive(Debug, Error)]
pub enum SourceError {
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(
        "GET {url}: {source} (is `pinguard run` listening there? see its --listen and the config's listen)"
    )]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("GET {url}: unexpected answer: {why}")]
    Parse { url: String, why: String },
}

/// A reading of the guarded CPUs.
pub trait Source {
    fn snapshot(&mut self) -> Result<Snapshot, SourceError>;
    /// Shown in the title: where the numbers come from.
    fn describe(&self) -> String;
    /// The CPUs a daemon guards (this process should keep off them); `None`
    /// when the source is not a daemon.
    fn daemon_guarded(&self) -> Option<CpuSet> {
        None
    }
}

/// The kernel's maps, read through a probe this process loaded.
pub struct Local {
    probe: Probe,
    /// CPU -> "vm/vcpuN", from the placement plan.
    owners: BTreeMap<u32, String>,
}

impl Local {
    pub fn new(probe: Probe, owners: BTreeMap<u32, String>) -> Self {
        Self { probe, owners }
    }
}

impl Source for Local {
    fn snapshot(&mut self) -> Result<Snapshot, SourceError> {
        let mut cpus: BTreeMap<u32, CpuTotals> = BTreeMap::new();
        for (cpu, s) in self.probe.cpu_stats()? {
            let t = cpus.entry(cpu).or_default();
            for class in ThreadClass::ALL {
                t.run_ns[Share::of(class).index()] += s.run_ns[class.index()];
            }
        }
        for (k, n) in self.probe.irq_stats()? {
            if let Some(t) = cpus.get_mut(&k.cpu) {
                t.irqs += n.count;
                t.irq_ns += n.ns;
            }
        }
        for (cpu, s) in self.probe.softirq_stats()? {
            if let Some(t) = cpus.get_mut(&cpu) {
                t.softirqs += s.vec.iter().map(|v| v.count).sum::<u64>();
                t.softirq_ns += s.vec.iter().map(|v| v.ns).sum::<u64>();
            }
        }
        let intruders = self
            .probe
            .threads()?
            .into_iter()
            .filter_map(|(k, t)| {
                Some(IntruderTotal {
                    cpu: k.cpu,
                    tid: k.tid,
                    tgid: t.tgid,
                    comm: comm_str(&t.comm),
                    class: ThreadClass::from_raw(t.class)?,
                    run_ns: t.run_ns,
                    slices: t.slices,
                    max_slice_ns: t.max_slice_ns,
                })
            })
            .collect();
        Ok(Snapshot {
            cpus,
            owners: self.owners.clone(),
            intruders,
            violations: Vec::new(),
            actions: None,
        })
    }

    fn describe(&self) -> String {
        "kernel maps (local probe; violations and actions need --url)".into()
    }
}

/// A running daemon, scraped over HTTP.
pub struct Remote {
    base: String,
    agent: ureq::Agent,
    /// Only these CPUs (`--guard`); all the daemon guards when `None`.
    only: Option<CpuSet>,
    /// Every CPU the daemon guards, as of the last reading.
    guarded: CpuSet,
}

/// How long one request may take: the screen refreshes every second.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

impl Remote {
    pub fn new(base: &str, only: Option<CpuSet>) -> Self {
        // Per phase, not global: with a global timeout ureq resolves the
        // name on a short-lived thread of its own at every request.
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(HTTP_TIMEOUT))
            .timeout_send_request(Some(HTTP_TIMEOUT))
            .timeout_recv_response(Some(HTTP_TIMEOUT))
            .timeout_recv_body(Some(HTTP_TIMEOUT))
            .http_status_as_error(false)
            // The daemon is local or reached directly: no proxy from the environment.
            .proxy(None)
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_string(),
            agent,
            only,
            guarded: CpuSet::new(),
        }
    }

    fn get(&self, path: &str) -> Result<String, SourceError> {
        let url = format!("{}{path}", self.base);
        let http = |source| SourceError::Http {
            url: url.clone(),
            source: Box::new(source),
        };
        let mut response = self.agent.get(&url).call().map_err(http)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(http)?;
        if status != 200 {
            return Err(SourceError::Status {
                url,
                status,
                body: body.trim().to_string(),
            });
        }
        Ok(body)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, SourceError> {
        let body = self.get(path)?;
        serde_json::from_str(&body).map_err(|e| SourceError::Parse {
            url: format!("{}{path}", self.base),
            why: e.to_string(),
        })
    }
}

impl Source for Remote {
    fn snapshot(&mut self) -> Result<Snapshot, SourceError> {
        let text = self.get("/metrics")?;
        let mut snap = from_metrics(&text);
        snap.intruders = self.json("/intruders")?;
        snap.violations = self.json::<Vec<ViolationRecord>>("/violations")?;
        self.guarded = CpuSet::from_cpus(snap.cpus.keys().copied());
        if let Some(only) = &self.only {
            snap.cpus.retain(|c, _| only.contains(*c));
            snap.intruders.retain(|i| only.contains(i.cpu));
            snap.violations.retain(|v| only.contains(v.cpu));
        }
        Ok(snap)
    }

    fn describe(&self) -> String {
        format!("daemon at {}", self.base)
    }

    fn daemon_guarded(&self) -> Option<CpuSet> {
        (!self.guarded.is_empty()).then(|| self.guarded.clone())
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a Prometheus text exposition; lines it cannot read are
/// left out (the families `top` needs are plain counters and gauges).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches([',', ' ']);
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            let eq = r.find('=')?;
            let key = r[..eq].trim().to_string();
            let mut chars = r[eq + 1..].strip_prefix('"')?.char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key, value);
            r = &r[eq + 1..][end + 2..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn seconds_to_ns(s: f64) -> u64 {
    (s * 1e9).round() as u64
}

/// The CPU totals, owners and enforcement counters of a daemon's `/metrics`.
pub fn from_metrics(text: &str) -> Snapshot {
    let mut snap = Snapshot {
        actions: Some(BTreeMap::new()),
        ..Default::default()
    };
    let actions = snap.actions.get_or_insert_default();
    for s in parse_metrics(text) {
        let label = |k: &str| s.labels.get(k).map(String::as_str).unwrap_or("");
        let cpu = label("cpu").parse::<u32>().ok();
        match (s.name.as_str(), cpu) {
            ("pinguard_cpu_guarded", Some(cpu)) => {
                snap.cpus.entry(cpu).or_default();
            }
            ("pinguard_cpu_run_seconds_total", Some(cpu)) => {
                if let Some(share) = Share::from_label(label("class")) {
                    snap.cpus.entry(cpu).or_default().run_ns[share.index()] +=
                        seconds_to_ns(s.value);
                }
            }
            ("pinguard_irq_seconds_total", Some(cpu)) => {
                snap.cpus.entry(cpu).or_default().irq_ns += seconds_to_ns(s.value);
            }
            ("pinguard_irqs_total", Some(cpu)) => {
                snap.cpus.entry(cpu).or_default().irqs += s.value as u64;
            }
            ("pinguard_softirq_seconds_total", Some(cpu)) => {
                snap.cpus.entry(cpu).or_default().softirq_ns += seconds_to_ns(s.value);
            }
            ("pinguard_softirqs_total", Some(cpu)) => {
                snap.cpus.entry(cpu).or_default().softirqs += s.value as u64;
            }
            ("pinguard_vcpu_info", Some(cpu)) if s.value > 0.0 => {
                let name = format!("{}/vcpu{}", label("vm"), label("vcpu"));
                snap.owners
                    .entry(cpu)
                    .and_modify(|o| {
                        // Shared CPUs (allow_shared) name every vCPU.
                        o.push(',');
                        o.push_str(&name);
                    })
                    .or_insert(name);
            }
            ("pinguard_evictions_total", Some(cpu)) => {
                *actions.entry(format!("evict CPU {cpu}")).or_default() += s.value as u64;
            }
            ("pinguard_repins_total", _) => {
                *actions.entry(format!("repin {}", label("vm"))).or_default() += s.value as u64;
            }
            ("pinguard_enforcement_errors_total", _) => {
                *actions
                    .entry(format!("error {} {}", label("action"), label("errno")))
                    .or_default() += s.value as u64;
            }
            _ => {}
        }
    }
    snap
}

/// `--url`: an `http://` base URL (the daemon serves plain HTTP).
pub fn parse_url(s: &str) -> Result<String, String> {
    let rest = s.strip_prefix("http://").ok_or_else(|| {
        format!("invalid URL {s:?}: expected http://HOST:PORT (the daemon serves plain HTTP), e.g. http://127.0.0.1:9477")
    })?;
    if rest.trim_end_matches('/').is_empty() || rest.trim_end_matches('/').contains('/') {
        return Err(format!(
            "invalid URL {s:?}: expected http://HOST:PORT with no path, e.g. http://127.0.0.1:9477"
        ));
    }
    Ok(s.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP pinguard_cpu_run_seconds_total Time on each guarded CPU by class
# TYPE pinguard_cpu_run_seconds_total counter
pinguard_cpu_run_seconds_total{class="idle",cpu="1"} 0.5
pinguard_cpu_run_seconds_total{class="intruder",cpu="1"} 0.25
pinguard_cpu_run_seconds_total{class="vcpu",cpu="1"} 0.125
pinguard_cpu_guarded{cpu="1"} 1
pinguard_cpu_guarded{cpu="3"} 0
pinguard_irq_seconds_total{cpu="1",irq="36",name="virtio1-req.0"} 0.000002
pinguard_irq_seconds_total{cpu="1",irq="37",name="odd \"name\", {x}"} 0.000003
pinguard_irqs_total{cpu="1",irq="36",name="virtio1-req.0"} 7
pinguard_softirq_seconds_total{cpu="1",vector="timer"} 0.00001
pinguard_softirqs_total{cpu="1",vector="timer"} 3
pinguard_vcpu_info{cpu="1",vm="web",vcpu="0"} 1
pinguard_evictions_total{cpu="1"} 4
pinguard_repins_total{vm="web"} 2
pinguard_enforcement_errors_total{action="evict",errno="EPERM"} 0
pinguard_mode{mode="observe"} 1
"#;

    #[test]
    fn a_daemon_scrape_becomes_totals_owners_and_actions() {
        let s = from_metrics(METRICS);
        assert_eq!(s.cpus.keys().copied().collect::<Vec<_>>(), [1, 3]);
        let c = &s.cpus[&1];
        assert_eq!(c.run_ns, [125_000_000, 0, 0, 250_000_000, 500_000_000]);
        assert_eq!((c.irqs, c.irq_ns), (7, 5_000));
        assert_eq!((c.softirqs, c.softirq_ns), (3, 10_000));
        assert_eq!(s.owners[&1], "web/vcpu0");
        let a = s.actions.unwrap();
        assert_eq!(a["evict CPU 1"], 4);
        assert_eq!(a["repin web"], 2);
        assert_eq!(a["error evict EPERM"], 0);
    }

    #[test]
    fn label_values_with_quotes_commas_and_braces() {
        let s = parse_line(r#"m{a="x \"y\", {z}",b="\\n"} 2.5"#).unwrap();
        assert_eq!(s.labels["a"], r#"x "y", {z}"#);
        assert_eq!(s.labels["b"], r"\n");
        assert_eq!(s.value, 2.5);
        assert_eq!(parse_line("plain 3").unwrap().value, 3.0);
        assert_eq!(parse_line("broken{a=\"x} 3"), None);
    }

    #[test]
    fn urls_are_plain_http_without_a_path() {
        assert_eq!(
            parse_url("http://127.0.0.1:9477/").unwrap(),
            "http://127.0.0.1:9477"
        );
        assert!(parse_url("https://h:1").unwrap_err().contains("plain HTTP"));
        assert!(
            parse_url("http://h:1/metrics")
                .unwrap_err()
                .contains("no path")
        );
        assert!(parse_url("127.0.0.1:9477").is_err());
    }
}
