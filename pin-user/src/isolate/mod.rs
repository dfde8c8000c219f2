//! Isolation without a reboot (`pinguard isolate`): everything the running
//! kernel lets change at runtime to keep the guarded CPUs quiet, verified by
//! reading it back, recorded so `--undo` restores exactly what was changed.
//!
//! - [`facts`] reads the host (IRQs, workqueues, sysctls, cgroups, threads)
//!   through a [`Host`](crate::host::Host) root;
//! - [`plan`] is pure: facts in, a list of [`Change`]s (what, where, before,
//!   after, why) and what cannot change at runtime out;
//! - [`apply`] is the edge that changes the host: it records each change in
//!   the [`state`] file *before* making it, reads it back, rolls back on a
//!   failure, and undoes from the state file.
//!
//! Three ways to keep tasks off the guarded CPUs, best first: a cgroup v2
//! cpuset partition `isolated`, a cgroup v1 cpuset shield (every movable task
//! in a housekeeping cpuset), thread affinities (as tuna does).
use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::host::{cpulist::CpuSet, topology::TopologyError};

pub mod apply;
pub mod facts;
pub mod plan;
pub mod render;
pub mod state;

/// How tasks are kept off the guarded CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// A cgroup v2 cpuset partition (`cpuset.cpus.partition = isolated`).
    Partition,
    /// cgroup v1 cpusets: a housekeeping set holding every movable task and
    /// a guarded set for the vCPUs.
    Shield,
    /// Every thread that allows it gets an affinity without the guarded CPUs.
    Affinity,
}

impl Mechanism {
    /// Its name in JSON and in metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Self::Partition => "partition",
            Self::Shield => "shield",
            Self::Affinity => "affinity",
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Partition => "cgroup v2 cpuset partition",
            Self::Shield => "cgroup v1 cpuset shield",
            Self::Affinity => "thread affinities",
        })
    }
}

/// What a change is about (one enum, matched exhaustively by the renderers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    Sysctl,
    Workqueue,
    DefaultIrqAffinity,
    Irq,
    Cgroup,
    Task,
    Thread,
}

impl What {
    pub const ALL: [Self; 7] = [
        Self::Sysctl,
        Self::Workqueue,
        Self::DefaultIrqAffinity,
        Self::Irq,
        Self::Cgroup,
        Self::Task,
        Self::Thread,
    ];

    /// Its name in JSON and in metric labels (`pinguard_isolation_repairs_total{what}`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Sysctl => "sysctl",
            Self::Workqueue => "workqueue",
            Self::DefaultIrqAffinity => "default_irq_affinity",
            Self::Irq => "irq",
            Self::Cgroup => "cgroup",
            Self::Task => "task",
            Self::Thread => "thread",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sysctl => "sysctl",
            Self::Workqueue => "workqueue",
            Self::DefaultIrqAffinity => "irq default",
            Self::Irq => "irq",
            Self::Cgroup => "cgroup",
            Self::Task => "task",
            Self::Thread => "thread",
        }
    }
}

/// How a kernel file's value is compared when read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// The trimmed text.
    Text,
    /// A hex cpumask (`smp_affinity`, workqueue `cpumask`): "3" and "00000003" are equal.
    Mask,
    /// A CPU list (`cpuset.cpus`).
    List,
}

impl Compare {
    pub fn same(self, a: &str, b: &str) -> bool {
        match self {
            Self::Text => a.trim() == b.trim(),
            Self::Mask => match (CpuSet::parse_mask(a), CpuSet::parse_mask(b)) {
                (Ok(x), Ok(y)) => x == y,
                _ => a.trim() == b.trim(),
            },
            Self::List => match (CpuSet::parse(a), CpuSet::parse(b)) {
                (Ok(x), Ok(y)) => x == y,
                _ => a.trim() == b.trim(),
            },
        }
    }
}

