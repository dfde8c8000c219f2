//! Applying a placement plan: the one place that moves guest threads, for
//! `pinguard pin` and the daemon alike.
//!
//! Emulator threads move first, so they have left the guarded CPUs before the
//! vCPUs arrive. Each change is read back (see
//! [`crate::host::affinity::apply_and_verify`]). A thread that exited meanwhile
//! is the normal life of a host, not a failure. What a real failure does is the
//! caller's choice ([`OnFailure`]): `pin` restores everything it changed and
//! stops; the daemon keeps going and counts the failure.
use thiserror::Error;

use crate::{
    host::affinity::AffinityError,
    placement::{
        place::Placement,
        plan::{Entry, Plan, Role},
    },
};

/// What happened to one thread of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Already where the plan puts it.
    Unchanged,
    /// Would change (dry run).
    Planned,
    /// Changed and verified.
    Applied,
    /// Exited before it could be changed.
    Vanished,
    /// The change failed (only with [`OnFailure::Continue`]).
    Failed,
}

/// What a failed change (other than a thread exiting) does to the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Restore every thread changed so far and stop: all or nothing.
    Rollback,
    /// Keep applying the other entries; report the failures.
    Continue,
}

/// The statuses of a plan before anything is applied (a dry run).
pub fn planned(plan: &Plan) -> Vec<Status> {
    plan.entries
        .iter()
        .map(|e| {
            if e.change {
                Status::Planned
            } else {
                Status::Unchanged
            }
        })
        .collect()
}

/// The result of applying a plan: one status per entry, in plan order, and
/// the failures (entry index, error) when failures do not stop the run.
#[derive(Debug, Default)]
pub struct Applied {
    pub statuses: Vec<Status>,
    pub failures: Vec<(usize, AffinityError)>,
}

/// A plan that failed part-way under [`OnFailure::Rollback`].
#[derive(Debug, Error)]
#[error("cannot pin {} to CPU {}: {error}\n{}", describe(entry), entry.to, self.rollback_summary())]
pub struct Aborted {
    pub entry: Entry,
    pub error: AffinityError,
    /// Threads changed before the failure and restored.
    pub restored: usize,
    /// Threads changed before the failure that could not be restored.
    pub not_restored: Vec<(Entry, AffinityError)>,
    /// Changes never attempted.
    pub not_attempted: usize,
}

impl Aborted {
    fn rollback_summary(&self) -> String {
        let mut msg = format!(
            "{} thread(s) had been changed and were restored to their previous affinity; \
             {} more were not attempted",
            self.restored, self.not_attempted
        );
        if self.not_restored.is_empty() {
            msg.push_str("; nothing is left changed");
        } else {
            msg.push_str(&format!(
                "\n{} thread(s) could not be restored:",
                self.not_restored.len()
            ));
            for (e, err) in &self.not_restored {
                msg.push_str(&format!(
                    "\n  {} stays on CPU {} (was {}): {err}",
                    describe(e),
                    e.to,
                    e.from
                ));
            }
        }
        msg
    }
}

/// "thread 123 (guest web vCPU 0)", for messages.
pub fn describe(e: &Entry) -> String {
    match e.vcpu {
        Some(i) => format!("thread {} (guest {} vCPU {i})", e.tid, e.vm),
        None => format!("thread {} (guest {} emulator thread)", e.tid, e.vm),
    }
}

