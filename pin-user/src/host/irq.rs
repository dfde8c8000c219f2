//! IRQ facts from `/proc/irq`.

/// The names of an IRQ's actions (the subdirectories of /proc/irq/N), e.g.
/// "virtio0-requests"; "" if it has none or is gone.
pub fn irq_name(irq: u32) -> String {
    let Ok(rd) = std::fs::read_dir(format!("/proc/irq/{irq}")) else {
        return String::new();
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.join(",")
}
