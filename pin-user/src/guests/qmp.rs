//! The QMP client: one short session per question (connect, greeting,
//! `qmp_capabilities`, one command, close), every step bounded by a timeout
//! because QEMU serves one QMP client at a time and a busy monitor never answers.
use std::{
    io::{self, Read, Write},
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket},
};
use serde_json::Value;
use thiserror::Error;

use super::Vcpu;

/// Bound on one whole QMP exchange (connect, greeting, two commands).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// A QMP reply larger than this is not something pinguard asked for.
const MAX_QMP_LINE: usize = 1 << 20;
/// All a peer may send in one session (events included): a socket that
/// streams without end is dropped, not read until the deadline.
const MAX_QMP_BYTES: usize = 4 << 20;
/// The longest socket path a `sockaddr_un` holds on Linux (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Talking to a QMP monitor failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QmpError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error(
        "no answer within {0:?}: QEMU serves one QMP client at a time, is another client \
         (libvirt, a script) connected to this socket?"
    )]
    Timeout(Duration),
    #[error("QEMU closed the connection")]
    Closed,
    #[error(
        "not a QMP monitor (it said {0:?}): give a -qmp or -mon mode=control socket, not a -monitor (HMP) one"
    )]
    NotQmp(String),
    #[error("QEMU rejected {command}: {desc}")]
    Rejected { command: String, desc: String },
    #[error("unexpected reply from QEMU: {0}")]
    BadReply(String),
    #[error("{0}")]
    Io(String),
    #[error("QEMU reported no vCPUs")]
    NoVcpus,
    #[error(
        "vCPU thread {tid} reported by QEMU is not visible in /proc (is QEMU in another PID namespace?)"
    )]
    NotVisible { tid: u32 },
    #[error("QEMU reported vCPU threads of different processes ({first} and {other})")]
    MixedProcesses { first: u32, other: u32 },
}

/// "Permission denied" rather than "Permission denied (os error 13)".
pub(super) fn io_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connects with a bound on the wait: connect(2) on a unix socket blocks
/// while the listener's backlog is full (QEMU listens with a backlog of 1
/// and serves one client at a time), for at most SO_SNDTIMEO, which
/// `UnixStream::connect` gives no way to set beforehand.
pub(super) fn connect_unix(path: &Path, timeout: Duration) -> Result<UnixStream, QmpError> {
    let addr = UnixAddr::new(path).map_err(|e| {
        QmpError::Connect(match e {
            Errno::ENAMETOOLONG => format!(
                "the path is longer than the {MAX_SOCKET_PATH} bytes a unix socket address holds"
            ),
            Errno::EINVAL => "the path contains a NUL byte".to_string(),
            e => e.desc().to_string(),
        })
    })?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| QmpError::Connect(e.desc().to_string()))?;
    let stream = UnixStream::from(fd);
    let io_err = |e: io::Error| QmpError::Io(io_reason(&e));
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    match connect(stream.as_raw_fd(), &addr) {
        Ok(()) => Ok(stream),
        Err(Errno::EAGAIN | Errno::ETIMEDOUT) => Err(QmpError::Timeout(timeout)),
        Err(e) => Err(QmpError::Connect(e.desc().to_string())),
    }
}

/// One short QMP session. Every read is bounded by what is left of the
/// whole session's deadline, not by a per-`recv` timeout: a peer that
/// trickles a byte now and then cannot stretch the exchange.
struct QmpSession {
    stream: UnixStream,
    /// Bytes received and not yet returned as a line.
    pending: Vec<u8>,
    /// Bytes received in this session.
    received: usize,
    deadline: Instant,
    timeout: Duration,
}

impl QmpSession {
    fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = connect_unix(path, timeout)?;
        let mut s = Self {
            stream,
            pending: Vec::new(),
            received: 0,
            deadline,
            timeout,
        };
        let line = s.read_line()?;
        let greeting: Option<Value> = serde_json::from_str(&line).ok();
        if greeting.as_ref().and_then(|g| g.get("QMP")).is_none() {
            let mut shown: String = line.chars().take(60).collect();
            if shown.len() < line.len() {
                shown.push_str("...");
            }
            return Err(QmpError::NotQmp(shown));
        }
        Ok(s)
    }

    fn read_line(&mut self) -> Result<String, QmpError> {
        loop {
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim();
                if !line.is_empty() {
                    return Ok(line.to_string());
                }
            }
            if self.pending.len() > MAX_QMP_LINE {
                return Err(QmpError::BadReply(format!(
                    "a message longer than {MAX_QMP_LINE} bytes"
                )));
            }
            if self.received > MAX_QMP_BYTES {
                return Err(QmpError::BadReply(format!(
                    "more than {MAX_QMP_BYTES} bytes in one session"
                )));
            }
            let left = self.left()?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| QmpError::Io(io_reason(&e)))?;
            let mut chunk = [0u8; 8192];
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| self.io_error(&e))?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.received += n;
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// What is left of the session's deadline, or a timeout.
    fn left(&self) -> Result<Duration, QmpError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(QmpError::Timeout(self.timeout))
        } else {
            Ok(left)
        }
    }

    fn io_error(&self, e: &io::Error) -> QmpError {
        if is_timeout(e) {
            QmpError::Timeout(self.timeout)
        } else {
            QmpError::Io(io_reason(e))
        }
    }

    /// The next message that is not an asynchronous event.
    fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            let line = self.read_line()?;
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| QmpError::BadReply(format!("invalid JSON ({e}): {line}")))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let id = format!("pinguard-{command}");
        let msg = serde_json::json!({ "execute": command, "id": id });
        let mut line = msg.to_string();
        line.push('\n');
        let left = self.left()?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| QmpError::Io(io_reason(&e)))?;
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| self.io_error(&e))?;
        loop {
            let v = self.read_message()?;
            match v.get("id") {
                Some(got) if got != id.as_str() => continue,
                _ => {}
            }
            return parse_reply(command, v);
        }
    }
}

