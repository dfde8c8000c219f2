//! The report as a human table: one row per item, the detail wrapped, fixes
//! kept on unbroken lines so they can be copied.
use super::{Report, Status};

const STATUS_W: usize = 8;
const ITEM_W: usize = 18;

/// The table for a terminal `width` columns wide (the detail column never
/// narrower than 40).
pub fn table(report: &Report, width: usize) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Guarded CPUs: {}   Housekeeping CPUs: {}\n\n",
        report.guarded, report.housekeeping
    ));
    s.push_str(&format!(
        "{:<STATUS_W$}{:<ITEM_W$}DETAIL / fix\n",
        "STATUS", "ITEM"
    ));
    let indent = " ".repeat(STATUS_W + ITEM_W);
    let detail_w = width.saturating_sub(STATUS_W + ITEM_W).max(40);
    for item in &report.items {
        let mut lines = Vec::new();
        for para in item.message.lines() {
            lines.extend(wrap(para, detail_w));
        }
        if let Some(fix) = &item.fix {
            for (i, l) in fix.lines().enumerate() {
                lines.push(if i == 0 {
                    format!("fix: {l}")
                } else {
                    format!("     {l}")
                });
            }
        }
        for (i, line) in lines.iter().enumerate() {
            if i == 0 {
                s.push_str(&format!(
                    "{:<STATUS_W$}{:<ITEM_W$}{line}\n",
                    item.status.to_string(),
                    item.id
                ));
            } else {
                s.push_str(&format!("{indent}{line}\n"));
            }
        }
    }
    let sum = report.summary;
    s.push_str(&format!(
        "\n{} passed, {} warned, {} failed",
        sum.pass, sum.warn, sum.fail
    ));
    s.push_str(match report.items.iter().map(|i| i.status).max() {
        Some(Status::Fail) => " (exit 1).\n",
        _ => ".\n",
    });
    if let Some(params) = &report.kernel_cmdline {
        s.push_str(&format!(
            "\nKernel parameters for these CPUs, all at once:\n  {params}\n\
             Add them {}.\n",
            report.boot.howto()
        ));
    }
    s
}

/// Greedy word wrap; words longer than the width stay whole.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::{
        super::{check, fixtures::*},
        *,
    };

    #[test]
    fn table_layout() {
        let report = check(&fixture("small-2cpu"), Some(&set("1"))).unwrap();
        let text = table(&report, 100);
        assert!(
            text.starts_with("Guarded CPUs: 1   Housekeeping CPUs: 0\n"),
            "{text}"
        );
        assert!(
            text.contains("STATUS  ITEM              DETAIL / fix\n"),
            "{text}"
        );
        assert!(
            text.contains("\nFAIL    isolcpus          isolcpus= is not on"),
            "{text}"
        );
        // Fix commands are never wrapped.
        assert!(
            text.contains(
                "fix: for irq in 1 9 16 24; do echo 0 > /proc/irq/$irq/smp_affinity_list; done\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("0 passed, 8 warned, 4 failed (exit 1).\n"),
            "{text}"
        );
        assert!(
            text.contains("isolcpus=managed_irq,domain,1 rcu_nocbs=1 irqaffinity=0"),
            "{text}"
        );
        for line in text.lines() {
            if !line.contains("fix:") && !line.trim_start().starts_with("IRQ ") {
                // Wrapped detail stays inside the width (fix lines and the GRUB hint may not).
                let is_fix_cont = line.starts_with(&" ".repeat(STATUS_W + ITEM_W + 5));
                if !is_fix_cont && !line.starts_with("Add them") {
                    assert!(line.len() <= 100, "too long: {line:?}");
                }
            }
        }

        let good = check(&fixture("intel-2s16c2t"), None).unwrap();
        let text = table(&good, 100);
        assert!(text.contains("12 passed, 0 warned, 0 failed.\n"), "{text}");
        assert!(!text.contains("Kernel parameters"), "{text}");
        assert!(!text.contains("fix:"), "{text}");
    }

    #[test]
    fn wraps_words() {
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
        assert_eq!(wrap("", 6), vec![""]);
        assert_eq!(wrap("toolongword x", 4), vec!["toolongword", "x"]);
    }
}
