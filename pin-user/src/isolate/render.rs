//! `pinguard isolate` for people: one line per change (threads grouped per
//! process), what stays, what only a reboot can do.
use std::{collections::BTreeMap, fmt::Write as _};

use super::{
    Action, Change, Plan, What,
    apply::{Done, Outcome, UndoReport},
};

/// Threads of one process on one line; other changes one each.
fn lines<'a>(
    items: impl Iterator<Item = (&'a Change, String)>,
) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    let mut procs: BTreeMap<(u32, String, String), (usize, String)> = BTreeMap::new();
    for (c, status) in items {
        let grouped = match &c.action {
            Action::MoveTask { thread, .. } | Action::Affinity { thread, .. } => Some(thread.tgid),
            _ => None,
        };
        match grouped {
            Some(tgid) => {
                let e = procs
                    .entry((tgid, c.before_after(), status.clone()))
                    .or_insert((0, String::new()));
                e.0 += 1;
                if e.1.is_empty() || c.target.contains(&format!("tid {tgid} ")) {
                    e.1 = c.target.clone();
                }
            }
            None => out.push((
                c.what.name().to_string(),
                c.target.clone(),
                c.before_after(),
                status,
            )),
        }
    }
    for ((tgid, ba, status), (n, name)) in procs {
        let comm = name
            .split_once('(')
            .map_or("", |(_, r)| r.trim_end_matches(')'));
        out.push((
            "threads".into(),
            format!("pid {tgid} {comm}: {n} thread(s)"),
            ba,
            status,
        ));
    }
    out
}

fn table(rows: &[(String, String, String, String)]) -> String {
    let w1 = rows.iter().map(|r| r.0.len()).max().unwrap_or(4).max(4);
    let w2 = rows
        .iter()
        .map(|r| r.1.len())
        .max()
        .unwrap_or(6)
        .clamp(6, 60);
    let w3 = rows
        .iter()
        .map(|r| r.2.len())
        .max()
        .unwrap_or(6)
        .clamp(6, 40);
    let mut s = format!(
        "{:w1$}  {:w2$}  {:w3$}  STATUS\n",
        "WHAT", "TARGET", "BEFORE -> AFTER"
    );
    for (a, b, c, d) in rows {
        let _ = writeln!(s, "{a:w1$}  {b:w2$}  {c:w3$}  {d}");
    }
    s
}

fn tail(plan: &Plan, s: &mut String) {
    if !plan.unchanged.is_empty() {
        s.push_str("\nLeft as it is:\n");
        for u in &plan.unchanged {
            let _ = writeln!(s, "  {} {}: {}", u.what.name(), u.target, u.why);
        }
    }
    if let Some(r) = &plan.reboot {
        let _ = writeln!(
            s,
            "\nOnly a reboot can do the rest ({}):\n  {}\n  {}.",
            r.why, r.params, r.howto
        );
    }
}

fn header(plan: &Plan) -> String {
    format!(
        "pinguard isolate: guarded CPUs {}, housekeeping CPUs {}, mechanism: {}\n\n",
        plan.guarded, plan.housekeeping, plan.mechanism
    )
}

pub fn dry_run(plan: &Plan) -> String {
    let mut s = header(plan);
    if plan.changes.is_empty() {
        s.push_str("Nothing to change: already isolated.\n");
    } else {
        s.push_str(&table(&lines(
            plan.changes.iter().map(|c| (c, "would change".to_string())),
        )));
        let _ = writeln!(
            s,
            "\nDry run: {} change(s); nothing was changed.",
            plan.changes.len()
        );
    }
    tail(plan, &mut s);
    s
}

pub fn applied(plan: &Plan, done: &[Done], state_path: &str) -> String {
    let mut s = header(plan);
    let status = |o: &Outcome| match o {
        Outcome::Applied => "changed, verified".to_string(),
        Outcome::Gone => "exited".to_string(),
        Outcome::Refused { reason } => format!("refused by the kernel: {reason}"),
    };
    let applied = done
        .iter()
        .filter(|d| d.outcome == Outcome::Applied)
        .count();
    if done.is_empty() {
        s.push_str("Nothing to change: already isolated.\n");
    } else {
        s.push_str(&table(&lines(
            done.iter().map(|d| (&d.change, status(&d.outcome))),
        )));
        let refused: Vec<&Done> = done
            .iter()
            .filter(|d| matches!(d.outcome, Outcome::Refused { .. }))
            .collect();
        let _ = writeln!(
            s,
            "\n{applied} change(s) applied and read back; {} refused by the kernel (left as they are).",
            refused.len()
        );
        if refused.iter().any(|d| d.change.what == What::Irq) {
            let _ = writeln!(
                s,
                "IRQs the kernel refuses to move are kernel-managed: isolcpus=managed_irq at boot keeps them off guarded CPUs."
            );
        }
    }
    tail(plan, &mut s);
    let _ = writeln!(
        s,
        "\nState: {state_path}. `pinguard isolate --undo` restores every previous value (survives a daemon restart, not a reboot; a reboot undoes all of it anyway)."
    );
    s
}

pub fn undone(report: &UndoReport, state_path: &str) -> String {
    let mut s = format!(
        "pinguard isolate --undo: {} value(s) restored, {} already as they were or gone.\n",
        report.restored, report.unchanged
    );
    if !report.overwritten.is_empty() {
        s.push_str("Changed since isolate, and overwritten with the original:\n");
        for o in &report.overwritten {
            let _ = writeln!(
                s,
                "  {}: isolate set {}, found {}",
                o.target, o.set, o.found
            );
        }
    }
    if report.errors.is_empty() {
        let _ = writeln!(s, "Removed {state_path}.");
    } else {
        s.push_str("Could not restore (the state file is kept; fix and run --undo again):\n");
        for e in &report.errors {
            let _ = writeln!(s, "  {e}");
        }
    }
    s
}