/// The `return` value of a QMP reply, or its error.
fn parse_reply(command: &str, v: Value) -> Result<Value, QmpError> {
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    if let Some(e) = v.get("error") {
        let desc = e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("no description")
            .to_string();
        return Err(QmpError::Rejected {
            command: command.to_string(),
            desc,
        });
    }
    Err(QmpError::BadReply(v.to_string()))
}

/// Parses the `return` of `query-cpus-fast`:
/// `[{"cpu-index": 0, "thread-id": 1234, ...}, ...]`.
pub fn parse_cpus_fast(ret: &Value) -> Result<Vec<Vcpu>, QmpError> {
    let list = ret
        .as_array()
        .ok_or_else(|| QmpError::BadReply(format!("query-cpus-fast returned {ret}")))?;
    let mut vcpus = Vec::with_capacity(list.len());
    for cpu in list {
        let field = |k: &str| {
            cpu.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    QmpError::BadReply(format!("query-cpus-fast entry without {k}: {cpu}"))
                })
        };
        vcpus.push(Vcpu {
            index: field("cpu-index")?,
            tid: field("thread-id")?,
        });
    }
    if vcpus.is_empty() {
        return Err(QmpError::NoVcpus);
    }
    vcpus.sort();
    Ok(vcpus)
}

/// Asks a QEMU monitor which thread runs each vCPU: connect, query, close
/// (QEMU 7.2 serves one QMP client at a time, so the socket is not held).
pub fn query_cpus_fast(path: &Path, timeout: Duration) -> Result<Vec<Vcpu>, QmpError> {
    let mut s = QmpSession::connect(path, timeout)?;
    s.execute("qmp_capabilities")?;
    let ret = s.execute("query-cpus-fast")?;
    parse_cpus_fast(&ret)
}

/// Whether the guest's vCPUs run under KVM (`query-kvm`'s `enabled`);
/// false means TCG (emulation).
pub fn query_kvm_enabled(path: &Path, timeout: Duration) -> Result<bool, QmpError> {
    let mut s = QmpSession::connect(path, timeout)?;
    s.execute("qmp_capabilities")?;
    let ret = s.execute("query-kvm")?;
    ret.get("enabled")
        .and_then(Value::as_bool)
        .ok_or_else(|| QmpError::BadReply(format!("query-kvm returned {ret}")))
}

/// A fake QEMU monitor for the tests here and in the discovery tests.
#[cfg(test)]
pub(super) mod fake {
    use std::{
        io::{BufRead, BufReader, Write},
        os::unix::net::UnixListener,
        path::Path,
    };

    use serde_json::Value;

