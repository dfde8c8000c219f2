//! `cargo xtask setup`: detect what building and testing pinguard needs and
//! install only what is missing, saying what it does.
//!
//! Everything is detected first, so a non-root user learns in one go all that
//! needs root, instead of one failure per run.
use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::util;

/// Debian packages: LLVM 22 for bpf-linker (rustc's LLVM is 22, and bpf-linker
/// must link the bitcode rustc emits), QEMU for the guests the integration tests
/// start, promtool for the rule checks, and the benchmark/diagnostic tools.
pub const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "qemu-system-x86",
    "prometheus",
    "rt-tests",
    "stress-ng",
    "bpftool",
    "linux-perf",
    // The peers `cargo xtask bench --only peers` measures pinguard against.
    "bpftrace",
    // A TrueType font for the pictures `pinguard latency` draws.
    "fonts-dejavu-core",
    // libvirt, for the tests of pinguard on libvirt domains (libvirtd is
    // started by those tests when none runs: there may be no systemd).
    "libvirt-daemon-system",
    "libvirt-clients",
    // dpkg-shlibdeps, for the Debian package's Depends (`cargo xtask package`).
    "dpkg-dev",
];

/// The version known to build with LLVM 22 and work with this aya release.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const TRACEFS: &str = "/sys/kernel/tracing";
/// KVM's per-vCPU `pid` files (`kvm/<pid>-<fd>/vcpuN/pid`) live in debugfs:
/// the kernel's own vCPU -> thread map, for guests started without QMP or
/// thread names (most distributions mount it at boot).
const DEBUGFS: &str = "/sys/kernel/debug";
/// bpffs, where `pinguard run` pins its programs (crash-safe restarts). The
/// daemon mounts it itself when it can; mounted here so that the lab looks
/// like a systemd host before and after the tests.
const BPFFS: &str = "/sys/fs/bpf";

const W: &str = "setup";

#[derive(Default)]
struct State {
    nightly: Option<String>,
    rust_src: bool,
    apt_missing: Vec<&'static str>,
    bpf_linker: Option<String>,
    tracefs: bool,
    debugfs: bool,
    bpffs: bool,
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    let state = detect()?;
    report_present(&state);

    let needs_root = root_commands(&state);
    if !needs_root.is_empty() && !util::is_root() {
        bail!(
            "not root, and these need root: run as root (sudo -E cargo xtask setup) or do it yourself:\n  {}",
            needs_root.join("\n  ")
        );
    }

    let anything_missing = state.nightly.is_none()
        || !state.rust_src
        || !state.apt_missing.is_empty()
        || state.bpf_linker.is_none()
        || !state.tracefs
        || !state.debugfs
        || !state.bpffs;
    if state.nightly.is_none() {
        install_nightly()?;
    }
    if !state.rust_src {
        install_rust_src()?;
    }
    if !state.apt_missing.is_empty() {
        install_apt(&state.apt_missing)?;
    }
    if state.bpf_linker.is_none() {
        install_bpf_linker()?;
    }
    if !state.tracefs {
        mount("tracefs", TRACEFS)?;
    }
    if !state.debugfs {
        mount("debugfs", DEBUGFS)?;
    }
    if !state.bpffs {
        mount("bpf", BPFFS)?;
    }
    kvm_device_group()?;
    kube_validate()?;
    crd_validate()?;
    if anything_missing {
        eprintln!("{W}: done in {}", util::fmt_secs(started.elapsed()));
    }
    Ok(())
}

/// kubernetes-validate from PyPI: the Kubernetes API schemas of many
/// releases inside the package, so tests/tests/kubernetes.rs validates the
/// manifests offline. Installed into a venv in the target directory (no root).
const KUBE_VALIDATE_VERSION: &str = "1.37.0";

/// target/tools/venv/bin/kubernetes-validate.
pub fn kube_validate_bin() -> Result<std::path::PathBuf> {
    Ok(util::target_dir()?.join("tools/venv/bin/kubernetes-validate"))
}

/// The Prometheus operator's CRD schemas (PodMonitor, PrometheusRule) as
/// validators, from npm, and a YAML parser for the script that runs them
/// (tests/kubernetes/validate-crds.mjs). Installed into target/tools/node.
const CRD_NPM_PACKAGES: &[&str] = &["@kubernetes-models/prometheus-operator@6.0.0", "yaml@2.8.1"];

/// target/tools/node, whose node_modules the CRD validation script imports from.
pub fn node_tools_dir() -> Result<std::path::PathBuf> {
    Ok(util::target_dir()?.join("tools/node"))
}

