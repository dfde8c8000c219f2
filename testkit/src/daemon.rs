//! A real `pinguard run` daemon, scraped over real HTTP.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    env::pinguard_bin,
    error::{Error, OrPanic as _, Result},
    http, metrics,
    process::Process,
    threads::AffinitySnapshot,
    wait,
};

/// Bound on the daemon attaching its programs and serving /healthz.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on [`Daemon::wait_metric`].
const METRIC_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a daemon: `BIN run --guard GUARD --listen 127.0.0.1:PORT
/// --config FILE ARGS...` with `config` written to FILE.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub bin: PathBuf,
    pub guard: usize,
    /// The config file's text.
    pub config: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// In a process group of its own (see [`Process::try_spawn_group`]).
    pub own_group: bool,
    /// A command that execs the binary (e.g. `setpriv ...`), if any.
    pub wrapper: Vec<String>,
}

impl DaemonOptions {
    /// The binary under test guarding CPU 1 with `config`.
    pub fn new(config: &str) -> Self {
        Self {
            bin: pinguard_bin(),
            guard: 1,
            config: config.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            own_group: false,
            wrapper: Vec::new(),
        }
    }
}

/// A running `pinguard run`; stopped (SIGTERM) on drop.
///
/// An enforcing daemon moves threads it finds on a guarded CPU, and on this
/// lab those include the host's own agents, test runners and shells. So
/// before it starts, the kit takes every thread's affinity on the host
/// ([`AffinitySnapshot`]), and once the daemon has exited (stop, drop,
/// panic) it puts back every thread whose affinity changed meanwhile, by
/// the daemon or otherwise. Not covered: threads born after the daemon
/// started (an eviction of one of those stays), and a change someone else
/// made on purpose while the daemon ran (it is undone too).
pub struct Daemon {
    process: Option<Process>,
    pub addr: SocketAddr,
    /// The config file (rewrite it and send SIGHUP to reload).
    pub config: PathBuf,
    before: AffinitySnapshot,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon and waits (bounded) until it has attached and serves /healthz.
    pub fn try_start(opts: &DaemonOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pinguard-daemon-")
            .tempdir()
            .map_err(|e| Error::io("creating a directory for the daemon's config", e))?;
        let config = dir.path().join("pinguard.toml");
        std::fs::write(&config, &opts.config)
            .map_err(|e| Error::io(format!("writing {}", config.display()), e))?;
        let addr: SocketAddr = ([127, 0, 0, 1], http::free_port()).into();
        let mut cmd = match opts.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&opts.bin);
                c
            }
            None => Command::new(&opts.bin),
        };
        cmd.arg("run")
            .arg("--guard")
            .arg(opts.guard.to_string())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--config")
            .arg(&config)
            .args(&opts.args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        let before = AffinitySnapshot::take();
        let process = if opts.own_group {
            Process::try_spawn_group(&mut cmd)?
        } else {
            Process::try_spawn(&mut cmd)?
        };
        // From here on Drop stops it and puts affinities back.
        let mut d = Self {
            process: Some(process),
            addr,
            config,
            before,
            _dir: dir,
        };
        d.process()
            .try_wait_stderr("its \"running\" line", START_TIMEOUT, |l| {
                l.contains(" running: guarding CPUs")
            })?;
        let healthy = wait::poll(
            "the daemon's /healthz",
            START_TIMEOUT,
            Duration::from_millis(50),
            || matches!(http::get(addr, "/healthz", HTTP_TIMEOUT), Ok((200, _))).then_some(()),
        );
        if let Err(Error::Timeout { what, timeout, .. }) = healthy {
            let detail = d.process().stderr_tail();
            return Err(Error::Timeout {
                what,
                timeout,
                detail,
            });
        }
        healthy?;
        Ok(d)
    }

    /// Starts the binary under test guarding CPU 1 with `config` and `extra`
    /// arguments; panics if it does not come up.
    #[track_caller]
    pub fn start(config: &str, extra: &[&str]) -> Self {
        let mut opts = DaemonOptions::new(config);
        opts.args = extra.iter().map(|a| a.to_string()).collect();
        Self::start_with(&opts)
    }

    /// [`Daemon::try_start`], panicking if it does not come up.
    #[track_caller]
    pub fn start_with(opts: &DaemonOptions) -> Self {
        Self::try_start(opts).or_panic()
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").pid()
    }

    pub fn process(&mut self) -> &mut Process {
        self.process.as_mut().expect("running")
    }

    pub fn try_get(&self, path: &str) -> Result<(u16, String)> {
        http::get(self.addr, path, HTTP_TIMEOUT)
    }

    #[track_caller]
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path).or_panic()
    }

    #[track_caller]
    pub fn scrape(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "scrape failed: {body}");
        body
    }

    /// Sum of the samples of `name` whose labels include all of `labels`
    /// (`None` if no such series is exported); `Err` if the scrape fails.
    pub fn try_metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        let (status, body) = self.try_get("/metrics")?;
        let samples = metrics::parse(&body).map_err(|e| Error::Exposition {
            detail: format!("HTTP {status}, {e}"),
        })?;
        Ok(metrics::sum(&samples, name, labels))
    }

    /// [`Daemon::try_metric`], panicking if the scrape fails.
    #[track_caller]
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metrics::sum_metric(&self.scrape(), name, labels)
    }

    /// Waits (bounded) until the metric satisfies `pred`; the timeout says
    /// the last value seen and the daemon's last log lines.
    pub fn try_wait_metric(
        &mut self,
        what: &str,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let start = Instant::now();
        let mut last = None;
        loop {
            last = self.try_metric(name, labels).ok().flatten().or(last);
            if let Some(v) = last.filter(|v| pred(*v)) {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                let tail = self.process().stderr_tail();
                return Err(Error::Timeout {
                    what: format!("{what} ({name}{labels:?}, last seen {last:?})"),
                    timeout,
                    detail: tail,
                });
            }
            wait::sleep(Duration::from_millis(20))?;
        }
    }

    /// Waits (20 s) until the metric satisfies `pred`; panics on timeout.
    #[track_caller]
    pub fn wait_metric(
        &self,
        what: &str,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let mut last = None;
        wait::wait_for(
            &format!("{what} ({name}{labels:?}, last seen {last:?})"),
            METRIC_TIMEOUT,
            || {
                last = self.metric(name, labels);
                last.filter(|v| pred(*v))
            },
        )
    }

    /// Stops the daemon (SIGTERM), expects a clean exit, puts affinities
    /// back, and returns its stderr.
    pub fn try_stop(&mut self) -> Result<Vec<String>> {
        let Some(p) = self.process.take() else {
            return Ok(Vec::new());
        };
        // On any error the process has been killed by the time it returns.
        let out = p.try_terminate(STOP_TIMEOUT);
        self.restore_affinities();
        out.map(|o| o.stderr)
    }

    /// [`Daemon::try_stop`], panicking if the daemon does not exit cleanly.
    #[track_caller]
    pub fn stop(&mut self) -> Vec<String> {
        self.try_stop().or_panic()
    }

    fn restore_affinities(&self) {
        for (c, result) in self.before.restore() {
            match result {
                Ok(()) => eprintln!(
                    "testkit: put the affinity of tid {} (pid {}) back from {} to {}",
                    c.tid, c.pid, c.now, c.was
                ),
                Err(e) => eprintln!(
                    "testkit: could not put the affinity of tid {} (pid {}) back to {}: {e}",
                    c.tid, c.pid, c.was
                ),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.process.is_some() {
            let _ = self.try_stop();
        }
    }
}