    /// Serves one client: greeting, an event before each reply, and
    /// `query-cpus-fast` answering `vcpus`.
    pub fn serve(
        path: &Path,
        vcpus: Vec<(u32, u32)>,
        greeting: &'static str,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            w.write_all(greeting.as_bytes()).unwrap();
            let reader = BufReader::new(stream);
            for line in reader.lines() {
                let Ok(line) = line else { return };
                let req: Value = serde_json::from_str(&line).unwrap();
                let id = req["id"].clone();
                w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n")
                    .unwrap();
                let ret = match req["execute"].as_str().unwrap() {
                    "qmp_capabilities" => serde_json::json!({}),
                    "query-cpus-fast" => Value::Array(
                        vcpus
                            .iter()
                            .map(|(i, t)| serde_json::json!({"cpu-index": i, "thread-id": t, "target": "x86_64"}))
                            .collect(),
                    ),
                    _ => Value::Null,
                };
                let reply = serde_json::json!({"return": ret, "id": id});
                w.write_all(format!("{reply}\r\n").as_bytes()).unwrap();
            }
        })
    }

    pub const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": [\"oob\"]}}\r\n";
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::{
        fake::{GREETING, serve as fake_qmp},
        *,
    };

    #[test]
    fn cpus_fast_replies() {
        let ret: Value = serde_json::from_str(
            r#"[{"thread-id": 14293, "props": {"core-id": 1, "thread-id": 0, "socket-id": 0},
                 "qom-path": "/machine/unattached/device[2]", "cpu-index": 1, "target": "x86_64"},
                {"thread-id": 14292, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
                 "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_cpus_fast(&ret).unwrap(),
            vec![
                Vcpu {
                    index: 0,
                    tid: 14292
                },
                Vcpu {
                    index: 1,
                    tid: 14293
                }
            ]
        );
        assert_eq!(
            parse_cpus_fast(&serde_json::json!([])),
            Err(QmpError::NoVcpus)
        );
        assert!(matches!(
            parse_cpus_fast(&serde_json::json!([{"cpu-index": 0}])),
            Err(QmpError::BadReply(m)) if m.contains("thread-id")
        ));
        assert!(matches!(
            parse_reply("query-cpus-fast", serde_json::json!({"error": {"class": "CommandNotFound", "desc": "nope"}})),
            Err(QmpError::Rejected { desc, .. }) if desc == "nope"
        ));
    }

    #[test]
    fn qmp_client_against_fake_monitor() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qmp(&sock, vec![(1, 101), (0, 100)], GREETING);
        let vcpus = query_cpus_fast(&sock, QMP_TIMEOUT).unwrap();
        assert_eq!(
            vcpus,
            vec![Vcpu { index: 0, tid: 100 }, Vcpu { index: 1, tid: 101 }]
        );
        server.join().unwrap();

        // An HMP monitor is recognised as such.
        let hmp = dir.path().join("hmp.sock");
        let server = fake_qmp(
            &hmp,
            vec![],
            "QEMU 7.2.0 monitor - type 'help' for more information\r\n",
        );
        let err = query_cpus_fast(&hmp, QMP_TIMEOUT).unwrap_err();
        assert!(matches!(err, QmpError::NotQmp(_)), "{err}");
        assert!(err.to_string().contains("-monitor"), "{err}");
        server.join().unwrap();

        // A silent monitor (another client holds it) times out, boundedly.
        let busy = dir.path().join("busy.sock");
        let _listener = UnixListener::bind(&busy).unwrap();
        let err = query_cpus_fast(&busy, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err, QmpError::Timeout(Duration::from_millis(200)));

        let err = query_cpus_fast(&dir.path().join("missing.sock"), QMP_TIMEOUT).unwrap_err();
        assert_eq!(err.to_string(), "cannot connect: No such file or directory");
        let long = dir.path().join("x".repeat(200));
        assert!(matches!(
            query_cpus_fast(&long, QMP_TIMEOUT),
            Err(QmpError::Connect(_))
        ));
    }

    /// QEMU listens with a backlog of 1 and serves one client at a time: with
    /// the queue full, connect(2) itself blocks and must give up in time.
    #[test]
    fn connect_gives_up_on_a_full_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        nix::sys::socket::bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(0).unwrap()).unwrap();
        // Fill the queue (how many fit before it is full differs between kernels).
        let short = Duration::from_millis(100);
        let mut queued = Vec::new();
        let err = loop {
            match connect_unix(&path, short) {
                Ok(s) => queued.push(s),
                Err(e) => break e,
            }
            assert!(
                queued.len() < 8,
                "a backlog of 0 accepted {} connections",
                queued.len()
            );
        };
        assert_eq!(err, QmpError::Timeout(short));
        let start = Instant::now();
        let err = query_cpus_fast(&path, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err, QmpError::Timeout(Duration::from_millis(200)));
        assert!(start.elapsed() < QMP_TIMEOUT, "took {:?}", start.elapsed());
    }

    /// A peer that sends a byte now and then never ends a line: the whole
    /// session still ends at its deadline (it used to restart at every byte).
    #[test]
    fn a_trickling_peer_cannot_stretch_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trickle.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for _ in 0..40 {
                if s.write_all(b"{").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // The peer trickles for 2 s, then closes: a per-`recv` timeout reads
        // on until then and fails with `Closed`; the session's deadline ends it first.
        let timeout = Duration::from_millis(300);
        let err = query_cpus_fast(&path, timeout).unwrap_err();
        assert_eq!(err, QmpError::Timeout(timeout));
        server.join().unwrap();
    }

    /// A peer that streams without end is dropped once it sent the session's budget.
    #[test]
    fn a_streaming_peer_is_cut_off_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flood.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(GREETING.as_bytes());
            let event = b"{\"event\": \"X\"}\n".repeat(4096);
            while s.write_all(&event).is_ok() {}
        });
        let err = query_cpus_fast(&path, Duration::from_secs(20)).unwrap_err();
        assert!(
            matches!(&err, QmpError::BadReply(m) if m.contains("bytes in one session")),
            "{err:?}"
        );
        server.join().unwrap();
    }
}
