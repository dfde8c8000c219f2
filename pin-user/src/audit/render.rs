//! The audit report as text for people.
use std::{collections::BTreeSet, fmt::Write as _};

use super::{Finding, Mode, Report, Status, ThreadRow, UNATTRIBUTED};
use crate::units::fmt_ns;

/// A plain-text table with left-aligned columns sized to their content.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from("  ");
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                let pad = width[i] - cell.chars().count();
                s.push_str(cell);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn vm_cell(r: &ThreadRow) -> String {
    match (&r.vm, r.vcpu) {
        (Some(vm), Some(i)) => format!("{vm}/{i}"),
        (Some(vm), None) => format!("{vm}/emu"),
        _ => "-".into(),
    }
}

fn status_prefix(r: &ThreadRow) -> String {
    match (r.status, r.finding) {
        (Status::Violation, Some(f)) => format!("VIOLATION {}: ", f.name()),
        (Status::Warning, Some(f)) => format!("warning {}: ", f.name()),
        _ => String::new(),
    }
}

/// The human report: per CPU a table (violations first) and a summary.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "pinguard audit ({}): guarded CPUs {}, housekeeping CPUs {}",
        match (r.mode, r.window_ns) {
            (Mode::Window, Some(ns)) => format!("observed for {}", fmt_ns(ns)),
            _ => "snapshot".into(),
        },
        r.guarded,
        r.housekeeping
    );
    for c in &r.cpus {
        let owners = if c.owners.is_empty() {
            "no vCPU assigned".to_string()
        } else {
            c.owners
                .iter()
                .map(|o| format!("{} vCPU {} (tid {})", o.vm, o.vcpu, o.tid))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "\nCPU {}: owner {owners}; {} violation(s)",
            c.cpu,
            c.violations.len()
        );
        match r.mode {
            Mode::Snapshot => {
                let rows: Vec<Vec<String>> = c
                    .threads
                    .iter()
                    .map(|t| {
                        vec![
                            t.class.name().to_string(),
                            t.tid.to_string(),
                            t.pid.to_string(),
                            t.comm.clone(),
                            t.sched.map_or("-".into(), |v| v.to_string()),
                            t.last_cpu.map_or("-".into(), |v| v.to_string()),
                            t.affinity.as_ref().map_or("-".into(), |a| a.to_string()),
                            vm_cell(t),
                            format!("{}{}", status_prefix(t), t.note),
                        ]
                    })
                    .collect();
                s.push_str(&table(
                    &[
                        "CLASS", "TID", "PID", "COMM", "SCHED", "LAST CPU", "AFFINITY", "VM/VCPU",
                        "NOTE",
                    ],
                    &rows,
                ));
            }
            Mode::Window => {
                if let Some(time) = &c.time {
                    let order = [
                        "vcpu",
                        "kernel",
                        "allowed",
                        "intruder_user",
                        "intruder_kthread",
                        "idle",
                        UNATTRIBUTED,
                    ];
                    let parts: Vec<String> = order
                        .iter()
                        .filter_map(|k| {
                            time.get(k)
                                .filter(|t| *k != UNATTRIBUTED || t.ns > 0)
                                .map(|t| format!("{k} {} ({:.1}%)", fmt_ns(t.ns), t.pct))
                        })
                        .collect();
                    let _ = writeln!(s, "  time: {}", parts.join(", "));
                    if time.get(UNATTRIBUTED).is_some_and(|t| t.pct >= 1.0) {
                        s.push_str(
                            "  (unattributed: a thread was still running when the window ended; \
                             its slice is counted when it switches out)\n",
                        );
                    }
                }
                if c.threads.is_empty() {
                    s.push_str("  no intruders\n");
                } else {
                    let rows: Vec<Vec<String>> = c
                        .threads
                        .iter()
                        .map(|t| {
                            vec![
                                t.class.name().to_string(),
                                t.tid.to_string(),
                                t.pid.to_string(),
                                t.comm.clone(),
                                fmt_ns(t.run_ns.unwrap_or(0)),
                                t.slices.unwrap_or(0).to_string(),
                                fmt_ns(t.max_slice_ns.unwrap_or(0)),
                                t.affinity
                                    .as_ref()
                                    .map_or("exited".into(), |a| a.to_string()),
                                vm_cell(t),
                            ]
                        })
                        .collect();
                    s.push_str(&table(
                        &[
                            "CLASS", "TID", "PID", "COMM", "RUN", "SLICES", "LONGEST", "AFFINITY",
                            "VM/VCPU",
                        ],
                        &rows,
                    ));
                }
                if let Some(m) = &c.migrations
                    && !m.is_empty()
                {
                    let total: u64 = m.iter().map(|m| m.count).sum();
                    let _ = writeln!(s, "  migrations onto CPU {}: {total}", c.cpu);
                    for m in m {
                        let _ = writeln!(
                            s,
                            "    {} (tid {}, pid {}) x{} from CPU {}",
                            m.comm, m.tid, m.pid, m.count, m.from_cpus
                        );
                    }
                }
                if let Some(v) = &c.vcpus_off {
                    for v in v {
                        let _ = writeln!(s, "  VIOLATION vcpu_off_cpu: {}", {
                            c.violations
                                .iter()
                                .find(|x| x.kind == Finding::VcpuOffCpu && x.tid == v.tid)
                                .map_or_else(String::new, |x| x.detail.clone())
                        });
                    }
                }
            }
        }
    }
    s.push('\n');
    for w in &r.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    let kinds: BTreeSet<Finding> = r
        .cpus
        .iter()
        .flat_map(|c| &c.violations)
        .map(|v| v.kind)
        .collect();
    for k in &kinds {
        let _ = writeln!(s, "fix {}", k.hint(&r.housekeeping));
    }
    let _ = writeln!(
        s,
        "Summary: {} violation(s), {} warning(s) on guarded CPUs {}{}.",
        r.summary.violations,
        r.summary.warnings,
        r.guarded,
        match r.summary.events_lost {
            Some(n) if n > 0 => format!("; {n} events lost"),
            _ => String::new(),
        }
    );
    s
}