/// A thread's identity: a tid is reused, a tid and a start time are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadId {
    pub tid: u32,
    pub tgid: u32,
    pub start_time: u64,
    pub comm: String,
}

impl fmt::Display for ThreadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tid {} ({})", self.tid, self.comm)
    }
}

/// One step, with what it needs to be undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Writes `after` to a kernel file that reads `before`. `before` is
    /// `None` for files of a cgroup this plan creates (removing it undoes them).
    Write {
        path: PathBuf,
        before: Option<String>,
        after: String,
        compare: Compare,
    },
    /// Creates a cgroup; undone by moving whatever is left in it to its
    /// parent (through `tasks_file`) and removing it.
    Mkdir { path: PathBuf, tasks_file: String },
    /// Enables a controller in a cgroup v2 `cgroup.subtree_control`.
    EnableController { path: PathBuf, controller: String },
    /// Moves a thread between cgroup v1 cpusets (`root` + relative paths).
    MoveTask {
        thread: ThreadId,
        root: PathBuf,
        from: String,
        to: String,
        /// Its affinity before the move (a cpuset move rewrites it).
        affinity: CpuSet,
    },
    /// Sets a thread's affinity.
    Affinity {
        thread: ThreadId,
        before: CpuSet,
        after: CpuSet,
    },
}

/// A change: what, the action, and why it helps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub what: What,
    /// A short name for people: "IRQ 26 (ttyS0)", "kernel.timer_migration".
    pub target: String,
    pub action: Action,
    pub why: String,
    /// The kernel may refuse it (kernel-managed IRQs: EIO): then it is
    /// listed as not changeable at runtime instead of failing the run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub may_be_refused: bool,
}

impl Change {
    /// "before -> after" for people.
    pub fn before_after(&self) -> String {
        match &self.action {
            Action::Write { before, after, .. } => format!(
                "{} -> {}",
                before.as_deref().map_or("(new)", str::trim),
                after.trim()
            ),
            Action::Mkdir { .. } => "(absent) -> created".into(),
            Action::EnableController { controller, .. } => format!("+{controller}"),
            Action::MoveTask { from, to, .. } => format!("{from} -> {to}"),
            Action::Affinity { before, after, .. } => format!("{before} -> {after}"),
        }
    }
}

/// Something on or about the guarded CPUs that a runtime change cannot fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unchanged {
    pub what: What,
    pub target: String,
    pub why: String,
}

/// What `isolate` would do on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub guarded: CpuSet,
    pub housekeeping: CpuSet,
    pub mechanism: Mechanism,
    pub changes: Vec<Change>,
    /// Left as it is, each with why (kernel-managed IRQs, per-CPU kernel
    /// threads, tasks in another manager's cgroup, ...).
    pub unchanged: Vec<Unchanged>,
    /// Boot parameters only a reboot can apply, limited to those this kernel
    /// honours, and where to put them on this host.
    pub reboot: Option<Reboot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reboot {
    pub params: String,
    pub howto: String,
    pub why: String,
}

#[derive(Debug, Error)]
pub enum IsolateError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("--mechanism {wanted:?} is not available here: {why}")]
    MechanismUnavailable { wanted: Mechanism, why: String },
    #[error(
        "an isolation of CPUs {guarded} ({mechanism}) is already active (state file {path}): \
         run `pinguard isolate --undo` first"
    )]
    OtherActive {
        guarded: CpuSet,
        mechanism: Mechanism,
        path: PathBuf,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error(
        "{target}: {reason}; rolled back the {rolled_back} change(s) already applied{}",
        if rollback_errors.is_empty() { String::new() } else { format!(" (but could not roll back: {})", rollback_errors.join("; ")) }
    )]
    Failed {
        target: String,
        reason: String,
        rolled_back: usize,
        rollback_errors: Vec<String>,
    },
    #[error(
        "no isolation to undo: {path} does not exist (a reboot clears it, and a reboot undoes every runtime change anyway)"
    )]
    NothingToUndo { path: PathBuf },
}
