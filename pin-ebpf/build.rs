use which::which;

/// Rebuild the eBPF object when bpf-linker changes (cargo cannot track it as a
/// dependency). A missing linker is reported by `cargo xtask setup`, which installs it.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
