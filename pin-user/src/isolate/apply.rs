//! The edge that changes the host: each change is recorded in the state file
//! before it is made, then made, then read back. A failure rolls back what
//! this run applied; `undo` restores from the state file, in reverse order,
//! and says which values it overwrote because something changed them since.
//!
//! All effects go through [`Io`], so the rules (what counts as refused, what
//! is rolled back, what an undo reports) are unit-tested with an in-memory host.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    Action, Change, IsolateError, Plan, ThreadId,
    facts::v1_cpuset_of,
    state::{State, Store},
};
use crate::host::{
    affinity::{self, AffinityError},
    cpulist::CpuSet,
    procfs::Proc,
};

/// The host's files, cgroups and threads.
pub trait Io {
    fn read(&self, path: &Path) -> io::Result<String>;
    fn write(&mut self, path: &Path, value: &str) -> io::Result<()>;
    fn mkdir(&mut self, path: &Path) -> io::Result<()>;
    fn rmdir(&mut self, path: &Path) -> io::Result<()>;
    /// The thread's start time, `None` once it exited.
    fn start_time(&self, t: &ThreadId) -> Option<u64>;
    /// The thread's cgroup v1 cpuset ("/", "/pinguard-housekeeping").
    fn cpuset(&self, t: &ThreadId) -> Option<String>;
    fn affinity(&self, tid: u32) -> Result<CpuSet, AffinityError>;
    fn set_affinity(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError>;
}

/// The live host.
#[derive(Debug, Clone)]
pub struct Live {
    pub proc: Proc,
}

impl Io for Live {
    fn read(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn write(&mut self, path: &Path, value: &str) -> io::Result<()> {
        // One write(2) of the whole value: kernel files parse each write.
        use io::Write as _;
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }

    fn mkdir(&mut self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn rmdir(&mut self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn start_time(&self, t: &ThreadId) -> Option<u64> {
        // An exiting thread (PF_EXITING, then a zombie) cannot change
        // cgroup or affinity any more (the kernel refuses with EINVAL), and
        // its /proc/.../cgroup no longer says where it was.
        const PF_EXITING: u32 = 0x0000_0004;
        self.proc
            .thread(t.tgid, t.tid)
            .ok()
            .flatten()
            .filter(|i| !matches!(i.state, 'Z' | 'X' | 'x') && i.flags & PF_EXITING == 0)
            .map(|i| i.start_time)
    }

    fn cpuset(&self, t: &ThreadId) -> Option<String> {
        let path = self
            .proc
            .root()
            .join(t.tgid.to_string())
            .join("task")
            .join(t.tid.to_string())
            .join("cgroup");
        fs::read_to_string(path).ok().and_then(|s| v1_cpuset_of(&s))
    }

    fn affinity(&self, tid: u32) -> Result<CpuSet, AffinityError> {
        affinity::get(tid)
    }

    fn set_affinity(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
        affinity::set(tid, cpus)
    }
}

/// What happened to one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    /// The kernel refused it and the plan allows that (a kernel-managed IRQ,
    /// a thread that may not move): listed, nothing changed.
    Refused {
        reason: String,
    },
    /// The thread exited before it could be changed.
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Done {
    #[serde(flatten)]
    pub change: Change,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Why one step failed; `refusable` when the kernel said no to this one
/// object (EIO from a managed IRQ, EINVAL from a thread that may not move).
struct StepError {
    reason: String,
    refusable: bool,
    gone: bool,
}

impl StepError {
    fn io(what: &str, path: &Path, e: &io::Error) -> Self {
        let errno = e.raw_os_error();
        Self {
            reason: format!("{what} {}: {e}", path.display()),
            refusable: matches!(
                errno,
                Some(libc::EIO | libc::EINVAL | libc::EPERM | libc::EBUSY)
            ),
            gone: errno == Some(libc::ESRCH),
        }
    }

    fn fatal(reason: String) -> Self {
        Self {
            reason,
            refusable: false,
            gone: false,
        }
    }

    fn affinity(e: AffinityError) -> Self {
        Self {
            gone: e.is_gone(),
            refusable: matches!(e, AffinityError::Invalid { .. }),
            reason: e.to_string(),
        }
    }
}

fn alive(io: &impl Io, t: &ThreadId) -> bool {
    io.start_time(t) == Some(t.start_time)
}

fn tasks_file(root: &Path, cgroup: &str) -> PathBuf {
    root.join(cgroup.trim_start_matches('/')).join("tasks")
}

/// Makes one change and reads it back.
fn step(io: &mut impl Io, action: &Action) -> Result<(), StepError> {
    match action {
        Action::Write {
            path,
            after,
            compare,
            ..
        } => {
            io.write(path, after)
                .map_err(|e| StepError::io("writing", path, &e))?;
            let back = io
                .read(path)
                .map_err(|e| StepError::io("reading back", path, &e))?;
            if !compare.same(&back, after) {
                return Err(StepError::fatal(format!(
                    "{} reads back as {:?} after writing {after:?}",
                    path.display(),
                    back.trim()
                )));
            }
            Ok(())
        }
        Action::Mkdir { path, .. } => io
            .mkdir(path)
            .map_err(|e| StepError::io("creating", path, &e)),
        Action::EnableController { path, controller } => {
            io.write(path, &format!("+{controller}"))
                .map_err(|e| StepError::io("writing", path, &e))?;
            let back = io
                .read(path)
                .map_err(|e| StepError::io("reading back", path, &e))?;
            if !back.split_whitespace().any(|c| c == controller) {
                return Err(StepError::fatal(format!(
                    "{} reads back as {:?}: the {controller} controller was not enabled",
                    path.display(),
                    back.trim()
                )));
            }
            Ok(())
        }
        Action::MoveTask {
            thread, root, to, ..
        } => {
            if !alive(io, thread) {
                return Err(StepError {
                    reason: String::new(),
                    refusable: false,
                    gone: true,
                });
            }
            let file = tasks_file(root, to);
            io.write(&file, &thread.tid.to_string())
                .map_err(|e| StepError::io("writing", &file, &e))?;
            match io.cpuset(thread) {
                Some(now) if &now == to => Ok(()),
                None if !alive(io, thread) => Err(StepError {
                    reason: String::new(),
                    refusable: false,
                    gone: true,
                }),
                now => Err(StepError::fatal(format!(
                    "{thread} is in cpuset {} after moving it to {to}",
                    now.as_deref().unwrap_or("?")
                ))),
            }
        }
        Action::Affinity { thread, after, .. } => {
            if !alive(io, thread) {
                return Err(StepError {
                    reason: String::new(),
                    refusable: false,
                    gone: true,
                });
            }
            io.set_affinity(thread.tid, after)
                .map_err(StepError::affinity)?;
            let now = io.affinity(thread.tid).map_err(StepError::affinity)?;
            if &now != after {
                return Err(StepError::fatal(format!(
                    "{thread}: affinity reads back as {now} after setting {after}"
                )));
            }
            Ok(())
        }
    }
}

/// Records in the state, then applies, each change of the plan. On a
/// failure, rolls back this run's changes and returns the error.
pub fn apply(
    io: &mut impl Io,
    plan: &Plan,
    state: &mut State,
    save: &mut dyn FnMut(&State) -> Result<(), IsolateError>,
) -> Result<Vec<Done>, IsolateError> {
    let first = state.changes.len();
    let mut done = Vec::new();
    for change in &plan.changes {
        state.changes.push(change.clone());
        save(state)?;
        let outcome = match step(io, &change.action) {
            Ok(()) => Outcome::Applied,
            Err(e) if e.gone => Outcome::Gone,
            Err(e)
                if e.refusable
                    && (change.may_be_refused
                        || matches!(
                            change.action,
                            Action::MoveTask { .. } | Action::Affinity { .. }
                        )) =>
            {
                Outcome::Refused { reason: e.reason }
            }
            Err(e) => {
                let mut rollback_errors = Vec::new();
                let ours: Vec<Change> = state.changes.drain(first..).collect();
                for c in ours.iter().rev() {
                    if let Err(msg) = restore(io, c, &mut Vec::new()) {
                        rollback_errors.push(format!("{}: {msg}", c.target));
                    }
                }
                // Keep what could not be rolled back, so --undo can retry it.
                if !rollback_errors.is_empty() {
                    state.changes.extend(ours);
                }
                save(state)?;
                return Err(IsolateError::Failed {
                    target: change.target.clone(),
                    reason: e.reason,
                    rolled_back: done
                        .iter()
                        .filter(|d: &&Done| d.outcome == Outcome::Applied)
                        .count(),
                    rollback_errors,
                });
            }
        };
        if outcome != Outcome::Applied {
            // Nothing changed: nothing to undo.
            state.changes.pop();
            save(state)?;
        }
        done.push(Done {
            change: change.clone(),
            outcome,
        });
    }
    Ok(done)
}

/// A value that was not what isolate left there when undo restored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overwritten {
    pub target: String,
    /// What isolate had set.
    pub set: String,
    /// What undo found instead (and replaced with the original).
    pub found: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UndoReport {
    pub restored: usize,
    /// Already at their original value, or threads that exited.
    pub unchanged: usize,
    pub overwritten: Vec<Overwritten>,
    pub errors: Vec<String>,
}

/// Puts one change back. `Ok` when the original is in place (or moot).
fn restore(io: &mut impl Io, c: &Change, over: &mut Vec<Overwritten>) -> Result<bool, String> {
    let mut noted = |set: String, found: String| {
        over.push(Overwritten {
            target: c.target.clone(),
            set,
            found,
        })
    };
    match &c.action {
        Action::Write {
            path,
            before,
            after,
            compare,
        } => {
            let Some(before) = before else {
                // A file of a cgroup this isolation created: removing it undoes it.
                return Ok(false);
            };
            let now = io
                .read(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            if !compare.same(&now, after) && !compare.same(&now, before) {
                noted(after.trim().into(), now.trim().into());
            }
            if compare.same(&now, before) {
                return Ok(false);
            }
            io.write(path, before)
                .map_err(|e| format!("writing {before:?} to {}: {e}", path.display()))?;
            let back = io
                .read(path)
                .map_err(|e| format!("reading back {}: {e}", path.display()))?;
            if !compare.same(&back, before) {
                return Err(format!(
                    "{} reads back as {:?} after restoring {before:?}",
                    path.display(),
                    back.trim()
                ));
            }
            Ok(true)
        }
        Action::Mkdir { path, tasks_file } => {
            if io.read(&path.join(tasks_file)).is_err() {
                return Ok(false);
            }
            let parent = path.parent().unwrap_or(path).join(tasks_file);
            // Tasks that arrived since (children of moved tasks) go to the
            // parent. Exiting tasks cannot be moved and keep the cgroup busy
            // until they are reaped (a guest killed just before): a bounded
            // wait, there is no event to wait for on cgroup v1.
            for attempt in 0..200 {
                if attempt > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                let left = io.read(&path.join(tasks_file)).unwrap_or_default();
                for id in left.split_whitespace() {
                    // A task that exits meanwhile is fine.
                    let _ = io.write(&parent, id);
                }
                match io.rmdir(path) {
                    Ok(()) => return Ok(true),
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(format!("removing {}: {e}", path.display())),
                }
            }
            Err(format!(
                "removing {}: still busy 2 s after moving its tasks to the parent",
                path.display()
            ))
        }
        Action::EnableController { path, controller } => {
            io.write(path, &format!("-{controller}"))
                .map_err(|e| format!("writing -{controller} to {}: {e}", path.display()))?;
            Ok(true)
        }
        Action::MoveTask {
            thread,
            root,
            from,
            to,
            affinity,
        } => {
            if !alive(io, thread) {
                return Ok(false);
            }
            let now = io.cpuset(thread).unwrap_or_default();
            let mut changed = false;
            if &now != from {
                if &now != to {
                    noted(format!("cpuset {to}"), format!("cpuset {now}"));
                }
                let file = tasks_file(root, from);
                match io.write(&file, &thread.tid.to_string()) {
                    Ok(()) => changed = true,
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
                    Err(e) => return Err(format!("{thread}: writing {}: {e}", file.display())),
                }
            }
            // A cpuset move rewrites the affinity: put the thread's own back.
            match io.affinity(thread.tid) {
                Ok(a) if &a == affinity => Ok(changed),
                Ok(_) => match io.set_affinity(thread.tid, affinity) {
                    Ok(()) => Ok(true),
                    Err(e) if e.is_gone() => Ok(changed),
                    // It began to exit after the check above.
                    Err(_) if !alive(io, thread) => Ok(changed),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) if e.is_gone() => Ok(changed),
                Err(e) => Err(e.to_string()),
            }
        }
        Action::Affinity {
            thread,
            before,
            after,
        } => {
            if !alive(io, thread) {
                return Ok(false);
            }
            let now = match io.affinity(thread.tid) {
                Ok(a) => a,
                Err(e) if e.is_gone() => return Ok(false),
                Err(e) => return Err(e.to_string()),
            };
            if &now == before {
                return Ok(false);
            }
            if &now != after {
                noted(format!("affinity {after}"), format!("affinity {now}"));
            }
            match io.set_affinity(thread.tid, before) {
                Ok(()) => Ok(true),
                Err(e) if e.is_gone() => Ok(false),
                Err(_) if !alive(io, thread) => Ok(false),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// Restores every change of the state, newest first.
pub fn undo(io: &mut impl Io, state: &State) -> UndoReport {
    let mut r = UndoReport::default();
    for c in state.changes.iter().rev() {
        match restore(io, c, &mut r.overwritten) {
            Ok(true) => r.restored += 1,
            Ok(false) => r.unchanged += 1,
            Err(e) => r.errors.push(format!("{}: {e}", c.target)),
        }
    }
    r
}

/// Undoes from the state file and removes it when everything was restored.
pub fn undo_from(io: &mut impl Io, store: &Store) -> Result<(State, UndoReport), IsolateError> {
    let Some(state) = store.load()? else {
        return Err(IsolateError::NothingToUndo {
            path: store.path.clone(),
        });
    };
    let report = undo(io, &state);
    if report.errors.is_empty() {
        store.remove()?;
    }
    Ok((state, report))
}

#[cfg(test)]
pub mod fake {
    //! An in-memory host for the applier's tests.
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[derive(Debug, Default)]
    pub struct Host {
        pub files: BTreeMap<PathBuf, String>,
        pub dirs: BTreeSet<PathBuf>,
        /// Writes to these paths fail with this errno.
        pub fail: BTreeMap<PathBuf, i32>,
        /// tid -> (start time, cpuset, affinity).
        pub threads: BTreeMap<u32, (u64, String, CpuSet)>,
        /// The v1 root: writes to `<root>/<cg>/tasks` move threads.
        pub v1_root: Option<PathBuf>,
        /// What the kernel makes of a write: the file then reads this.
        pub rewrite: BTreeMap<PathBuf, String>,
        pub writes: Vec<(PathBuf, String)>,
    }

    impl Host {
        /// A host holding what `facts` describe: every sysctl, workqueue
        /// and IRQ file, the v1 cpuset root, every thread.
        pub fn from_facts(facts: &crate::isolate::facts::Facts) -> Self {
            let mut h = Self::default();
            for s in &facts.sysctls {
                h.files.insert(s.value.path.clone(), s.value.text.clone());
            }
            for w in facts.workqueues.iter().chain(&facts.default_irq) {
                h.files.insert(w.path.clone(), w.text.clone());
            }
            for i in &facts.irqs {
                h.files
                    .insert(i.affinity.path.clone(), i.affinity.text.clone());
            }
            if let Some(v1) = &facts.v1 {
                h.v1_root = Some(v1.root.clone());
                h.files
                    .insert(v1.root.join("cpuset.sched_load_balance"), "1".into());
            }
            for t in &facts.threads {
                h.threads.insert(
                    t.info.tid,
                    (
                        t.info.start_time,
                        t.cpuset.clone().unwrap_or_default(),
                        t.info.allowed.clone(),
                    ),
                );
            }
            h
        }
    }

    impl Io for Host {
        fn read(&self, path: &Path) -> io::Result<String> {
            if let Some(root) = &self.v1_root
                && path.file_name() == Some("tasks".as_ref())
                && let Ok(rel) = path.parent().unwrap().strip_prefix(root)
            {
                let cg = format!("/{}", rel.display());
                let cg = if cg == "/" {
                    cg
                } else {
                    cg.trim_end_matches('/').to_string()
                };
                return Ok(self
                    .threads
                    .iter()
                    .filter(|(_, (_, c, _))| *c == cg)
                    .map(|(t, _)| format!("{t}\n"))
                    .collect());
            }
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }

        fn write(&mut self, path: &Path, value: &str) -> io::Result<()> {
            if let Some(errno) = self.fail.get(path) {
                return Err(io::Error::from_raw_os_error(*errno));
            }
            self.writes.push((path.to_path_buf(), value.to_string()));
            if let Some(root) = &self.v1_root
                && path.file_name() == Some("tasks".as_ref())
                && let Ok(rel) = path.parent().unwrap().strip_prefix(root)
            {
                let cg = format!("/{}", rel.display());
                let tid: u32 = value.parse().unwrap();
                let t = self
                    .threads
                    .get_mut(&tid)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
                t.1 = cg;
                return Ok(());
            }
            let v = self.rewrite.get(path).cloned().unwrap_or(value.to_string());
            self.files.insert(path.to_path_buf(), v);
            Ok(())
        }

        fn mkdir(&mut self, path: &Path) -> io::Result<()> {
            if !self.dirs.insert(path.to_path_buf()) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            self.files.insert(path.join("tasks"), String::new());
            self.files.insert(path.join("cgroup.procs"), String::new());
            Ok(())
        }

        fn rmdir(&mut self, path: &Path) -> io::Result<()> {
            self.dirs.remove(path);
            self.files.retain(|p, _| !p.starts_with(path));
            Ok(())
        }

        fn start_time(&self, t: &ThreadId) -> Option<u64> {
            self.threads.get(&t.tid).map(|x| x.0)
        }

        fn cpuset(&self, t: &ThreadId) -> Option<String> {
            self.threads.get(&t.tid).map(|x| x.1.clone())
        }

        fn affinity(&self, tid: u32) -> Result<CpuSet, AffinityError> {
            self.threads
                .get(&tid)
                .map(|x| x.2.clone())
                .ok_or(AffinityError::Gone { tid })
        }

        fn set_affinity(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
            let t = self
                .threads
                .get_mut(&tid)
                .ok_or(AffinityError::Gone { tid })?;
            t.2 = cpus.clone();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{fake, *};
    use crate::isolate::{
        Mechanism, What,
        plan::{plan, tests_support::host},
    };

    fn set(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

    /// The fake host behind `plan::tests_support::host`'s facts.
    fn live_like(v1: bool) -> (fake::Host, crate::isolate::facts::Facts) {
        let facts = host(v1, false);
        (fake::Host::from_facts(&facts), facts)
    }

    fn state() -> State {
        State::new(set("1"), set("0"), Mechanism::Shield, "boot".into())
    }

    fn apply_all(h: &mut fake::Host, p: &Plan, st: &mut State) -> Result<Vec<Done>, IsolateError> {
        let mut saves = 0;
        let r = apply(h, p, st, &mut |_| {
            saves += 1;
            Ok(())
        });
        // Recorded before each step (and again when a step changed nothing).
        if r.is_ok() {
            assert!(
                saves >= p.changes.len(),
                "{saves} saves for {} changes",
                p.changes.len()
            );
        }
        r
    }

    #[test]
    fn shield_applies_and_undo_restores_everything() {
        let (mut h, facts) = live_like(true);
        let files_before = h.files.clone();
        let threads_before = h.threads.clone();
        let p = plan(&facts, None).unwrap();
        let mut st = state();
        let done = apply_all(&mut h, &p, &mut st).unwrap();
        assert!(
            done.iter().all(|d| d.outcome == Outcome::Applied),
            "{done:#?}"
        );
        assert_eq!(st.changes.len(), p.changes.len());
        assert_eq!(h.threads[&1].1, "/pinguard-housekeeping");
        assert_eq!(h.threads[&101].1, "/pinguard-guarded");
        assert_eq!(h.threads[&20].1, "/", "per-CPU kthreads stay");
        assert_eq!(h.files[&PathBuf::from("/proc/irq/24/smp_affinity")], "1");

        // A process forked since lands in the housekeeping cpuset: undo moves it to the parent.
        h.threads
            .insert(500, (5000, "/pinguard-housekeeping".into(), set("0")));
        let r = undo(&mut h, &st);
        assert!(r.errors.is_empty(), "{r:#?}");
        assert!(r.overwritten.is_empty(), "{r:#?}");
        assert_eq!(h.files, files_before);
        h.threads.remove(&500);
        assert_eq!(h.threads, threads_before);
        assert!(h.dirs.is_empty(), "{:?}", h.dirs);
    }

    #[test]
    fn managed_irq_refusal_is_listed_not_fatal() {
        let (mut h, facts) = live_like(false);
        h.fail.insert("/proc/irq/24/smp_affinity".into(), libc::EIO);
        let p = plan(&facts, Some(Mechanism::Affinity)).unwrap();
        let mut st = state();
        let done = apply_all(&mut h, &p, &mut st).unwrap();
        let irq = done.iter().find(|d| d.change.what == What::Irq).unwrap();
        assert!(
            matches!(&irq.outcome, Outcome::Refused { reason } if reason.contains("Input/output error")),
            "{irq:?}"
        );
        // Not in the state: nothing to undo for it.
        assert!(st.changes.iter().all(|c| c.what != What::Irq));
        assert_eq!(h.threads[&1].2, set("0"));
    }

    #[test]
    fn failure_half_way_rolls_back() {
        let (mut h, facts) = live_like(false);
        let files_before = h.files.clone();
        let threads_before = h.threads.clone();
        // The default IRQ affinity comes after the sysctls and workqueues.
        h.fail
            .insert("/proc/irq/default_smp_affinity".into(), libc::EACCES);
        let p = plan(&facts, Some(Mechanism::Affinity)).unwrap();
        let mut st = state();
        let e = apply_all(&mut h, &p, &mut st).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("default IRQ affinity"), "{msg}");
        assert!(msg.contains("rolled back the 4 change(s)"), "{msg}");
        assert!(st.changes.is_empty(), "{:#?}", st.changes);
        assert_eq!(h.files, files_before);
        assert_eq!(h.threads, threads_before);
    }

    #[test]
    fn readback_mismatch_is_a_failure_with_the_kernels_words() {
        let (mut h, mut facts) = live_like(false);
        facts.v2 = Some(crate::isolate::facts::CpusetV2 {
            root: "/cg".into(),
            subtree_control: "cpuset".into(),
            partition_files: None,
        });
        h.rewrite.insert(
            "/cg/pinguard.isolated/cpuset.cpus.partition".into(),
            "isolated invalid (Cpu list in cpuset.cpus not exclusive)".into(),
        );
        let p = plan(&facts, None).unwrap();
        assert_eq!(p.mechanism, Mechanism::Partition);
        let before = h.files.clone();
        let mut st = state();
        let e = apply_all(&mut h, &p, &mut st).unwrap_err().to_string();
        assert!(e.contains("Cpu list in cpuset.cpus not exclusive"), "{e}");
        assert!(h.dirs.is_empty(), "the partition is removed again");
        assert_eq!(h.files, before);
    }

    #[test]
    fn undo_overwrites_what_changed_since_and_says_so() {
        let (mut h, facts) = live_like(false);
        let p = plan(&facts, Some(Mechanism::Affinity)).unwrap();
        let mut st = state();
        apply_all(&mut h, &p, &mut st).unwrap();
        h.files
            .insert("/proc/sys/kernel/timer_migration".into(), "1".into());
        h.files
            .insert("/proc/irq/24/smp_affinity".into(), "2".into());
        h.threads.get_mut(&30).unwrap().2 = set("1");
        // Thread 200 exited and its id went to another thread.
        h.threads.insert(200, (1, "/".into(), set("0")));
        let r = undo(&mut h, &st);
        assert!(r.errors.is_empty(), "{r:#?}");
        let over: BTreeMap<&str, &str> = r
            .overwritten
            .iter()
            .map(|o| (o.target.as_str(), o.found.as_str()))
            .collect();
        // timer_migration was put back to 1 by someone: already the original, not overwritten.
        assert_eq!(
            over,
            BTreeMap::from([
                ("IRQ 24 (ttyS0)", "2"),
                ("tid 30 (rcu_preempt)", "affinity 1"),
            ])
        );
        assert_eq!(h.files[&PathBuf::from("/proc/irq/24/smp_affinity")], "3");
        assert_eq!(h.threads[&30].2, set("0-1"));
        assert_eq!(h.threads[&200].2, set("0"), "a reused tid is not touched");
    }
}