/// Applies the changes of `plan` through `aff`, emulator threads first.
pub fn apply(
    plan: &Plan,
    aff: &mut impl Placement,
    on_failure: OnFailure,
) -> Result<Applied, Box<Aborted>> {
    let mut out = Applied {
        statuses: planned(plan),
        failures: Vec::new(),
    };
    let mut order: Vec<usize> = (0..plan.entries.len())
        .filter(|&i| plan.entries[i].change)
        .collect();
    // Stable: emulators (false) before vCPUs (true), plan order within each.
    order.sort_by_key(|&i| plan.entries[i].role == Role::Vcpu);
    let mut changed: Vec<usize> = Vec::new();
    aff.begin_plan();
    for (n, &i) in order.iter().enumerate() {
        let e = &plan.entries[i];
        match aff.place(&e.target(), &e.to) {
            Ok(()) => {
                out.statuses[i] = Status::Applied;
                changed.push(i);
            }
            Err(err) if err.is_gone() => out.statuses[i] = Status::Vanished,
            Err(err) => match on_failure {
                OnFailure::Continue => {
                    out.statuses[i] = Status::Failed;
                    out.failures.push((i, err));
                }
                OnFailure::Rollback => {
                    let mut restored = 0;
                    let mut not_restored = Vec::new();
                    for &j in changed.iter().rev() {
                        let done = &plan.entries[j];
                        match aff.place(&done.target(), &done.from) {
                            Ok(()) => restored += 1,
                            // Gone: nothing is left changed for it.
                            Err(err) if err.is_gone() => restored += 1,
                            Err(err) => not_restored.push((done.clone(), err)),
                        }
                    }
                    aff.undo_plan();
                    return Err(Box::new(Aborted {
                        entry: e.clone(),
                        error: err,
                        restored,
                        not_restored,
                        not_attempted: order.len() - n - 1,
                    }));
                }
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{affinity::fake::Table, cpulist::CpuSet};

    fn entry(tid: u32, role: Role, from: &str, to: &str) -> Entry {
        let (from, to) = (CpuSet::parse(from).unwrap(), CpuSet::parse(to).unwrap());
        Entry {
            vm: "g1".into(),
            pid: 100,
            vcpu: (role == Role::Vcpu).then_some(tid - 101),
            tid,
            role,
            change: from != to,
            from,
            to,
            shared: false,
            manager: Default::default(),
        }
    }

    fn setup() -> (Plan, Table) {
        let plan = Plan {
            entries: vec![
                entry(101, Role::Vcpu, "0-1", "1"),
                entry(102, Role::Vcpu, "1", "1"),
                entry(200, Role::Emulator, "0-1", "0"),
            ],
            ..Plan::default()
        };
        let mut t = Table::default();
        for e in &plan.entries {
            t.cpus.insert(e.tid, e.from.clone());
        }
        (plan, t)
    }

    #[test]
    fn emulators_move_before_vcpus_and_unchanged_threads_are_left() {
        let (plan, mut t) = setup();
        let r = apply(&plan, &mut t, OnFailure::Rollback).unwrap();
        let moved: Vec<u32> = t.log.iter().map(|(tid, _)| *tid).collect();
        assert_eq!(moved, [200, 101]);
        assert_eq!(
            r.statuses,
            [Status::Applied, Status::Unchanged, Status::Applied]
        );
        assert_eq!(t.cpus[&101], CpuSet::single(1));
    }

    #[test]
    fn a_thread_that_exited_is_not_a_failure() {
        let (plan, mut t) = setup();
        t.cpus.remove(&101);
        let r = apply(&plan, &mut t, OnFailure::Rollback).unwrap();
        assert_eq!(r.statuses[0], Status::Vanished);
        assert!(r.failures.is_empty());
    }

    #[test]
    fn rollback_restores_what_was_changed_and_says_so() {
        let (plan, mut t) = setup();
        t.fail.insert(
            101,
            AffinityError::Invalid {
                tid: 101,
                cpus: CpuSet::single(1),
            },
        );
        let err = apply(&plan, &mut t, OnFailure::Rollback).unwrap_err();
        assert_eq!(err.entry.tid, 101);
        assert_eq!(err.restored, 1);
        assert_eq!(
            t.cpus[&200],
            CpuSet::parse("0-1").unwrap(),
            "emulator restored"
        );
        let msg = err.to_string();
        assert!(msg.contains("guest g1 vCPU 0"), "{msg}");
        assert!(msg.contains("nothing is left changed"), "{msg}");
    }

    /// A table that records the plan's begin and undo.
    #[derive(Default)]
    struct Recording {
        table: Table,
        calls: Vec<&'static str>,
    }

    impl crate::host::affinity::Affinities for Recording {
        fn get(&self, tid: u32) -> Result<CpuSet, AffinityError> {
            self.table.get(tid)
        }
        fn set(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
            self.table.set(tid, cpus)
        }
    }

    impl Placement for Recording {
        fn begin_plan(&mut self) {
            self.calls.push("begin");
        }
        fn undo_plan(&mut self) {
            self.calls.push("undo");
        }
    }

    #[test]
    fn a_rollback_also_undoes_what_placing_changed_besides_affinities() {
        let (plan, t) = setup();
        let mut r = Recording {
            table: t,
            ..Recording::default()
        };
        r.table.fail.insert(
            101,
            AffinityError::Invalid {
                tid: 101,
                cpus: CpuSet::single(1),
            },
        );
        apply(&plan, &mut r, OnFailure::Rollback).unwrap_err();
        assert_eq!(r.calls, ["begin", "undo"]);
        // Without a failure nothing is undone.
        let (plan, t) = setup();
        let mut r = Recording {
            table: t,
            ..Recording::default()
        };
        apply(&plan, &mut r, OnFailure::Rollback).unwrap();
        assert_eq!(r.calls, ["begin"]);
    }

    #[test]
    fn continue_applies_the_rest_and_reports_failures() {
        let (plan, mut t) = setup();
        t.fail.insert(200, AffinityError::NotPermitted { tid: 200 });
        let r = apply(&plan, &mut t, OnFailure::Continue).unwrap();
        assert_eq!(r.statuses[2], Status::Failed);
        assert_eq!(r.statuses[0], Status::Applied);
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].0, 2);
    }
}
