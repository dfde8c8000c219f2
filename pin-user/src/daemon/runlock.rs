//! One `pinguard run` per host: two daemons would fight over every thread
//! (each re-pinning what the other moved). The lock is an `flock` on a
//! root-only file that also names the holder; the kernel drops it when the
//! holder exits, however it exits, so a crash leaves no stale lock.
use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use thiserror::Error;

/// In a directory of its own, which systemd creates (`RuntimeDirectory=`)
/// where `ProtectSystem=strict` makes the rest of /run read-only.
pub const RUN_LOCK: &str = "/run/pinguard/pinguard.lock";

#[derive(Debug, Error)]
pub enum RunLockError {
    #[error(
        "another `pinguard run` is running on this host ({holder}; lock {path}): stop it first \
         (two daemons would fight over every thread). `watch`, `audit` and `latency` work beside it"
    )]
    Held { path: PathBuf, holder: String },
    #[error("cannot take the lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Held for the daemon's lifetime.
#[derive(Debug)]
pub struct RunLock(#[allow(dead_code)] Flock<File>);

impl RunLock {
    pub fn acquire(path: &Path) -> Result<Self, RunLockError> {
        let io_err = |source| RunLockError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "pid unknown".into(),
                };
                return Err(RunLockError::Held {
                    path: path.to_owned(),
                    holder,
                });
            }
            Err((_, e)) => return Err(io_err(e.into())),
        };
        lock.set_len(0).map_err(io_err)?;
        lock.rewind().map_err(io_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err)?;
        Ok(Self(lock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/pinguard.lock");
        let first = RunLock::acquire(&path).unwrap();
        let err = RunLock::acquire(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("stop it first"),
            "{err}"
        );
        drop(first);
        RunLock::acquire(&path).expect("free again once the holder is gone");
    }
}
