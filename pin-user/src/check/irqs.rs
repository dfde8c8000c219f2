//! Device IRQs whose affinity reaches guarded CPUs, and the commands that
//! move them to housekeeping CPUs.
use std::{collections::BTreeMap, fs, os::unix::fs::PermissionsExt, path::Path};

use super::{Ctx, Item, Status, not_ok, pass, read_opt, unreadable};
use crate::host::{cpulist::CpuSet, irq};

/// An IRQ whose affinity reaches guarded CPUs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IrqFinding {
    pub irq: u32,
    /// Handler names from /proc/interrupts ("ehci_hcd:usb1, i801_smbus").
    pub action: String,
    /// `smp_affinity_list`: where the IRQ may be delivered.
    pub affinity: CpuSet,
    /// `effective_affinity_list`: where it is delivered now (absent on old kernels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective: Option<CpuSet>,
    /// False when the kernel refuses affinity changes (managed or per-CPU IRQs).
    pub movable: bool,
    /// The affinity already excludes guarded CPUs but the effective one does
    /// not yet: the kernel moves it when it next fires.
    pub pending: bool,
    /// Housekeeping CPUs to move it to (those on the device's NUMA node when there are any).
    pub target: CpuSet,
}

impl IrqFinding {
    /// A command moves it now: not kernel-managed, not already on its way.
    fn to_move(&self) -> bool {
        self.movable && !self.pending
    }

    /// One line of the item's message.
    fn describe(&self) -> String {
        let eff = self
            .effective
            .as_ref()
            .map(|e| format!(", effective {e}"))
            .unwrap_or_default();
        let note = if !self.movable {
            " [kernel-managed: cannot be moved]"
        } else if self.pending {
            " [move pending: happens at its next interrupt]"
        } else {
            ""
        };
        format!(
            "IRQ {} ({}): affinity {}{eff}{note}",
            self.irq, self.action, self.affinity
        )
    }
}

