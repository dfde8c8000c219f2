//! A real Prometheus server: Debian's `prometheus` on loopback with a
//! generated config that scrapes its targets (one per pinguard, each its own
//! `instance`) every second and loads a rules file; queries go through its
//! HTTP API.
use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::http;

/// What is missing to run the Prometheus server, if anything.
pub fn missing_prometheus() -> Option<String> {
    which::which("prometheus")
        .is_err()
        .then(|| "prometheus is not installed (apt-get install prometheus)".into())
}

/// A running Prometheus server; killed and its data removed on drop.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// One scrape target as `/api/v1/targets` reports it.
#[derive(Debug, Clone)]
pub struct Target {
    pub scrape_url: String,
    /// Its `instance` label ("host:port").
    pub instance: String,
    /// "up", "down" or "unknown" (not scraped yet).
    pub health: String,
    pub last_error: String,
}

/// One loaded rule as `/api/v1/rules` reports it.
#[derive(Debug, Clone)]
pub struct LoadedRule {
    pub name: String,
    /// "recording" or "alerting".
    pub kind: String,
    /// "ok", "err" or "unknown" (not evaluated yet).
    pub health: String,
    pub last_error: String,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` ("host:port", job `pinguard`)
    /// every second with `rules` loaded and evaluated every second, and
    /// waits (bounded) until it is ready. Panics with its log on failure.
    pub fn start(target: &str, rules: &Path) -> Self {
        Self::start_fleet(&[target], rules)
    }

    /// [`Prometheus::start`] with several targets in the one job `pinguard`,
    /// as a fleet is scraped: each target is an `instance` of its own.
    pub fn start_fleet(targets: &[&str], rules: &Path) -> Self {
        let bin = which::which("prometheus")
            .expect("prometheus is not installed (apt-get install prometheus)");
        let rules = rules
            .canonicalize()
            .unwrap_or_else(|e| panic!("rules file {}: {e}", rules.display()));
        let dir = tempfile::Builder::new()
            .prefix("pinguard-prometheus-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a directory for Prometheus: {e}"));
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, scrape_config(targets, &rules))
            .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let addr: SocketAddr = ([127, 0, 0, 1], http::free_port()).into();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("duplicating the log file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting prometheus: {e}"));
        let mut prom = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!(
                    "prometheus exited ({status}) before it was ready; log:\n{}",
                    prom.log()
                );
            }
            if matches!(
                http::get(addr, "/-/ready", Duration::from_secs(2)),
                Ok((200, _))
            ) {
                return prom;
            }
            if Instant::now() > deadline {
                panic!(
                    "prometheus on {addr} was not ready within 60 s; log:\n{}",
                    prom.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything Prometheus logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path and returns its `data`, or why it failed.
    fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let (status, body) = http::get_query(self.addr, path, query, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("GET {path}: HTTP {status}, body is not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!(
                "GET {path}: HTTP {status}, {}: {}",
                v["errorType"].as_str().unwrap_or("error"),
                v["error"].as_str().unwrap_or(&body)
            ));
        }
        Ok(v["data"].clone())
    }

    /// Instant query; returns the API's `data` (`resultType` and `result`)
    /// or the server's error (e.g. a PromQL parse error).
    pub fn try_query(&self, expr: &str) -> Result<Value, String> {
        self.api("/api/v1/query", &[("query", expr)])
    }

    /// Instant query; panics with the server's error.
    pub fn query(&self, expr: &str) -> Value {
        self.try_query(expr)
            .unwrap_or_else(|e| panic!("query {expr:?} failed: {e}"))
    }

    /// The series of an instant-vector query (empty when nothing matches).
    pub fn series(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.try_query(expr)?;
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
            other => Err(format!(
                "query {expr:?} returned {other:?}, not an instant vector"
            )),
        }
    }

    /// Polls `expr` until it returns at least one series; panics after
    /// `timeout` with the last error and Prometheus's target health.
    pub fn wait_for_series(&self, expr: &str, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.series(expr) {
                Ok(s) if !s.is_empty() => return s,
                Ok(_) => "empty result".to_string(),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for series of {expr:?} ({last}); targets: {:?}",
                    self.targets()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Health of the scrape targets (empty if the API cannot be read).
    pub fn targets(&self) -> Vec<Target> {
        let Ok(data) = self.api("/api/v1/targets", &[("state", "active")]) else {
            return Vec::new();
        };
        data["activeTargets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| Target {
                        scrape_url: t["scrapeUrl"].as_str().unwrap_or_default().into(),
                        instance: t["labels"]["instance"].as_str().unwrap_or_default().into(),
                        health: t["health"].as_str().unwrap_or_default().into(),
                        last_error: t["lastError"].as_str().unwrap_or_default().into(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The rules Prometheus loaded, with their evaluation health.
    pub fn rules(&self) -> Result<Vec<LoadedRule>, String> {
        let data = self.api("/api/v1/rules", &[])?;
        let mut out = Vec::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for r in group["rules"].as_array().into_iter().flatten() {
                out.push(LoadedRule {
                    name: r["name"].as_str().unwrap_or_default().into(),
                    kind: r["type"].as_str().unwrap_or_default().into(),
                    health: r["health"].as_str().unwrap_or_default().into(),
                    last_error: r["lastError"].as_str().unwrap_or_default().into(),
                });
            }
        }
        Ok(out)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config the test server runs: one job `pinguard` (the name the alert
/// rules expect) scraping `targets` every second, rules evaluated every second.
pub fn scrape_config(targets: &[&str], rules: &Path) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules:?}\n\
         scrape_configs:\n  - job_name: pinguard\n    static_configs:\n      - targets: [{targets}]\n",
        rules = rules.display().to_string(),
        targets = targets.join(", "),
    )
}