fn crd_validate() -> Result<()> {
    let dir = node_tools_dir()?;
    let installed = |spec: &str| {
        let (name, version) = spec.rsplit_once('@').unwrap_or((spec, ""));
        std::fs::read_to_string(dir.join("node_modules").join(name).join("package.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["version"] == version)
    };
    if CRD_NPM_PACKAGES.iter().all(|p| installed(p)) {
        eprintln!(
            "{W}: ok: {} (npm, {})",
            CRD_NPM_PACKAGES.join(", "),
            dir.display()
        );
        return Ok(());
    }
    eprintln!(
        "{W}: installing {} into {} (npm)",
        CRD_NPM_PACKAGES.join(", "),
        dir.display()
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    util::run(
        W,
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .args(CRD_NPM_PACKAGES),
    )
    .context("npm install failed (no Node.js? apt-get install nodejs npm; offline? the npm registry must be reachable)")?;
    Ok(())
}

fn kube_validate() -> Result<()> {
    let bin = kube_validate_bin()?;
    let what = format!("kubernetes-validate {KUBE_VALIDATE_VERSION}");
    if probe_line(Command::new(&bin).arg("--version")).as_deref() == Some(KUBE_VALIDATE_VERSION) {
        eprintln!("{W}: ok: {what} ({})", bin.display());
        return Ok(());
    }
    let venv = bin
        .parent()
        .and_then(Path::parent)
        .context("kubernetes-validate's path has no venv")?;
    eprintln!("{W}: installing {what} into {} (pip)", venv.display());
    util::run(W, Command::new("python3").arg("-m").arg("venv").arg(venv)).context(
        "python3 -m venv failed: install python3 and python3-venv (apt-get install python3-venv)",
    )?;
    util::run(
        W,
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("kubernetes-validate=={KUBE_VALIDATE_VERSION}")),
    )
    .context("pip install kubernetes-validate failed (offline? PyPI must be reachable)")?;
    if probe_line(Command::new(&bin).arg("--version")).as_deref() != Some(KUBE_VALIDATE_VERSION) {
        bail!(
            "{} --version does not print {KUBE_VALIDATE_VERSION} after the install",
            bin.display()
        );
    }
    Ok(())
}

fn detect() -> Result<State> {
    let nightly = probe_line(Command::new("rustup").args(["run", "nightly", "rustc", "-V"]));
    let rust_src = nightly.is_some() && rust_src_present();
    Ok(State {
        nightly,
        rust_src,
        apt_missing: apt_missing()?,
        bpf_linker: probe_line(Command::new("bpf-linker").arg("--version")),
        tracefs: mounted("tracefs", TRACEFS),
        debugfs: mounted("debugfs", DEBUGFS),
        bpffs: mounted("bpf", BPFFS),
    })
}

fn report_present(s: &State) {
    let line = |ok: bool, what: &str| {
        let state = if ok { "ok" } else { "MISSING" };
        eprintln!("{W}: {state}: {what}");
    };
    match &s.nightly {
        Some(v) => line(true, &format!("nightly toolchain ({v})")),
        None => line(false, "nightly toolchain"),
    }
    line(s.rust_src, "rust-src (nightly)");
    for pkg in APT_PACKAGES {
        line(!s.apt_missing.contains(pkg), &format!("{pkg} (apt)"));
    }
    match &s.bpf_linker {
        Some(v) => line(true, v),
        None => line(false, "bpf-linker"),
    }
    line(s.tracefs, &format!("tracefs mounted at {TRACEFS}"));
    line(s.debugfs, &format!("debugfs mounted at {DEBUGFS}"));
    line(s.bpffs, &format!("bpffs mounted at {BPFFS}"));
}

/// What a non-root user would have to run themselves.
fn root_commands(s: &State) -> Vec<String> {
    let mut cmds = Vec::new();
    if !s.apt_missing.is_empty() {
        cmds.push(format!(
            "apt-get update && apt-get install -y {}",
            s.apt_missing.join(" ")
        ));
    }
    if !s.debugfs {
        cmds.push(format!("mount -t debugfs nodev {DEBUGFS}"));
    }
    if !s.tracefs {
        cmds.push(format!("mount -t tracefs nodev {TRACEFS}"));
    }
    if !s.bpffs {
        cmds.push(format!("mount -t bpf nodev {BPFFS}"));
    }
    cmds
}

/// First line of a successful command's stdout.
fn probe_line(cmd: &mut Command) -> Option<String> {
    let out = util::probe(cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or("").trim().to_string())
}

/// aya-build compiles `core` for the bpf target from source (`-Z build-std`).
fn rust_src_present() -> bool {
    probe_line(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .is_some_and(|sysroot| {
            Path::new(&sysroot)
                .join("lib/rustlib/src/rust/library/core/Cargo.toml")
                .is_file()
        })
}

fn apt_missing() -> Result<Vec<&'static str>> {
    // One dpkg-query for all packages; unknown ones are only reported on
    // stderr (and make it exit 1), so absence from stdout means "missing".
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(APT_PACKAGES)
        .output()
        .with_context(|| {
            format!(
                "could not run dpkg-query: setup supports Debian only; elsewhere install the equivalents of: {}",
                APT_PACKAGES.join(" ")
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name))
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

/// libvirt runs QEMU as `libvirt-qemu`, a member of group `kvm`: /dev/kvm
/// must be `root:kvm 0660`, as Debian's udev rule makes it. Hosts without
/// udev (containers, minimal VMs) leave it `root:root 0600`, and every
/// libvirt domain then fails with "Could not access KVM kernel module".
fn kvm_device_group() -> Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dev = std::path::Path::new("/dev/kvm");
    let Ok(meta) = std::fs::metadata(dev) else {
        return Ok(());
    };
    let Some(kvm_gid) = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"kvm")).then(|| f.get(2)?.parse::<u32>().ok())?
        })
    else {
        return Ok(());
    };
    if meta.gid() == kvm_gid && meta.mode() & 0o060 == 0o060 {
        return Ok(());
    }
    eprintln!("{W}: giving /dev/kvm to group kvm, mode 0660 (as udev would), for libvirt's QEMU");
    std::os::unix::fs::chown(dev, None, Some(kvm_gid)).context("chgrp kvm /dev/kvm")?;
    std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o660))
        .context("chmod 0660 /dev/kvm")?;
    Ok(())
}

