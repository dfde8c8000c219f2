//! Drawing a [`View`] with ratatui: the guarded CPUs, the intruders, the
//! daemon's recent violations and enforcement actions. Pure given a frame:
//! unit-tested on ratatui's `TestBackend`.
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style, Stylize as _},
    text::Line,
    widgets::{Block, Paragraph, Row, Table},
};

use crate::{
    top::model::{Share, View},
    units::fmt_ns,
};

/// What the title line says besides the view.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Where the numbers come from.
    pub source: String,
    /// The last reading failed (the daemon went away): why; the screen keeps
    /// the last good view.
    pub error: Option<String>,
}

pub fn draw(frame: &mut Frame, view: &View, status: &Status) {
    let cpu_rows = view.cpus.len().max(1) as u16;
    let [title, cpus, intruders, bottom] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(cpu_rows + 3),
        Constraint::Min(5),
        Constraint::Length(8),
    ])
    .areas(frame.area());
    draw_title(frame, title, view, status);
    draw_cpus(frame, cpus, view);
    draw_intruders(frame, intruders, view);
    let [violations, actions] =
        Layout::horizontal([Constraint::Percentage(65), Constraint::Percentage(35)]).areas(bottom);
    draw_violations(frame, violations, view);
    draw_actions(frame, actions, view);
}

fn draw_title(frame: &mut Frame, area: Rect, view: &View, status: &Status) {
    let mut lines = vec![Line::from(vec![
        "pinguard top".bold(),
        format!("  source: {}", status.source).into(),
    ])];
    lines.push(match &status.error {
        Some(e) => Line::from(format!("reading failed (last good view shown): {e}")).red(),
        None => Line::from(format!(
            "refresh 1s  sort: {} (s cycles)  q quits",
            view.sort.as_str()
        )),
    });
    frame.render_widget(Paragraph::new(lines), area);
}

fn header(cells: &[&'static str]) -> Row<'static> {
    Row::new(cells.to_vec()).style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED))
}

fn percent(p: Option<&[f64; 5]>, share: Share) -> String {
    p.map_or_else(|| "-".into(), |p| format!("{:.1}", p[share.index()]))
}

fn noise(count: u64, ns: u64) -> String {
    if count == 0 {
        "-".into()
    } else {
        format!("{count}x {}", fmt_ns(ns))
    }
}

fn draw_cpus(frame: &mut Frame, area: Rect, view: &View) {
    let rows = view.cpus.iter().map(|c| {
        let p = c.percent.as_ref();
        let mut row = Row::new(vec![
            c.cpu.to_string(),
            c.owner.clone().unwrap_or_else(|| "-".into()),
            percent(p, Share::Vcpu),
            percent(p, Share::Kernel),
            percent(p, Share::Allowed),
            percent(p, Share::Intruder),
            percent(p, Share::Idle),
            noise(c.irqs, c.irq_ns),
            noise(c.softirqs, c.softirq_ns),
        ]);
        if p.is_some_and(|p| p[Share::Intruder.index()] > 0.0) {
            row = row.red();
        }
        row
    });
    // As wide as the longest owner: the spare width stays at the right.
    let owner_width = view
        .cpus
        .iter()
        .filter_map(|c| c.owner.as_ref().map(|o| o.chars().count()))
        .max()
        .unwrap_or(0)
        .max("OWNER".len()) as u16;
    let widths = [
        Constraint::Length(4),
        Constraint::Length(owner_width),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(14),
        Constraint::Length(14),
    ];
    let table = Table::new(rows, widths)
        .header(header(&[
            "CPU", "OWNER", "VCPU%", "KERN%", "ALLOW%", "INTRUD%", "IDLE%", "IRQ", "SOFTIRQ",
        ]))
        .block(Block::bordered().title(" guarded CPUs (last interval) "));
    frame.render_widget(table, area);
}

fn draw_intruders(frame: &mut Frame, area: Rect, view: &View) {
    let rows = view.intruders.iter().map(|i| {
        let row = Row::new(vec![
            i.cpu.to_string(),
            i.tid.to_string(),
            i.tgid.to_string(),
            i.comm.clone(),
            i.class.as_str().to_string(),
            if i.is_current() {
                fmt_ns(i.recent_ns)
            } else {
                "-".into()
            },
            fmt_ns(i.total_ns),
            i.slices.to_string(),
            fmt_ns(i.max_slice_ns),
        ]);
        if i.is_current() { row.red() } else { row }
    });
    let widths = [
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(8),
        // A kernel comm is at most 15 characters.
        Constraint::Length(15),
        Constraint::Length(16),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(10),
    ];
    let current = view.intruders.iter().filter(|i| i.is_current()).count();
    let table = Table::new(rows, widths)
        .header(header(&[
            "CPU", "TID", "PID", "COMM", "CLASS", "LAST", "TOTAL", "SLICES", "LONGEST",
        ]))
        .block(Block::bordered().title(format!(
            " intruders: {current} ran in the last interval, {} seen; sorted by {} ",
            view.intruders.len(),
            view.sort.as_str()
        )));
    frame.render_widget(table, area);
}

