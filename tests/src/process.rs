//! Running the real pinguard binary as a child process.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::util::pinguard_bin;

/// A running pinguard; killed on drop if still running.
pub struct Pinguard {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    pub stderr_seen: Vec<String>,
    pub stdout_seen: Vec<String>,
}

impl Pinguard {
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(pinguard_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning pinguard {args:?}: {e}"));
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Self {
            child,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
            stdout_seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `needle` (e.g. the "watching" banner
    /// printed once the programs are attached).
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "pinguard did not print {needle:?} on stderr within {timeout:?}; status {:?}; stderr so far:\n{}",
                    self.child.try_wait(),
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    /// Waits for a stdout line for which `pred` holds.
    pub fn wait_stdout(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.stdout_seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no stdout line with {what} within {timeout:?}; stdout so far:\n{}",
                    self.stdout_seen.join("\n")
                ),
            }
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Sends SIGINT and collects everything printed until exit (bounded).
    pub fn stop(self, timeout: Duration) -> (ExitStatus, Vec<String>, Vec<String>) {
        self.signal(nix::sys::signal::Signal::SIGINT);
        self.finish(timeout)
    }

    /// Waits for exit (bounded) and collects the remaining output.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<String>, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                panic!("pinguard did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The reader threads end at EOF, after the process exited.
        let mut out = std::mem::take(&mut self.stdout_seen);
        out.extend(self.stdout.iter());
        let mut err = std::mem::take(&mut self.stderr_seen);
        err.extend(self.stderr.iter());
        (status, out, err)
    }
}

impl Drop for Pinguard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs pinguard to completion, returning (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(pinguard_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running pinguard {args:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A finished pinguard run.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout as one JSON document (panics with both streams if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `pinguard SUBCOMMAND ARGS...` to completion within `timeout`.
pub fn run_subcommand(subcommand: &str, args: &[&str], timeout: Duration) -> Run {
    let mut full = vec![subcommand];
    full.extend_from_slice(args);
    let (status, out, err) = Pinguard::spawn(&full).finish(timeout);
    Run {
        status,
        stdout: out.join("\n"),
        stderr: err.join("\n"),
    }
}
