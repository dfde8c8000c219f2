//! Helpers shared by the subcommands: running commands visibly, locating the
//! workspace and its build outputs.
use std::{
    ffi::OsString,
    path::PathBuf,
    process::{Command, ExitStatus, Output},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cargo that started us, so nested builds use the same toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// aya-build looks bpf-linker up on PATH, and a non-login shell (CI, sudo) may
/// lack `~/.cargo/bin`; make sure every child we start can find it.
pub fn put_cargo_bin_on_path() {
    let Some(bin) = cargo_bin_dir() else { return };
    let current = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&current).any(|p| p == bin) {
        return;
    }
    let mut paths = vec![bin];
    paths.extend(std::env::split_paths(&current));
    if let Ok(joined) = std::env::join_paths(paths) {
        // SAFETY: called first thing in main, before any thread is started.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

/// The PATH with `dir` in front (for one child's environment).
pub fn path_with(dir: &str) -> OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![PathBuf::from(dir)];
    paths.extend(std::env::split_paths(&current));
    std::env::join_paths(paths).unwrap_or(current)
}

/// A command as the user would type it.
pub fn show(cmd: &Command) -> String {
    // Our cargo is an absolute rustup path; "cargo" is what the user would type.
    let program = match std::env::var_os("CARGO") {
        Some(c) if c == cmd.get_program() => std::ffi::OsStr::new("cargo"),
        _ => cmd.get_program(),
    };
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Runs `cmd` with inherited stdio, announcing it as `who: running ...`.
pub fn run(who: &str, cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    eprintln!("{who}: running {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({})", describe(status));
    }
    Ok(())
}

/// Runs a probe quietly; `None` when it cannot start or fails.
pub fn probe(cmd: &mut Command) -> Option<Output> {
    cmd.output().ok().filter(|o| o.status.success())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Cargo's target directory (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("could not run `cargo metadata`")?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("`cargo metadata` printed invalid JSON")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("`cargo metadata` has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// target/release/pinguard, absolute.
pub fn pinguard_bin() -> Result<PathBuf> {
    Ok(target_dir()?.join("release").join("pinguard"))
}

pub fn fmt_secs(d: std::time::Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