/// Seconds since the epoch as UTC `HH:MM:SS`.
fn clock(epoch: f64) -> String {
    let s = epoch.max(0.0) as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn draw_violations(frame: &mut Frame, area: Rect, view: &View) {
    let block = Block::bordered().title(" recent violations (UTC) ");
    let lines: Vec<Line> = if view.actions.is_none() {
        vec![Line::from(
            "only a daemon records violations: pinguard top --url http://HOST:PORT",
        )]
    } else if view.violations.is_empty() {
        vec![Line::from("none")]
    } else {
        view.violations
            .iter()
            .map(|v| {
                let who = match (&v.vm, v.vcpu) {
                    (Some(vm), Some(i)) => format!(" {vm}/vcpu{i}"),
                    _ => String::new(),
                };
                let thread = if v.tid == 0 {
                    String::new()
                } else {
                    format!(" {} ({})", v.comm, v.tid)
                };
                Line::from(format!(
                    "{} {:<16} CPU {}{thread}{who}: {}",
                    clock(v.time),
                    v.kind,
                    v.cpu,
                    v.detail
                ))
            })
            .collect()
    };
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

fn draw_actions(frame: &mut Frame, area: Rect, view: &View) {
    let block = Block::bordered().title(" enforcement (total, +last) ");
    // The daemon exports its counters from the start, zero-valued: only
    // what happened is listed.
    let happened: Option<Vec<_>> = view
        .actions
        .as_ref()
        .map(|a| a.iter().filter(|r| r.total > 0).collect());
    let lines: Vec<Line> = match happened {
        None => vec![Line::from("none: top only observes")],
        Some(a) if a.is_empty() => vec![Line::from("none yet")],
        Some(a) => a
            .into_iter()
            .map(|r| {
                let line = Line::from(format!("{:<20} {:>6} +{}", r.what, r.total, r.recent));
                if r.recent > 0 { line.yellow() } else { line }
            })
            .collect(),
    };
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::top::model::{
        SortKey, ViolationRecord,
        tests::{intruder, snapshot},
        view,
    };

    fn screen(view: &View, status: &Status) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
        t.draw(|f| draw(f, view, status)).unwrap();
        let buf = t.backend().buffer();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    fn line_with<'a>(screen: &'a [String], needle: &str) -> &'a str {
        screen
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} on screen:\n{}", screen.join("\n")))
    }

    #[test]
    fn cpus_and_intruders_are_on_screen() {
        let mut prev = snapshot([0; 5], vec![intruder(1, 4242, "stress-ng", 0, 0)]);
        // No noise before: the current totals are the interval's.
        prev.cpus.get_mut(&1).unwrap().irqs = 0;
        prev.cpus.get_mut(&1).unwrap().irq_ns = 0;
        prev.cpus.get_mut(&1).unwrap().softirqs = 0;
        prev.cpus.get_mut(&1).unwrap().softirq_ns = 0;
        let cur = snapshot(
            [500, 0, 0, 500, 0],
            vec![intruder(1, 4242, "stress-ng", 2_000_000, 1_500_000)],
        );
        let v = view(Some(&prev), &cur, SortKey::Recent);
        let s = screen(
            &v,
            &Status {
                source: "kernel maps".into(),
                error: None,
            },
        );
        let cpu = line_with(&s, "web/vcpu0");
        for want in ["50.0", "2x 1.0µs", "4x 3.0µs"] {
            assert!(cpu.contains(want), "{want:?} missing from CPU row: {cpu}");
        }
        let i = line_with(&s, "stress-ng");
        for want in ["4242", "intruder_user", "2.00ms", "1.50ms"] {
            assert!(i.contains(want), "{want:?} missing from intruder row: {i}");
        }
        line_with(&s, "sorted by last interval");
        line_with(&s, "only a daemon records violations");
        line_with(&s, "none: top only observes");
    }

    #[test]
    fn a_daemon_s_violations_actions_and_a_failed_reading() {
        let mut cur = snapshot([0; 5], vec![]);
        cur.violations = vec![ViolationRecord {
            time: 3_723.0,
            kind: "intruder".into(),
            cpu: 1,
            tid: 77,
            comm: "pg-x".into(),
            vm: None,
            vcpu: None,
            detail: "user thread ran 2.00ms".into(),
        }];
        cur.actions = Some(
            [
                ("evict CPU 1".to_string(), 3),
                ("error evict EPERM".to_string(), 0),
            ]
            .into(),
        );
        let v = view(None, &cur, SortKey::Total);
        let s = screen(
            &v,
            &Status {
                source: "daemon at http://127.0.0.1:9477".into(),
                error: Some("connection refused".into()),
            },
        );
        line_with(
            &s,
            "01:02:03 intruder         CPU 1 pg-x (77): user thread ran 2.00ms",
        );
        let a = line_with(&s, "evict CPU 1");
        assert!(a.contains("3 +3"), "{a}");
        assert!(
            !s.iter().any(|l| l.contains("EPERM")),
            "a counter still at zero is listed:\n{}",
            s.join("\n")
        );
        line_with(
            &s,
            "reading failed (last good view shown): connection refused",
        );
        line_with(&s, "daemon at http://127.0.0.1:9477");
    }
}