/// IRQ number -> handler names, from /proc/interrupts.
fn parse_interrupts(text: &str) -> BTreeMap<u32, String> {
    let mut lines = text.lines();
    let ncpu = lines.next().map_or(0, |h| {
        h.split_whitespace()
            .filter(|w| w.starts_with("CPU"))
            .count()
    });
    let mut out = BTreeMap::new();
    for line in lines {
        let Some((irq, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(irq) = irq.trim().parse::<u32>() else {
            // LOC, NMI, ...: per-CPU vectors without /proc/irq directories.
            continue;
        };
        let mut words = rest.split_whitespace().skip(ncpu);
        // Then: chip name, hwirq (x86 glues the flow name on: "9-fasteoi"),
        // an optional "Level"/"Edge" and "-name", then the actions.
        let _chip = words.next();
        let _hwirq = words.next();
        let rest: Vec<&str> = words
            .skip_while(|w| matches!(*w, "Level" | "Edge") || w.starts_with('-'))
            .collect();
        out.insert(irq, rest.join(" "));
    }
    out
}

/// "IRQ 24" or "IRQs 1 9 16".
fn irq_numbers(v: &[&IrqFinding]) -> String {
    let s: Vec<String> = v.iter().map(|f| f.irq.to_string()).collect();
    format!(
        "{} {}",
        if v.len() == 1 { "IRQ" } else { "IRQs" },
        s.join(" ")
    )
}

/// Lists up to `max` lines, then how many were left out.
fn capped(lines: &[String], max: usize) -> String {
    let mut out: Vec<String> = lines.iter().take(max).cloned().collect();
    if lines.len() > max {
        out.push(format!("... and {} more (see --json)", lines.len() - max));
    }
    out.join("\n")
}

/// What a walk over /proc/irq found.
struct Scan {
    /// IRQs that may fire on guarded CPUs, by number.
    findings: Vec<IrqFinding>,
    /// How many IRQs could fire at all (have a handler and a readable affinity).
    checked: usize,
}

impl Ctx<'_> {
    pub(super) fn irqs(&self) -> Item {
        const ID: &str = "irqs";
        let g = self.guarded;
        let Scan { findings, checked } = match self.scan_irqs() {
            Ok(scan) => scan,
            Err(item) => return item,
        };
        if findings.is_empty() {
            return pass(
                ID,
                format!(
                    "none of the {checked} device IRQs may fire on guarded CPUs {g} (IRQ 0, 2 and per-CPU vectors are not movable and not counted)"
                ),
            );
        }
        let lines: Vec<String> = findings.iter().map(IrqFinding::describe).collect();
        let message = format!(
            "{} of {checked} IRQs may fire on guarded CPUs {g}:\n{}",
            findings.len(),
            capped(&lines, 20)
        );
        // Only IRQs a command can move right now make this a failure.
        let status = if findings.iter().any(IrqFinding::to_move) {
            Status::Fail
        } else {
            Status::Warn
        };
        let mut item = not_ok(ID, status, message, self.irq_fixes(&findings).join("\n"));
        item.irqs = findings;
        item
    }

    /// Walks /proc/irq; an unreadable /proc is the item's verdict.
    fn scan_irqs(&self) -> Result<Scan, Item> {
        const ID: &str = "irqs";
        let irq_dir = self.host.proc.join("irq");
        let interrupts_path = self.host.proc.join("interrupts");
        let interrupts = match read_opt(&interrupts_path) {
            Ok(Some(t)) => Some(parse_interrupts(&t)),
            Ok(None) => None,
            Err(e) => return Err(unreadable(ID, &interrupts_path, &e)),
        };
        let mut numbers: Vec<u32> = match fs::read_dir(&irq_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect(),
            Err(e) => return Err(unreadable(ID, &irq_dir, &e)),
        };
        numbers.sort_unstable();
        let mut scan = Scan {
            findings: Vec::new(),
            checked: 0,
        };
        for irq in numbers {
            // The system timer and the PIC cascade stay where the kernel put them.
            if irq == 0 || irq == 2 {
                continue;
            }
            let dir = irq_dir.join(irq.to_string());
            let listed = interrupts.as_ref().and_then(|m| m.get(&irq));
            let action = match listed {
                Some(a) => a.clone(),
                None => irq::actions(&dir).join(", "),
            };
            if listed.is_none() && action.is_empty() {
                // Allocated without a handler: it cannot fire.
                continue;
            }
            let list_path = dir.join("smp_affinity_list");
            let Ok(Some(text)) = read_opt(&list_path) else {
                // Freed while we looked.
                continue;
            };
            let Ok(affinity) = CpuSet::parse(&text) else {
                continue;
            };
            scan.checked += 1;
            let effective = read_opt(&dir.join("effective_affinity_list"))
                .ok()
                .flatten()
                .and_then(|t| CpuSet::parse(&t).ok());
            let reach = affinity.union(effective.as_ref().unwrap_or(&CpuSet::new()));
            if reach.intersects(self.guarded) {
                scan.findings
                    .push(self.finding(irq, &dir, action, affinity, effective));
            }
        }
        Ok(scan)
    }

    /// The details of an IRQ that reaches guarded CPUs: can it move, where to.
    fn finding(
        &self,
        irq: u32,
        dir: &Path,
        action: String,
        affinity: CpuSet,
        effective: Option<CpuSet>,
    ) -> IrqFinding {
        // Kernels that refuse affinity changes (managed, per-CPU) make the file read-only.
        let movable = fs::metadata(dir.join("smp_affinity_list"))
            .map(|m| m.permissions().mode() & 0o200 != 0)
            .unwrap_or(true);
        let node: Option<u32> = read_opt(&dir.join("node"))
            .ok()
            .flatten()
            .and_then(|t| t.trim().parse().ok());
        let target = node
            .and_then(|n| self.topo.nodes.get(&n))
            .map(|cpus| cpus.intersection(self.housekeeping))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| self.housekeeping.clone());
        // x86 IO-APIC and similar defer a move until the IRQ next fires.
        let pending = !affinity.intersects(self.guarded);
        IrqFinding {
            pending,
            irq,
            action: if action.is_empty() {
                "?".into()
            } else {
                action
            },
            affinity,
            effective,
            movable,
            target,
        }
    }

    /// One command per target set (grouping IRQs that go to the same CPUs),
    /// then what cannot or need not be moved now.
    fn irq_fixes(&self, findings: &[IrqFinding]) -> Vec<String> {
        let mut by_target: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for f in findings.iter().filter(|f| f.to_move()) {
            by_target
                .entry(f.target.to_string())
                .or_default()
                .push(f.irq);
        }
        let mut fixes: Vec<String> = by_target
            .iter()
            .map(|(target, irqs)| match irqs.as_slice() {
                [one] => format!("echo {target} > /proc/irq/{one}/smp_affinity_list"),
                many => format!(
                    "for irq in {}; do echo {target} > /proc/irq/$irq/smp_affinity_list; done",
                    many.iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            })
            .collect();
        let managed: Vec<&IrqFinding> = findings.iter().filter(|f| !f.movable).collect();
        if !managed.is_empty() {
            fixes.push(format!(
                "kernel-managed {} cannot be moved at runtime: {}",
                irq_numbers(&managed),
                self.grub_fix(super::cmdline::isolcpus_param(self.guarded))
            ));
        }
        let pending: Vec<&IrqFinding> =
            findings.iter().filter(|f| f.movable && f.pending).collect();
        if !pending.is_empty() {
            fixes.push(format!(
                "{}: affinity already excludes guarded CPUs, the kernel moves each at its next interrupt (nothing to do)",
                irq_numbers(&pending)
            ));
        }
        fixes
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::{check, fixtures::*},
        *,
    };
    use crate::host::Host;

    #[test]
    fn good_host_counts_only_irqs_that_can_fire() {
        let report = check(&fixture("intel-2s16c2t"), None).unwrap();
        // The unused IRQ 200 (affinity 0-63, no handler) and IRQ 0 are not counted.
        let irqs = report.item("irqs").unwrap();
        assert!(
            irqs.message.contains("none of the 6 device IRQs"),
            "{}",
            irqs.message
        );
    }

    #[test]
    fn device_irqs_move_to_housekeeping_cpus_on_their_node() {
        // Guarding CPU 1 too: it is a housekeeping CPU on this host.
        let report = check(&fixture("intel-2s16c2t"), Some(&set("1-15"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        let found: Vec<u32> = irqs.irqs.iter().map(|f| f.irq).collect();
        // 9 and 121 (effective CPU 1), plus 8 and 120 whose affinity includes CPU 1.
        assert_eq!(found, vec![8, 9, 120, 121]);
        // Device IRQs move to housekeeping CPUs on their own NUMA node.
        let f120 = irqs.irqs.iter().find(|f| f.irq == 120).unwrap();
        assert_eq!(f120.target, set("0,32-47"));
        assert_eq!(f120.action, "mlx5_comp0@pci:0000:3b:00.0");
        let fix = irqs.fix.as_deref().unwrap();
        assert!(
            fix.contains(
                "for irq in 120 121; do echo 0,32-47 > /proc/irq/$irq/smp_affinity_list; done"
            ),
            "{fix}"
        );
        assert!(
            fix.contains(
                "for irq in 8 9; do echo 0,16-63 > /proc/irq/$irq/smp_affinity_list; done"
            ),
            "{fix}"
        );
    }

    #[test]
    fn bad_host_lists_every_irq_on_the_guarded_cpu() {
        let report = check(&fixture("small-2cpu"), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        let found: Vec<(u32, &str)> = irqs
            .irqs
            .iter()
            .map(|f| (f.irq, f.action.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                (1, "i8042"),
                (9, "acpi"),
                (16, "ehci_hcd:usb1, i801_smbus"),
                (24, "virtio0-input.0"),
            ]
        );
        assert!(
            irqs.message
                .contains("IRQ 16 (ehci_hcd:usb1, i801_smbus): affinity 0-1, effective 1"),
            "{}",
            irqs.message
        );
        assert_eq!(
            irqs.fix.as_deref(),
            Some("for irq in 1 9 16 24; do echo 0 > /proc/irq/$irq/smp_affinity_list; done")
        );
    }

    #[test]
    fn managed_irqs_only_warn() {
        let dir = copy_fixture("small-2cpu");
        let root = dir.path();
        let read_only = |irq: u32| root.join(format!("proc/irq/{irq}/smp_affinity_list"));
        fs::set_permissions(read_only(24), fs::Permissions::from_mode(0o444)).unwrap();
        // Movable IRQs still fail; the managed one gets the boot-time fix.
        let report = check(&Host::under(root), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        assert_eq!(irqs.status, Status::Fail, "{irqs:#?}");
        let fix = irqs.fix.as_deref().unwrap();
        assert!(
            fix.starts_with(
                "for irq in 1 9 16; do echo 0 > /proc/irq/$irq/smp_affinity_list; done\n"
            ),
            "{fix}"
        );
        assert!(
            fix.contains("kernel-managed IRQ 24 cannot be moved at runtime: add isolcpus=managed_irq,domain,1 "),
            "{fix}"
        );
        assert!(
            irqs.message
                .contains("IRQ 24 (virtio0-input.0): affinity 1, effective 1 [kernel-managed"),
            "{}",
            irqs.message
        );
        // Every IRQ on CPU 1 is kernel-managed: read-only affinity files.
        for irq in [1, 9, 16, 24] {
            fs::set_permissions(read_only(irq), fs::Permissions::from_mode(0o444)).unwrap();
        }
        let report = check(&Host::under(root), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        assert_eq!(irqs.status, Status::Warn, "{irqs:#?}");
        assert!(irqs.irqs.iter().all(|f| !f.movable));
        assert!(irqs.message.contains("cannot be moved"), "{}", irqs.message);
        assert!(
            irqs.fix
                .as_deref()
                .unwrap()
                .contains("isolcpus=managed_irq,domain,1")
        );
    }

    #[test]
    fn pending_moves_only_warn() {
        let dir = copy_fixture("small-2cpu");
        let root = dir.path();
        // Written but not yet effective: IO-APIC IRQs move when they next fire.
        fs::write(root.join("proc/irq/16/smp_affinity_list"), "0\n").unwrap();
        let report = check(&Host::under(root), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        assert_eq!(irqs.status, Status::Fail);
        let f16 = irqs.irqs.iter().find(|f| f.irq == 16).unwrap();
        assert!(f16.pending && f16.movable);
        let fix = irqs.fix.as_deref().unwrap();
        assert!(
            fix.starts_with(
                "for irq in 1 9 24; do echo 0 > /proc/irq/$irq/smp_affinity_list; done\n"
            ),
            "{fix}"
        );
        assert!(
            fix.contains("IRQ 16: affinity already excludes guarded CPUs"),
            "{fix}"
        );
        assert!(irqs.message.contains("[move pending"), "{}", irqs.message);

        for irq in [1, 9, 24] {
            fs::write(
                root.join(format!("proc/irq/{irq}/smp_affinity_list")),
                "0\n",
            )
            .unwrap();
        }
        let report = check(&Host::under(root), Some(&set("1"))).unwrap();
        let irqs = report.item("irqs").unwrap();
        assert_eq!(irqs.status, Status::Warn, "{irqs:#?}");
        // IRQ 9 was already delivered to CPU 0, so it is fully moved.
        let found: Vec<u32> = irqs.irqs.iter().map(|f| f.irq).collect();
        assert_eq!(found, vec![1, 16, 24]);
        assert!(irqs.irqs.iter().all(|f| f.pending));
        assert!(
            !irqs.fix.as_deref().unwrap().contains("echo"),
            "{:?}",
            irqs.fix
        );
    }

    #[test]
    fn interrupts_parsing() {
        let text = "           CPU0       CPU1\n\
                      0:         40          0   IO-APIC   2-edge      timer\n\
                     16:          0        603   IO-APIC  16-fasteoi   ehci_hcd:usb1, i801_smbus\n\
                     30:          1          2   GICv3  30 Level     arch_timer\n\
                     44:          0          0  PCI-MSI 1-edge\n\
                    NMI:          0          0   Non-maskable interrupts\n\
                    ERR:          0\n";
        let m = parse_interrupts(text);
        assert_eq!(m[&0], "timer");
        assert_eq!(m[&16], "ehci_hcd:usb1, i801_smbus");
        assert_eq!(m[&30], "arch_timer");
        assert_eq!(m[&44], "");
        assert_eq!(m.len(), 4);
    }
}
