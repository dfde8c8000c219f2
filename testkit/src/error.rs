//! What can go wrong while driving the host: the fallible (`try_`) half of
//! the kit returns these; the panicking half used by tests panics with their
//! message.
use std::{process::ExitStatus, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bounded wait ran out. `detail` says what was last seen (a log, a
    /// status), or is empty.
    #[error("timed out after {timeout:?} waiting for {what}{detail}")]
    Timeout {
        what: String,
        timeout: Duration,
        detail: String,
    },
    /// [`crate::wait::interrupt`] was called (the benchmark's Ctrl-C).
    #[error("interrupted")]
    Interrupted,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    /// A child process ended when it should still run, or ended badly.
    #[error("`{command}` ended ({status}) {when}{detail}")]
    Exited {
        command: String,
        status: ExitStatus,
        when: String,
        /// The tail of its output, or empty.
        detail: String,
    },
    #[error("GET {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("/metrics is not a Prometheus exposition: {detail}")]
    Exposition { detail: String },
    #[error("QMP {socket}: {detail}")]
    Qmp { socket: String, detail: String },
    #[error("cannot read {text:?} as a CPU list")]
    CpuList { text: String },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn sys(what: impl Into<String>, source: nix::Error) -> Self {
        Self::Sys {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Unwraps for the panicking API: the panic message is the error's.
pub(crate) trait OrPanic<T> {
    fn or_panic(self) -> T;
}

impl<T> OrPanic<T> for Result<T> {
    #[track_caller]
    fn or_panic(self) -> T {
        self.unwrap_or_else(|e| panic!("{e}"))
    }
}
