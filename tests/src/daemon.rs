//! A real `pinguard run` daemon for tests, scraped over real HTTP.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    process::Pinguard,
    prometheus::{free_port, http_get},
    util::wait_for,
};

pub struct Daemon {
    process: Option<Pinguard>,
    pub addr: SocketAddr,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `pinguard run --guard 1 --listen 127.0.0.1:<free port> --config <file>`
    /// plus `extra`, and waits until it serves /healthz.
    pub fn start(config: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("pinguard.toml");
        std::fs::write(&config_path, config).expect("write config");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen = addr.to_string();
        let config_arg = config_path.display().to_string();
        let mut args = vec![
            "run",
            "--guard",
            "1",
            "--listen",
            &listen,
            "--config",
            &config_arg,
        ];
        args.extend_from_slice(extra);
        let mut process = Pinguard::spawn(&args);
        process.wait_stderr("pinguard 0", Duration::from_secs(30));
        let d = Self {
            process: Some(process),
            addr,
            config: config_path,
            _dir: dir,
        };
        wait_for("the daemon's /healthz", Duration::from_secs(10), || {
            matches!(
                http_get(d.addr, "/healthz", Duration::from_secs(2)),
                Ok((200, _))
            )
            .then_some(())
        });
        d
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").pid()
    }

    pub fn process(&mut self) -> &mut Pinguard {
        self.process.as_mut().expect("running")
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn scrape(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "scrape failed: {body}");
        body
    }

    /// Sum of the samples of `name` whose labels include all of `labels`
    /// (`None` if no such series is exported).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sum_metric(&self.scrape(), name, labels)
    }

    /// Waits until the metric satisfies `pred`.
    pub fn wait_metric(
        &self,
        what: &str,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let mut last = None;
        wait_for(
            &format!("{what} ({name}{labels:?}, last seen {last:?})"),
            Duration::from_secs(20),
            || {
                last = self.metric(name, labels);
                last.filter(|v| pred(*v))
            },
        )
    }

    /// Stops the daemon (SIGTERM) and returns its stderr.
    pub fn stop(&mut self) -> Vec<String> {
        let Some(p) = self.process.take() else {
            return Vec::new();
        };
        p.signal(nix::sys::signal::Signal::SIGTERM);
        let (status, _, err) = p.finish(Duration::from_secs(20));
        restore_evictions(&err);
        assert!(
            status.success(),
            "daemon exited with {status:?}:\n{}",
            err.join("\n")
        );
        err
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            if let Ok((_, _, err)) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                p.finish(Duration::from_secs(20))
            })) {
                restore_evictions(&err);
            }
        }
    }
}

/// Enforce mode changes the affinity of whatever intruded (test runners,
/// shells); put every evicted thread back as it was.
fn restore_evictions(stderr: &[String]) {
    for line in stderr {
        let Some(rest) = line.split("evicted tid ").nth(1) else {
            continue;
        };
        let tid: Option<u32> = rest.split_whitespace().next().and_then(|t| t.parse().ok());
        let was = rest.rsplit("(was ").next().map(|w| w.trim_end_matches(')'));
        if let (Some(tid), Some(was)) = (tid, was) {
            let cpus: Vec<usize> =
                was.split(',')
                    .flat_map(|part| match part.split_once('-') {
                        Some((a, b)) => (a.parse().unwrap_or(0)..=b.parse().unwrap_or(0))
                            .collect::<Vec<usize>>(),
                        None => part.parse().ok().into_iter().collect(),
                    })
                    .collect();
            let mut set = nix::sched::CpuSet::new();
            for c in cpus {
                let _ = set.set(c);
            }
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid as i32), &set);
        }
    }
}

/// Sums matching samples in Prometheus text format.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, lbls) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| lbls.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}
