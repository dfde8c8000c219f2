//! Child processes whose output is read line by line as it comes: the
//! pinguard binary under test, and the loads and tools a benchmark starts.
use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

use crate::{
    env::pinguard_bin,
    error::{Error, OrPanic as _, Result},
    wait,
};

/// How long Drop lets a process exit on SIGTERM before it sends SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(5);
/// Lines of stderr that error messages show.
const TAIL: usize = 15;

/// A running child with piped stdout and stderr, each drained by a thread
/// (the child never blocks on a full pipe). Dropping it while it runs sends
/// SIGTERM, then SIGKILL after a grace period, and reaps it.
pub struct Process {
    child: Option<Child>,
    command: String,
    /// In a process group of its own: signals go to the whole group.
    group: bool,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Lines read so far by the `wait_*` methods (and [`Process::stderr_tail`]).
    pub stdout_seen: Vec<String>,
    pub stderr_seen: Vec<String>,
}

/// What a finished process printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Process {
    /// Starts `cmd` (stdin from /dev/null) in the caller's process group: a
    /// Ctrl-C on a test run reaches it too, so it does not outlive the test.
    pub fn try_spawn(cmd: &mut Command) -> Result<Self> {
        Self::start(cmd, false)
    }

    /// Starts `cmd` in a process group of its own: a Ctrl-C at the terminal
    /// reaches only the caller, which stops it in order, and Drop stops the
    /// whole group (tools like perf and stress-ng fork workers).
    pub fn try_spawn_group(cmd: &mut Command) -> Result<Self> {
        Self::start(cmd, true)
    }

    /// Starts the pinguard binary under test with `args`; panics if it cannot.
    pub fn pinguard(args: &[&str]) -> Self {
        Self::try_spawn(Command::new(pinguard_bin()).args(args)).or_panic()
    }

    fn start(cmd: &mut Command, group: bool) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if group {
            cmd.process_group(0);
        }
        let command = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("could not start `{command}`"), e))?;
        let stdout = lines(child.stdout.take().expect("stdout is piped"));
        let stderr = lines(child.stderr.take().expect("stderr is piped"));
        Ok(Self {
            child: Some(child),
            command,
            group,
            stdout,
            stderr,
            stdout_seen: Vec::new(),
            stderr_seen: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Sends `sig` to the process (to its group, if it has its own).
    pub fn signal(&self, sig: Signal) {
        let Some(child) = &self.child else { return };
        // Not once reaped: its pid (and group id) may belong to someone else.
        let pid = Pid::from_raw(child.id() as i32);
        let _ = if self.group {
            signal::killpg(pid, sig)
        } else {
            signal::kill(pid, sig)
        };
    }

    /// Waits (bounded) for a stderr line for which `want` holds.
    pub fn try_wait_stderr(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Result<String> {
        self.wait_line(Stream::Stderr, what, timeout, want)
    }

    /// Waits (bounded) for a stdout line for which `want` holds.
    pub fn try_wait_stdout(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Result<String> {
        self.wait_line(Stream::Stdout, what, timeout, want)
    }

    /// Waits for a stderr line containing `needle` (e.g. the "watching" banner
    /// printed once the programs are attached); panics after `timeout`.
    #[track_caller]
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        self.try_wait_stderr(&format!("{needle:?}"), timeout, |l| l.contains(needle))
            .or_panic()
    }

    /// Waits for a stdout line for which `pred` holds; panics after `timeout`.
    #[track_caller]
    pub fn wait_stdout(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        self.try_wait_stdout(what, timeout, pred).or_panic()
    }

    fn wait_line(
        &mut self,
        stream: Stream,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            wait::check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            let (rx, seen) = match stream {
                Stream::Stdout => (&self.stdout, &mut self.stdout_seen),
                Stream::Stderr => (&self.stderr, &mut self.stderr_seen),
            };
            // Short slices, so that an interrupt is seen.
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    seen.push(line.clone());
                    if want(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout {
                        what: format!("`{}` to print {what} on {}", self.command, stream.name()),
                        timeout,
                        detail: self.stderr_tail(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // EOF: the process closed the stream, normally by exiting.
                    let status = self.reap(DROP_GRACE);
                    let detail = self.stderr_tail();
                    return Err(match status {
                        Some(status) => Error::Exited {
                            command: self.command.clone(),
                            status,
                            when: format!("before printing {what} on {}", stream.name()),
                            detail,
                        },
                        None => Error::Timeout {
                            what: format!(
                                "`{}` to print {what} on {} (it closed that stream)",
                                self.command,
                                stream.name()
                            ),
                            timeout,
                            detail,
                        },
                    });
                }
            }
        }
    }

    /// Everything printed on stderr so far (reads what is available now).
    pub fn stderr_lines(&mut self) -> &[String] {
        self.stderr_seen.extend(self.stderr.try_iter());
        &self.stderr_seen
    }

    /// The last few lines of [`Process::stderr_lines`] as
    /// "; its stderr:\n  ...", or "" when there are none.
    pub fn stderr_tail(&mut self) -> String {
        let lines = self.stderr_lines();
        let tail = &lines[lines.len().saturating_sub(TAIL)..];
        if tail.is_empty() {
            return String::new();
        }
        format!("; its stderr:\n  {}", tail.join("\n  "))
    }

    /// Waits up to `timeout` for the process to exit; its status once it did.
    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) for the process to exit and collects everything it
    /// printed. On timeout it is still running (and Drop stops it).
    pub fn try_finish(mut self, timeout: Duration) -> Result<Output> {
        let Some(status) = self.reap(timeout) else {
            return Err(Error::Timeout {
                what: format!("`{}` to exit", self.command),
                timeout,
                detail: self.stderr_tail(),
            });
        };
        // The readers end at EOF, normally right after the exit; a grandchild
        // that inherited a pipe could hold it open, so this wait is bounded too.
        let deadline = Instant::now() + DROP_GRACE;
        let rest = |rx: &mpsc::Receiver<String>, seen: &mut Vec<String>| {
            while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                seen.push(line);
            }
            std::mem::take(seen)
        };
        let stdout = rest(&self.stdout, &mut self.stdout_seen);
        let stderr = rest(&self.stderr, &mut self.stderr_seen);
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Sends SIGTERM and expects a clean exit (status 0) within `timeout`.
    pub fn try_terminate(self, timeout: Duration) -> Result<Output> {
        self.signal(Signal::SIGTERM);
        let command = self.command.clone();
        let out = self.try_finish(timeout)?;
        if !out.status.success() {
            let tail = &out.stderr[out.stderr.len().saturating_sub(TAIL)..];
            return Err(Error::Exited {
                command,
                status: out.status,
                when: "on SIGTERM".into(),
                detail: format!("; its stderr:\n  {}", tail.join("\n  ")),
            });
        }
        Ok(out)
    }

    /// Waits for exit and collects the output; panics after `timeout`.
    #[track_caller]
    pub fn finish(self, timeout: Duration) -> Output {
        self.try_finish(timeout).or_panic()
    }

    /// Sends SIGINT (Ctrl-C) and collects everything printed until exit.
    #[track_caller]
    pub fn stop(self, timeout: Duration) -> Output {
        self.signal(Signal::SIGINT);
        self.finish(timeout)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        // While the child is not reaped its pid, and so its group id, cannot
        // have been reused.
        self.signal(Signal::SIGTERM);
        if self.reap(DROP_GRACE).is_none() {
            self.signal(Signal::SIGKILL);
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
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

/// A finished pinguard run.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Self {
            status: out.status,
            stdout: out.stdout.join("\n"),
            stderr: out.stderr.join("\n"),
        }
    }
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, with both streams, unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
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

/// Runs a tool to completion: whether it succeeded, and its stdout and
/// stderr together (what a failing check prints goes in the assertion).
#[track_caller]
pub fn succeeds(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `pinguard ARGS...` to completion within `timeout`.
#[track_caller]
pub fn run(args: &[&str], timeout: Duration) -> Run {
    Process::pinguard(args).finish(timeout).into()
}

/// Runs `pinguard SUBCOMMAND ARGS...` to completion within `timeout`.
#[track_caller]
pub fn run_subcommand(subcommand: &str, args: &[&str], timeout: Duration) -> Run {
    let mut full = vec![subcommand];
    full.extend_from_slice(args);
    run(&full, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn waits_for_lines_and_collects_the_rest() {
        let mut p = Process::try_spawn(&mut sh("echo a; echo b >&2; echo c; exit 3")).unwrap();
        assert_eq!(
            p.try_wait_stdout("c", Duration::from_secs(10), |l| l == "c")
                .unwrap(),
            "c"
        );
        let out = p.try_finish(Duration::from_secs(10)).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, ["a", "c"]);
        assert_eq!(out.stderr, ["b"]);
    }

    #[test]
    fn an_exit_before_the_line_is_an_error_with_the_stderr() {
        let mut p = Process::try_spawn_group(&mut sh("echo oops >&2; exit 1")).unwrap();
        let e = p
            .try_wait_stderr("\"ready\"", Duration::from_secs(10), |l| l == "ready")
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("before printing \"ready\" on stderr"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn timeouts_and_terminate() {
        let mut p = Process::try_spawn_group(&mut sh("echo up >&2; exec sleep 30")).unwrap();
        let e = p
            .try_wait_stdout("anything", Duration::from_millis(100), |_| true)
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        // sleep dies of SIGTERM: not a clean exit.
        let e = p.try_terminate(Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("on SIGTERM"), "{e}");
    }

    #[test]
    fn drop_stops_a_running_process() {
        let p = Process::try_spawn(&mut sh("exec sleep 30")).unwrap();
        let pid = p.pid();
        drop(p);
        assert!(!crate::host::is_alive(pid));
    }
}
