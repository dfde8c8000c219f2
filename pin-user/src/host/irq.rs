//! IRQ facts from `/proc/irq`.
use std::path::Path;

/// The names of an IRQ's actions: the subdirectories of its `/proc/irq/N`
/// directory, sorted (e.g. "virtio0-requests"); empty if it has none or is gone.
pub fn actions(irq_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(irq_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The names of a live IRQ's actions joined by commas, "" if it has none or is gone.
pub fn irq_name(irq: u32) -> String {
    actions(Path::new(&format!("/proc/irq/{irq}"))).join(",")
}
