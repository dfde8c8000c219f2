//! The state file: every change, with its previous value, written *before*
//! the change is made, so `--undo` can restore it even if pinguard dies
//! half-way. It lives under `/run` (tmpfs): it survives a daemon restart but
//! not a reboot, and a reboot undoes every runtime change anyway; the boot id
//! in it tells a stale file from a live one.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Action, Change, IsolateError, Mechanism};
use crate::host::cpulist::CpuSet;

pub const DEFAULT_PATH: &str = "/run/pinguard/isolation.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub guarded: CpuSet,
    pub housekeeping: CpuSet,
    pub mechanism: Mechanism,
    /// `/proc/sys/kernel/random/boot_id` when it was written.
    pub boot_id: String,
    /// In the order they were applied; undone in reverse.
    pub changes: Vec<Change>,
}

impl State {
    pub fn new(
        guarded: CpuSet,
        housekeeping: CpuSet,
        mechanism: Mechanism,
        boot_id: String,
    ) -> Self {
        Self {
            version: VERSION,
            guarded,
            housekeeping,
            mechanism,
            boot_id,
            changes: Vec::new(),
        }
    }
}

/// What a change is about, for [`State::compact`]: one file, cgroup or thread.
fn subject(c: &Change) -> String {
    match &c.action {
        Action::Write { path, .. } | Action::Mkdir { path, .. } => {
            format!("path {}", path.display())
        }
        Action::EnableController { path, controller } => {
            format!("controller {controller} {}", path.display())
        }
        Action::MoveTask { thread, .. } => format!("cpuset {}@{}", thread.tid, thread.start_time),
        Action::Affinity { thread, .. } => {
            format!("affinity {}@{}", thread.tid, thread.start_time)
        }
    }
}

impl State {
    /// Keeps only the first change to each file, cgroup and thread: it holds
    /// the value from before the isolation. The daemon re-applies a value
    /// something changed back (a repair records what it found); undoing in
    /// reverse order would end on the first change's value anyway, so the
    /// later ones only make the file grow with every repair.
    pub fn compact(&mut self) {
        let mut seen = std::collections::HashSet::new();
        self.changes.retain(|c| seen.insert(subject(c)));
    }
}

/// Where the state file is, and this boot's id.
#[derive(Debug, Clone)]
pub struct Store {
    pub path: PathBuf,
    pub boot_id: String,
}

fn err(path: &Path, reason: impl Into<String>) -> IsolateError {
    IsolateError::State {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Store {
    pub fn new(path: PathBuf, proc: &Path) -> Self {
        let boot_id = fs::read_to_string(proc.join("sys/kernel/random/boot_id"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Self { path, boot_id }
    }

    /// The state of this boot, if any. A file from an earlier boot is
    /// reported as stale (nothing of it is still applied) and ignored.
    pub fn load(&self) -> Result<Option<State>, IsolateError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(&self.path, e.to_string())),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| {
            err(
                &self.path,
                format!("unreadable ({e}); move it away to start over"),
            )
        })?;
        if state.version != VERSION {
            return Err(err(
                &self.path,
                format!("version {} (this pinguard writes {VERSION})", state.version),
            ));
        }
        if state.boot_id != self.boot_id {
            log::warn!(
                "{}: written before the last reboot, which undid its changes; ignoring it",
                self.path.display()
            );
            return Ok(None);
        }
        Ok(Some(state))
    }

    /// Replaces the file atomically (write a sibling, rename).
    pub fn save(&self, state: &State) -> Result<(), IsolateError> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| err(&self.path, e.to_string()))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(state).map_err(|e| err(&self.path, e.to_string()))?;
        fs::write(&tmp, text).map_err(|e| err(&tmp, e.to_string()))?;
        fs::rename(&tmp, &self.path).map_err(|e| err(&self.path, e.to_string()))
    }

    pub fn remove(&self) -> Result<(), IsolateError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(&self.path, e.to_string())),
        }
    }
}
