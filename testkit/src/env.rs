//! What this machine offers the tests (root, BTF, KVM), and the binary under test.
use std::path::{Path, PathBuf};

/// Set in CI: a test that cannot run (not root, no KVM, no BPF) fails instead of skipping.
pub const REQUIRE_ENV: &str = "PINGUARD_REQUIRE_PRIVILEGED";

pub fn require_privileged() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Returns true when the test may run. When `missing` names something this
/// machine lacks, the test is skipped with a message, or fails under
/// `PINGUARD_REQUIRE_PRIVILEGED=1`.
pub fn can_run(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(what) if require_privileged() => {
            panic!("{test}: cannot run ({what}) and {REQUIRE_ENV}=1 forbids skipping")
        }
        Some(what) => {
            eprintln!("SKIP {test}: {what}");
            false
        }
    }
}

/// Skips (or, in CI, fails) the calling test when `$missing` is `Some`.
#[macro_export]
macro_rules! require {
    ($missing:expr) => {
        if !$crate::env::can_run(module_path!(), $missing) {
            return;
        }
    };
}

/// What is missing for tests that load eBPF programs (root, BTF, tracefs).
pub fn missing_bpf() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("kernel BTF (/sys/kernel/btf/vmlinux) is missing".into());
    }
    None
}

/// What is missing to start QEMU/KVM guests (see [`crate::guest`]).
pub fn missing_kvm_guests() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing".into());
    }
    if which::which("qemu-system-x86_64").is_err() {
        return Some("qemu-system-x86_64 is not installed (run `cargo xtask setup`)".into());
    }
    None
}

/// What is missing for tests that run pinguard against QEMU/KVM guests.
pub fn missing_kvm() -> Option<String> {
    missing_bpf().or_else(missing_kvm_guests)
}

/// The pinguard binary under test: `PINGUARD_BIN` (set by `cargo xtask test`),
/// else the workspace's release, then debug build.
pub fn pinguard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PINGUARD_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("pinguard");
        if p.is_file() {
            return p;
        }
    }
    panic!("pinguard binary not found: run `cargo build --release` or set PINGUARD_BIN")
}
