//! The guest agent client (qemu-guest-agent, "QGA"): runs programs inside a
//! guest (`guest-exec` / `guest-exec-status`) and reads its clock
//! (`guest-get-time`), over the agent's virtio-serial port
//! `org.qemu.guest_agent.0`.
//!
//! The agent is the guest's: anything inside the guest can answer on that
//! port. Every exchange has a whole-exchange deadline (a peer that trickles
//! bytes cannot stretch it), every message and all a session may send are
//! bounded, and replies are checked field by field.
//!
//! Two ways in: the unix socket QEMU serves the port on (plain QEMU,
//! `-chardev socket,...`), or, for a libvirt domain, libvirtd, which holds
//! that socket itself (`virsh qemu-agent-command`).
use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use thiserror::Error;

use super::qmp::{QmpError, connect_unix, io_reason, is_timeout};

/// One message: `guest-exec-status` carries up to 16 MiB of output per
/// stream (the agent's own cap), base64-encoded (4/3), stdout and stderr.
const MAX_AGENT_LINE: usize = 48 << 20;
/// All a session may receive (a peer that streams without end is dropped).
const MAX_AGENT_BYTES: usize = 256 << 20;
/// Bytes skipped while waiting for the sync delimiter.
const MAX_SYNC_JUNK: usize = 1 << 20;

/// Where the guest agent is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// The unix socket QEMU serves the agent's port on.
    Socket(PathBuf),
    /// A libvirt domain: libvirtd holds the socket (a second client would
    /// not be served), so commands go through `virsh qemu-agent-command`.
    Libvirt { domain: String, socket: PathBuf },
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(p) => write!(f, "unix socket {}", p.display()),
            Self::Libvirt { domain, socket } => write!(
                f,
                "libvirt domain {domain} (virsh qemu-agent-command; socket {})",
                socket.display()
            ),
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AgentError {
    #[error("cannot connect to the guest agent's socket: {0}")]
    Connect(String),
    #[error(
        "the guest agent did not answer {command} within {timeout:?} (is qemu-guest-agent \
         running in the guest, and is no other client connected to its socket?)"
    )]
    Timeout { command: String, timeout: Duration },
    #[error("the guest agent closed the connection")]
    Closed,
    #[error("the guest agent refused {command}: {desc}")]
    Rejected { command: String, desc: String },
    #[error("unexpected reply from the guest agent to {command}: {reply}")]
    BadReply { command: String, reply: String },
    #[error("the guest agent sent {0}")]
    TooLarge(String),
    #[error("{0}")]
    Io(String),
    #[error("virsh qemu-agent-command failed: {0}")]
    Virsh(String),
}

impl From<QmpError> for AgentError {
    fn from(e: QmpError) -> Self {
        match e {
            QmpError::Connect(s) => Self::Connect(s),
            QmpError::Timeout(timeout) => Self::Timeout {
                command: "connect".into(),
                timeout,
            },
            other => Self::Io(other.to_string()),
        }
    }
}

/// What a program run in the guest did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecResult {
    /// Its exit code, or the signal that ended it.
    pub exitcode: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The agent cut the output at its limit.
    pub truncated: bool,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exitcode == Some(0) && self.signal.is_none()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// "exit code 2" / "killed by signal 9".
    pub fn status(&self) -> String {
        match (self.exitcode, self.signal) {
            (_, Some(s)) => format!("killed by signal {s}"),
            (Some(c), None) => format!("exit code {c}"),
            (None, None) => "no exit status".into(),
        }
    }
}

/// A connection to one guest's agent.
pub struct Agent {
    addr: AgentAddr,
    /// The socket, once synchronised (None for libvirt, or after a failed
    /// exchange: the next call connects and synchronises again, so a late
    /// reply to a timed-out command is never taken for another's).
    stream: Option<Stream>,
    next_id: u64,
}

struct Stream {
    stream: UnixStream,
    pending: Vec<u8>,
    received: usize,
}

impl Agent {
    /// Connects (and for a socket, synchronises) within `timeout`.
    pub fn connect(addr: AgentAddr, timeout: Duration) -> Result<Self, AgentError> {
        let mut a = Self {
            addr,
            stream: None,
            next_id: std::process::id() as u64 * 1000,
        };
        a.ensure(timeout)?;
        Ok(a)
    }

    pub fn addr(&self) -> &AgentAddr {
        &self.addr
    }

