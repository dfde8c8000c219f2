//! `pinguard isolate`: applies the runtime isolation plan (or prints it with
//! --dry-run) and `--undo` restores from the state file. Exit 0 when done,
//! 1 when an undo could not restore everything, 2 when it could not run
//! (bad --guard, another isolation active, a change failed and was rolled back).
use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use crate::{
    cli::{IsolateArgs, IsolateMechanism},
    exit,
    host::{Host, procfs::Proc, topology::Topology},
    isolate::{
        Action, IsolateError, Mechanism, Plan,
        apply::{self, Done, Live, Outcome},
        facts, plan, render,
        state::{DEFAULT_PATH, State, Store},
    },
};

/// New tasks forked by unmoved parents while the plan was applied are picked
/// up by re-planning the task moves, at most this many times.
const SETTLE_ROUNDS: usize = 3;

fn mechanism(m: IsolateMechanism) -> Mechanism {
    match m {
        IsolateMechanism::Partition => Mechanism::Partition,
        IsolateMechanism::Shield => Mechanism::Shield,
        IsolateMechanism::Affinity => Mechanism::Affinity,
    }
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    print(&(serde_json::to_string_pretty(v).context("cannot write JSON")? + "\n"))
}

pub fn run(args: IsolateArgs) -> anyhow::Result<ExitCode> {
    let host = Host::default();
    let store = Store::new(PathBuf::from(DEFAULT_PATH), &host.proc);
    let mut io = Live {
        proc: Proc::new(&host.proc),
    };
    let path = store.path.display().to_string();

    if args.undo {
        let (state, report) = apply::undo_from(&mut io, &store)?;
        if args.json {
            print_json(&serde_json::json!({
                "undo": true,
                "guarded": state.guarded,
                "mechanism": state.mechanism,
                "report": report,
                "state_file": path,
            }))?;
        } else {
            print(&render::undone(&report, &path))?;
        }
        return Ok(ExitCode::from(if report.errors.is_empty() {
            exit::OK
        } else {
            exit::VIOLATIONS
        }));
    }

    let topo = Topology::read_from(&host.sys).map_err(IsolateError::from)?;
    // Refuses no housekeeping CPU left, offline and nonexistent CPUs.
    let guard = topo
        .guard(args.guard.guard.as_ref())
        .map_err(IsolateError::from)?;
    let existing = store.load()?;
    let wanted = args.mechanism.map(mechanism);
    if let Some(s) = &existing
        && (s.guarded != guard.guarded || wanted.is_some_and(|m| m != s.mechanism))
    {
        return Err(IsolateError::OtherActive {
            guarded: s.guarded.clone(),
            mechanism: s.mechanism,
            path: store.path.clone(),
        }
        .into());
    }
    let wanted = wanted.or(existing.as_ref().map(|s| s.mechanism));
    // pinguard itself stays on housekeeping CPUs (the planner skips it).
    super::move_self_to(&guard.housekeeping)?;
    let facts = facts::gather(&host, &guard)?;
    let plan = plan::plan(&facts, wanted)?;

    if args.dry_run {
        if args.json {
            print_json(&serde_json::json!({ "dry_run": true, "plan": plan }))?;
        } else {
            print(&render::dry_run(&plan))?;
        }
        return Ok(ExitCode::from(exit::OK));
    }

    let had_state = existing.is_some();
    let mut state = existing.unwrap_or_else(|| {
        State::new(
            guard.guarded.clone(),
            guard.housekeeping.clone(),
            plan.mechanism,
            store.boot_id.clone(),
        )
    });
    let mut save = |s: &State| store.save(s);
    let mut done = apply::apply(&mut io, &plan, &mut state, &mut save)?;
    for _ in 0..SETTLE_ROUNDS {
        let facts = facts::gather(&host, &guard)?;
        let mut again = plan::plan(&facts, Some(plan.mechanism))?;
        again
            .changes
            .retain(|c| matches!(c.action, Action::MoveTask { .. } | Action::Affinity { .. }));
        if again.changes.is_empty() {
            break;
        }
        let more = apply::apply(&mut io, &again, &mut state, &mut save).with_context(|| {
            format!(
                "moving tasks that appeared meanwhile; the {} change(s) of the first pass stay applied and recorded in {path}: \
                 `pinguard isolate --undo` restores them",
                state.changes.len()
            )
        })?;
        done.extend(more);
    }
    if state.changes.is_empty() && !had_state {
        store.remove()?;
    }
    report(&plan, &done, &path, args.json)?;
    Ok(ExitCode::from(exit::OK))
}

fn report(plan: &Plan, done: &[Done], path: &str, json: bool) -> anyhow::Result<()> {
    if json {
        let applied = done
            .iter()
            .filter(|d| d.outcome == Outcome::Applied)
            .count();
        print_json(&serde_json::json!({
            "guarded": plan.guarded,
            "housekeeping": plan.housekeeping,
            "mechanism": plan.mechanism,
            "applied": applied,
            "results": done,
            "unchanged": plan.unchanged,
            "reboot": plan.reboot,
            "state_file": path,
        }))
    } else {
        print(&render::applied(plan, done, path))
    }
}