fn mounted(fstype: &str, at: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == at && f[2] == fstype
        })
    })
}

fn install_nightly() -> Result<()> {
    eprintln!("{W}: installing the nightly toolchain (rustup)");
    util::run(
        W,
        Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]),
    )
    .context(
        "could not install the nightly toolchain (offline? the Rust release server must be reachable); \
         install it yourself: rustup toolchain install nightly --profile minimal",
    )
}

fn install_rust_src() -> Result<()> {
    eprintln!("{W}: installing rust-src for nightly (rustup)");
    util::run(
        W,
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
    .context(
        "could not add rust-src (offline?); add it yourself: rustup component add rust-src --toolchain nightly",
    )?;
    if !rust_src_present() {
        bail!("rust-src was added but nightly's sysroot still has no library sources");
    }
    Ok(())
}

fn install_apt(missing: &[&str]) -> Result<()> {
    let hint = format!(
        "install them yourself: apt-get install {}",
        missing.join(" ")
    );
    eprintln!("{W}: updating the package lists (apt-get update)");
    util::run(
        W,
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("apt-get update failed (offline, or another apt running?); {hint}"))?;
    eprintln!("{W}: installing {} (apt-get)", missing.join(", "));
    util::run(
        W,
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null()),
    )
    .with_context(|| {
        format!(
            "apt-get install failed (offline, Debian mirror unreachable, or apt locked?); {hint}"
        )
    })?;
    let still = apt_missing()?;
    let still: Vec<_> = still.iter().filter(|p| missing.contains(p)).collect();
    if !still.is_empty() {
        bail!("apt-get succeeded but these are still not installed: {still:?}");
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let llvm_config = Path::new(LLVM_BIN).join("llvm-config");
    if !llvm_config.is_file() {
        bail!(
            "{} is missing: bpf-linker must be built against LLVM 22 (apt-get install llvm-22-dev)",
            llvm_config.display()
        );
    }
    eprintln!(
        "{W}: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (cargo install; takes a few minutes)"
    );
    // bpf-linker's build script finds LLVM through the llvm-config on PATH.
    util::run(
        W,
        util::cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", util::path_with(LLVM_BIN)),
    )
    .context(
        "cargo install bpf-linker failed (offline? crates.io must be reachable); install it yourself: \
         PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --no-default-features --features llvm-22",
    )?;
    match probe_line(Command::new("bpf-linker").arg("--version")) {
        Some(v) => {
            eprintln!("{W}: installed {v}");
            Ok(())
        }
        None => bail!(
            "bpf-linker was installed but `bpf-linker --version` fails; is {} on PATH?",
            util::cargo_bin_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "~/.cargo/bin".into())
        ),
    }
}

fn mount(fstype: &str, at: &str) -> Result<()> {
    eprintln!("{W}: mounting {fstype} at {at}");
    util::run(W, Command::new("mount").args(["-t", fstype, "nodev", at])).with_context(|| {
        format!(
            "could not mount {fstype} (kernel without it, or no CAP_SYS_ADMIN in this container?)"
        )
    })?;
    if !mounted(fstype, at) {
        bail!("mount succeeded but {at} is still not a {fstype} mount");
    }
    Ok(())
}
