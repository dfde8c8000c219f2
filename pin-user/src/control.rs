//! The daemon's control socket: how `pinguard latency` (or any root
//! program) tells a running `pinguard run` that its measuring threads on a
//! guarded CPU are there on purpose, so an enforcing daemon neither evicts
//! them nor counts them as intruders, and learns whether a daemon runs and
//! in which mode.
//!
//! A unix stream socket in the daemon's root-only runtime directory
//! (`/run/pinguard`, 0700, made by the run lock), mode 0600, and the
//! daemon checks the peer is root (`SO_PEERCRED`). One JSON object per line
//! each way. A registration lives as long as its connection: when the
//! client exits (however it exits) the kernel closes the socket and the
//! daemon drops what it registered, and the allowances of threads that exit
//! are dropped at the daemon's next prune. A registration names a process
//! (or one of its threads) by pid and start time, so a reused pid is never
//! allowed; the process must be the client itself or its child.
use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

/// Next to the run lock, in the directory only root may enter.
pub const CONTROL_SOCKET: &str = "/run/pinguard/control.sock";

/// Longest request line the daemon reads.
pub const MAX_LINE: usize = 4096;

/// How long a client waits for the daemon's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// One request, one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Who is there: the answer is the daemon's [`DaemonInfo`].
    Hello,
    /// Threads that may run on `cpu` for as long as this connection is open.
    Allow(Allow),
}

/// What a registration allows: thread `tid` of process `pid`, or with no
/// `tid` every thread of `pid`, and with `children` every thread of its
/// child processes too (a measuring program registers itself before it
/// starts cyclictest, so cyclictest's first slice on the CPU is covered).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Allow {
    pub pid: u32,
    #[serde(default)]
    pub tid: Option<u32>,
    /// Start time of `tid` (or of `pid`), clock ticks since boot (`stat` field 22).
    pub start_time: u64,
    pub cpu: u32,
    #[serde(default)]
    pub children: bool,
    /// Who asks, for the daemon's log: "pinguard latency".
    #[serde(default)]
    pub what: String,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub daemon: Option<DaemonInfo>,
}

/// A running daemon, as a latency report records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    /// "observe" or "enforce".
    pub mode: String,
    pub guarded: String,
    pub version: String,
    /// The measuring threads were registered with it: never evicted, never
    /// counted as intruders (set by the client once the daemon agreed).
    #[serde(default)]
    pub registered: bool,
}

impl DaemonInfo {
    /// "enforce (pid 1234), measurement registered".
    pub fn summary(&self) -> String {
        format!(
            "{} (pid {}){}",
            self.mode,
            self.pid,
            if self.registered {
                ", measurement registered"
            } else {
                ", measurement NOT registered"
            }
        )
    }
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("the pinguard daemon's control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the pinguard daemon's control socket {path}: unreadable answer {line:?}: {reason}")]
    BadReply {
        path: PathBuf,
        line: String,
        reason: String,
    },
    #[error("the pinguard daemon (pid {pid}) refused: {reason}")]
    Refused { pid: u32, reason: String },
}

/// A connection to the daemon; what it registered lasts until it is dropped.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub daemon: DaemonInfo,
}

impl Client {
    /// Connects to the daemon at `path`: `None` when no daemon runs (no
    /// socket, or a leftover nobody listens on).
    pub fn connect(path: &Path) -> Result<Option<Self>, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(io_err(e)),
        };
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(io_err)?;
        let writer = stream.try_clone().map_err(io_err)?;
        let mut client = Self {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            daemon: DaemonInfo {
                pid: 0,
                mode: String::new(),
                guarded: String::new(),
                version: String::new(),
                registered: false,
            },
        };
        client.daemon = client.request(&Request::Hello)?;
        Ok(Some(client))
    }

    /// Sends one request; the daemon's info on success.
    pub fn request(&mut self, req: &Request) -> Result<DaemonInfo, ControlError> {
        let io_err = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_string(req).expect("requests serialize");
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(io_err)?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer).map_err(io_err)?;
        let reply: Reply =
            serde_json::from_str(answer.trim()).map_err(|e| ControlError::BadReply {
                path: self.path.clone(),
                line: answer.trim().to_string(),
                reason: e.to_string(),
            })?;
        match (reply.ok, reply.daemon) {
            (true, Some(d)) => Ok(d),
            (_, d) => Err(ControlError::Refused {
                pid: d.map_or(self.daemon.pid, |d| d.pid),
                reason: reply.error.unwrap_or_else(|| "no reason given".to_string()),
            }),
        }
    }

    /// Registers threads on `cpu` (see [`Allow`]).
    pub fn allow(&mut self, allow: Allow) -> Result<(), ControlError> {
        self.daemon = self.request(&Request::Allow(allow))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each_with_their_op() {
        let r = Request::Allow(Allow {
            pid: 7,
            tid: Some(8),
            start_time: 99,
            cpu: 1,
            children: false,
            what: "pinguard latency".into(),
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"op":"allow","pid":7,"tid":8"#), "{s}");
        assert!(!s.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"hello"}"#).unwrap(),
            Request::Hello
        );
        // Only pid, start time and CPU are required.
        let min: Request =
            serde_json::from_str(r#"{"op":"allow","pid":7,"start_time":1,"cpu":1}"#).unwrap();
        assert!(matches!(
            min,
            Request::Allow(Allow {
                tid: None,
                children: false,
                ..
            })
        ));
        assert!(serde_json::from_str::<Request>(r#"{"op":"evict"}"#).is_err());
    }

    #[test]
    fn no_daemon_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            Client::connect(&dir.path().join("none.sock"))
                .unwrap()
                .is_none()
        );
        // A socket file nobody listens on (a daemon that died).
        let p = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert!(Client::connect(&p).unwrap().is_none());
    }

    #[test]
    fn a_refusal_carries_the_daemons_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let info = r#"{"pid":42,"mode":"enforce","guarded":"1","version":"0"}"#;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            writeln!(w, r#"{{"ok":true,"daemon":{info}}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            writeln!(
                w,
                r#"{{"ok":false,"error":"pid 9 is not yours","daemon":{info}}}"#
            )
            .unwrap();
        });
        let mut c = Client::connect(&p).unwrap().unwrap();
        assert_eq!((c.daemon.pid, c.daemon.mode.as_str()), (42, "enforce"));
        let e = c
            .allow(Allow {
                pid: 9,
                tid: None,
                start_time: 1,
                cpu: 1,
                children: true,
                what: String::new(),
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pid 42") && e.contains("pid 9 is not yours"),
            "{e}"
        );
        server.join().unwrap();
    }
}