    fn ensure(&mut self, timeout: Duration) -> Result<(), AgentError> {
        match &self.addr {
            AgentAddr::Libvirt { .. } => {
                self.call("guest-ping", json!({}), timeout)?;
                Ok(())
            }
            AgentAddr::Socket(path) => {
                if self.stream.is_some() {
                    return Ok(());
                }
                let path = path.clone();
                self.next_id += 1;
                let s = sync(&path, self.next_id, timeout)?;
                self.stream = Some(s);
                Ok(())
            }
        }
    }

    /// One command and its `return` value, all within `timeout`.
    pub fn call(
        &mut self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let deadline = Instant::now() + timeout;
        let msg = json!({ "execute": command, "arguments": args });
        let reply = match &self.addr {
            AgentAddr::Libvirt { domain, .. } => virsh_call(domain, &msg, timeout)?,
            AgentAddr::Socket(_) => {
                self.ensure(timeout)?;
                let Some(s) = self.stream.as_mut() else {
                    return Err(AgentError::Closed);
                };
                let r = s.exchange(&msg, deadline, command, timeout);
                if r.is_err() {
                    self.stream = None;
                }
                r?
            }
        };
        parse_reply(command, reply)
    }

    /// The guest's CLOCK_REALTIME in ns (`guest-get-time`; the agent reads
    /// it with microsecond resolution).
    pub fn get_time_ns(&mut self, timeout: Duration) -> Result<i64, AgentError> {
        let v = self.call("guest-get-time", json!({}), timeout)?;
        v.as_i64().ok_or_else(|| AgentError::BadReply {
            command: "guest-get-time".into(),
            reply: v.to_string(),
        })
    }

    /// Starts `path args...` in the guest with its output captured: the
    /// guest's pid.
    pub fn exec(
        &mut self,
        path: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<i64, AgentError> {
        let v = self.call(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
            timeout,
        )?;
        v.get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| AgentError::BadReply {
                command: "guest-exec".into(),
                reply: v.to_string(),
            })
    }

    /// None while it runs.
    pub fn exec_status(
        &mut self,
        pid: i64,
        timeout: Duration,
    ) -> Result<Option<ExecResult>, AgentError> {
        let v = self.call("guest-exec-status", json!({ "pid": pid }), timeout)?;
        parse_exec_status(&v)
    }

    /// Runs a short program to its end (polling every 20 ms), within `timeout`.
    pub fn run(
        &mut self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecResult, AgentError> {
        let deadline = Instant::now() + timeout;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let pid = self.exec(path, &args, timeout)?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout {
                    command: format!("{path} (guest pid {pid}) to exit"),
                    timeout,
                });
            }
            if let Some(r) = self.exec_status(pid, left)? {
                return Ok(r);
            }
            std::thread::sleep(Duration::from_millis(20).min(left));
        }
    }
}

/// Connects and synchronises: a 0xFF byte makes the agent drop any
/// half-read command, and `guest-sync-delimited` answers 0xFF followed by
/// `{"return": id}`, so whatever stale bytes come before are skipped.
fn sync(path: &Path, id: u64, timeout: Duration) -> Result<Stream, AgentError> {
    let deadline = Instant::now() + timeout;
    let stream = connect_unix(path, timeout)?;
    let mut s = Stream {
        stream,
        pending: Vec::new(),
        received: 0,
    };
    let command = "guest-sync-delimited";
    s.write(&[0xff], deadline, command, timeout)?;
    let msg = json!({ "execute": command, "arguments": { "id": id } });
    s.write(format!("{msg}\n").as_bytes(), deadline, command, timeout)?;
    loop {
        if let Some(at) = s.pending.iter().position(|&b| b == 0xff) {
            s.pending.drain(..=at);
            break;
        }
        if s.pending.len() > MAX_SYNC_JUNK {
            return Err(AgentError::TooLarge(format!(
                "more than {MAX_SYNC_JUNK} bytes before the sync delimiter"
            )));
        }
        s.fill(deadline, command, timeout)?;
    }
    loop {
        let line = s.read_line(deadline, command, timeout)?;
        // The echo of our own 0xFF, or a stale reply: not the sync.
        let Ok(v) = serde_json::from_str::<Value>(line.trim_matches(|c| c == '\u{fffd}')) else {
            continue;
        };
        if v.get("return").and_then(Value::as_u64) == Some(id) {
            return Ok(s);
        }
    }
}

impl Stream {
    fn write(
        &mut self,
        bytes: &[u8],
        deadline: Instant,
        command: &str,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let left = left(deadline, command, timeout)?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| AgentError::Io(io_reason(&e)))?;
        self.stream
            .write_all(bytes)
            .map_err(|e| io_error(&e, command, timeout))
    }

    fn fill(
        &mut self,
        deadline: Instant,
        command: &str,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        if self.received > MAX_AGENT_BYTES {
            return Err(AgentError::TooLarge(format!(
                "more than {MAX_AGENT_BYTES} bytes in one session"
            )));
        }
        let left = left(deadline, command, timeout)?;
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| AgentError::Io(io_reason(&e)))?;
        let mut chunk = vec![0u8; 64 << 10];
        let n = self
            .stream
            .read(&mut chunk)
            .map_err(|e| io_error(&e, command, timeout))?;
        if n == 0 {
            return Err(AgentError::Closed);
        }
        self.received += n;
        self.pending.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn read_line(
        &mut self,
        deadline: Instant,
        command: &str,
        timeout: Duration,
    ) -> Result<String, AgentError> {
        loop {
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim();
                if !line.is_empty() {
                    return Ok(line.to_string());
                }
            }
            if self.pending.len() > MAX_AGENT_LINE {
                return Err(AgentError::TooLarge(format!(
                    "a message longer than {MAX_AGENT_LINE} bytes"
                )));
            }
            self.fill(deadline, command, timeout)?;
        }
    }

    fn exchange(
        &mut self,
        msg: &Value,
        deadline: Instant,
        command: &str,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        self.write(format!("{msg}\n").as_bytes(), deadline, command, timeout)?;
        let line = self.read_line(deadline, command, timeout)?;
        serde_json::from_str(&line).map_err(|e| AgentError::BadReply {
            command: command.into(),
            reply: format!("invalid JSON ({e}): {}", shorten(&line)),
        })
    }
}

fn left(deadline: Instant, command: &str, timeout: Duration) -> Result<Duration, AgentError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(AgentError::Timeout {
            command: command.into(),
            timeout,
        })
    } else {
        Ok(left)
    }
}

fn io_error(e: &std::io::Error, command: &str, timeout: Duration) -> AgentError {
    if is_timeout(e) {
        AgentError::Timeout {
            command: command.into(),
            timeout,
        }
    } else {
        AgentError::Io(io_reason(e))
    }
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

/// `virsh qemu-agent-command DOMAIN JSON --timeout S`, bounded in time and size.
fn virsh_call(domain: &str, msg: &Value, timeout: Duration) -> Result<Value, AgentError> {
    let command = msg["execute"].as_str().unwrap_or("").to_string();
    let secs = timeout.as_secs().max(1).to_string();
    let mut child = Command::new("virsh")
        .args([
            "qemu-agent-command",
            domain,
            &msg.to_string(),
            "--timeout",
            &secs,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| AgentError::Virsh(format!("cannot run virsh: {e}")))?;
    let take = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = r {
                let _ = r.take(MAX_AGENT_LINE as u64 + 1).read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = take(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    let err = take(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    );
    // virsh's own --timeout covers the agent; this covers virsh and libvirtd.
    let deadline = Instant::now() + timeout + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .map_err(|e| AgentError::Virsh(e.to_string()))?
        {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(AgentError::Timeout { command, timeout });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        return Err(AgentError::Virsh(shorten(
            String::from_utf8_lossy(&err).trim(),
        )));
    }
    if out.len() > MAX_AGENT_LINE {
        return Err(AgentError::TooLarge(format!(
            "a message longer than {MAX_AGENT_LINE} bytes"
        )));
    }
    let text = String::from_utf8_lossy(&out);
    serde_json::from_str(text.trim()).map_err(|e| AgentError::BadReply {
        command,
        reply: format!("invalid JSON ({e}): {}", shorten(text.trim())),
    })
}

/// The `return` value of a reply, or its error.
fn parse_reply(command: &str, v: Value) -> Result<Value, AgentError> {
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    if let Some(e) = v.get("error") {
        return Err(AgentError::Rejected {
            command: command.into(),
            desc: e
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("no description")
                .to_string(),
        });
    }
    Err(AgentError::BadReply {
        command: command.into(),
        reply: shorten(&v.to_string()),
    })
}

/// `guest-exec-status`'s return: None while the program runs.
pub fn parse_exec_status(v: &Value) -> Result<Option<ExecResult>, AgentError> {
    let bad = || AgentError::BadReply {
        command: "guest-exec-status".into(),
        reply: shorten(&v.to_string()),
    };
    match v.get("exited").and_then(Value::as_bool) {
        Some(false) => return Ok(None),
        Some(true) => {}
        None => return Err(bad()),
    }
    let data = |k: &str| -> Result<Vec<u8>, AgentError> {
        match v.get(k) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => base64_decode(s).ok_or_else(bad),
            Some(_) => Err(bad()),
        }
    };
    Ok(Some(ExecResult {
        exitcode: v.get("exitcode").and_then(Value::as_i64),
        signal: v.get("signal").and_then(Value::as_i64),
        stdout: data("out-data")?,
        stderr: data("err-data")?,
        truncated: [v.get("out-truncated"), v.get("err-truncated")]
            .iter()
            .any(|t| t.and_then(Value::as_bool) == Some(true)),
    }))
}

/// Standard base64 (the agent's output encoding); None if it is not.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let body = bytes
        .iter()
        .rposition(|&c| c != b'=')
        .map_or(&bytes[..0], |end| &bytes[..=end]);
    if bytes.len() - body.len() > 2 || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        out.extend(&n.to_be_bytes()[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        os::unix::net::UnixListener,
    };

    use super::*;

    #[test]
    fn base64_round_trips_and_rejects_junk() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(base64_decode("aGk=\n").unwrap(), b"hi");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert!(base64_decode("a$==").is_none());
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("aGk====").is_none());
    }

    #[test]
    fn exec_status_is_checked_field_by_field() {
        assert_eq!(parse_exec_status(&json!({"exited": false})).unwrap(), None);
        let r = parse_exec_status(&json!({
            "exited": true, "exitcode": 0, "out-data": "aGVsbG8=", "err-data": "", "out-truncated": false
        }))
        .unwrap()
        .unwrap();
        assert!(r.success());
        assert_eq!(r.stdout_text(), "hello");
        let r = parse_exec_status(&json!({"exited": true, "signal": 9, "err-truncated": true}))
            .unwrap()
            .unwrap();
        assert!(!r.success() && r.truncated);
        assert_eq!(r.status(), "killed by signal 9");
        assert!(parse_exec_status(&json!({"pid": 3})).is_err());
        assert!(parse_exec_status(&json!({"exited": true, "out-data": 5})).is_err());
        assert!(parse_exec_status(&json!({"exited": true, "out-data": "!!"})).is_err());
    }

    /// A fake agent: stale bytes first, then the sync's delimiter and
    /// answer, then `answers` in order (None: never answer).
    fn fake_agent(path: &Path, answers: Vec<Option<&'static str>>) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            // The 0xFF byte, then the sync command.
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).unwrap();
            let text = String::from_utf8_lossy(&line);
            let start = text.find('{').unwrap();
            let req: Value = serde_json::from_str(text[start..].trim()).unwrap();
            assert_eq!(req["execute"], "guest-sync-delimited");
            let id = req["arguments"]["id"].clone();
            w.write_all(b"{\"return\": 1}\n").unwrap();
            w.write_all(&[0xff]).unwrap();
            w.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .unwrap();
            for a in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                match a {
                    Some(a) => w.write_all(a.as_bytes()).unwrap(),
                    None => std::thread::sleep(Duration::from_millis(500)),
                }
            }
        })
    }

    #[test]
    fn the_socket_client_syncs_and_bounds_each_exchange() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let server = fake_agent(
            &path,
            vec![
                Some("{\"return\": 1764672000123456000}\n"),
                Some("{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such file\"}}\n"),
                None,
            ],
        );
        let mut a =
            Agent::connect(AgentAddr::Socket(path.clone()), Duration::from_secs(2)).unwrap();
        assert_eq!(
            a.get_time_ns(Duration::from_secs(2)).unwrap(),
            1_764_672_000_123_456_000
        );
        let e = a
            .exec("nope", &[], Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused guest-exec: no such file"), "{e}");
        let t0 = Instant::now();
        let e = a.get_time_ns(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(1));
        server.join().unwrap();
    }

    #[test]
    fn a_peer_that_never_syncs_is_dropped_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // Junk without the delimiter, slowly.
            for _ in 0..20 {
                if s.write_all(b"{\"return\": 0}\n").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let t0 = Instant::now();
        let e = Agent::connect(AgentAddr::Socket(path), Duration::from_millis(150))
            .err()
            .unwrap();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(1));
        server.join().unwrap();
    }
}
