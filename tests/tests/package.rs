//! The Debian package (`cargo xtask package`) on this machine: `dpkg -i`,
//! the installed binary runs, its man pages and completions are where man
//! and the shells look, the unit points at it, and `dpkg --purge` leaves
//! none of its files behind, nor the unit's enablement.
//!
//! Needs root and dpkg, and the .deb in `PINGUARD_DEB` (set by `cargo xtask
//! test`, which builds it first). Refuses to run where pinguard is already
//! installed, by the package or by hand: purging would take the host's copy.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use testkit::{cpus, require, which};

const DEB_ENV: &str = "PINGUARD_DEB";
const PACKAGE: &str = "pinguard";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs and asserts success, returning stdout.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// dpkg's status of the package, or None when dpkg does not know it.
fn status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    let s = text(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty() && !s.ends_with("not-installed")).then_some(s)
}

/// What is missing to run, or why running here would harm the host.
fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root (dpkg -i)".into());
    }
    if which("dpkg").is_err() {
        return Some("dpkg is not installed (not Debian?)".into());
    }
    match std::env::var_os(DEB_ENV) {
        None => {
            return Some(format!(
                "{DEB_ENV} is unset: run `cargo xtask test`, or `cargo xtask package` and set it"
            ));
        }
        Some(p) if !Path::new(&p).is_file() => {
            return Some(format!(
                "{DEB_ENV}={} is not a file",
                Path::new(&p).display()
            ));
        }
        Some(_) => {}
    }
    None
}

/// Purges the package when dropped, so a failed assertion leaves no
/// pinguard installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if status().is_some() {
            let out = run("dpkg", &["--purge", PACKAGE]);
            if !out.status.success() {
                eprintln!(
                    "cleanup: dpkg --purge {PACKAGE} failed: {}",
                    text(&out.stderr)
                );
            }
        }
    }
}

#[test]
fn install_run_purge() {
    require!(missing());
    // Not a skip: a host with pinguard installed must not lose it to a test run.
    if let Some(s) = status() {
        panic!(
            "the {PACKAGE} package is already installed here ({s}); this test installs and purges it. \
             Run it on a host without pinguard, or `dpkg --purge {PACKAGE}` first"
        );
    }
    for path in ["/usr/bin/pinguard", "/etc/pinguard", "/usr/share/pinguard"] {
        assert!(
            !Path::new(path).exists(),
            "{path} exists without the package (a hand install?); this test would overwrite and then \
             delete it. Remove it first, or run elsewhere"
        );
    }
    let deb = PathBuf::from(std::env::var_os(DEB_ENV).unwrap());
    let deb = deb.to_str().expect("a UTF-8 .deb path");

    let field = |name: &str| ok("dpkg-deb", &["--field", deb, name]).trim().to_string();
    let version = field("Version");
    let depends = field("Depends");
    assert!(
        depends.contains("libc6 (>="),
        "Depends should name libc6 with a minimum version (dpkg-shlibdeps), got {depends:?}"
    );
    assert_eq!(field("Package"), PACKAGE);

    let _purge_on_exit = Installed;
    ok("dpkg", &["-i", deb]);
    let s = status().unwrap_or_default();
    assert_eq!(s, "install ok installed", "dpkg status after dpkg -i");

    // The binary, from where the package put it (not PATH: the test must see this one).
    let v = ok("/usr/bin/pinguard", &["--version"]);
    assert_eq!(
        v.trim(),
        format!("pinguard {}", version.replace('~', "-")),
        "pinguard --version against the package's Version {version}"
    );
    let (_, online) = cpus::online();
    let cpu = online.iter().next_back().copied().unwrap_or(0).to_string();
    let out = run("/usr/bin/pinguard", &["check", "--guard", &cpu]);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "pinguard check --guard {cpu} should run (exit 0 or 1), got {}:\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );

    // Files where the system looks for them.
    let files = ok("dpkg", &["-L", PACKAGE]);
    let files: Vec<&str> = files.lines().filter(|l| l.starts_with('/')).collect();
    for want in [
        "/usr/bin/pinguard",
        "/lib/systemd/system/pinguard.service",
        "/etc/pinguard/pinguard.toml",
        "/usr/share/man/man1/pinguard.1.gz",
        "/usr/share/man/man1/pinguard-run.1.gz",
        "/usr/share/bash-completion/completions/pinguard",
        "/usr/share/zsh/vendor-completions/_pinguard",
        "/usr/share/fish/vendor_completions.d/pinguard.fish",
        "/usr/share/pinguard/dashboards/grafana/pinguard.json",
        "/usr/share/pinguard/dashboards/prometheus/pinguard.rules.yml",
    ] {
        assert!(files.contains(&want), "dpkg -L lacks {want}: {files:#?}");
        assert!(Path::new(want).exists(), "{want} is listed but missing");
    }
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", PACKAGE]);
    assert!(
        conffiles.contains("/etc/pinguard/pinguard.toml"),
        "pinguard.toml must be a conffile (kept on upgrade, asked about when changed): {conffiles:?}"
    );
    let unit = std::fs::read_to_string("/lib/systemd/system/pinguard.service").unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/pinguard run --config /etc/pinguard/pinguard.toml"),
        "the unit must start the packaged binary:\n{unit}"
    );
    if which("man").is_ok() {
        let page = ok("man", &["-w", "pinguard-run"]);
        assert_eq!(page.trim(), "/usr/share/man/man1/pinguard-run.1.gz");
        let rendered = Command::new("man")
            .args(["-P", "cat", "pinguard-run"])
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let rendered = text(&rendered.stdout);
        assert!(
            rendered.contains("--config") && rendered.contains("SIGHUP"),
            "man pinguard-run should document --config and SIGHUP:\n{rendered}"
        );
    }
    if which("bash").is_ok() {
        let script =
            "source /usr/share/bash-completion/completions/pinguard && complete -p pinguard";
        let out = ok("bash", &["-c", script]);
        assert!(out.contains("pinguard"), "bash completion: {out}");
    }

    // An admin enables the unit (without starting it: no daemon runs here);
    // the purge must take the symlink along.
    let enabled = "/etc/systemd/system/multi-user.target.wants/pinguard.service";
    if which("systemctl").is_ok() {
        ok("systemctl", &["enable", "pinguard.service"]);
        assert!(
            Path::new(enabled).is_symlink(),
            "systemctl enable made no {enabled}"
        );
    }

    let dirs = [
        "/etc/pinguard",
        "/usr/share/pinguard",
        "/usr/share/doc/pinguard",
    ];
    ok("dpkg", &["--purge", PACKAGE]);
    assert_eq!(status(), None, "dpkg still knows {PACKAGE} after the purge");
    let left: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| {
            let p = Path::new(f);
            // Shared directories (/usr/bin, ...) stay; the package's own go.
            p.exists() && (!p.is_dir() || dirs.contains(f))
        })
        .collect();
    assert!(left.is_empty(), "dpkg --purge left these behind: {left:?}");
    // Nor the enablement, the mask set on removal, or deb-systemd-helper's state.
    for path in [
        enabled,
        "/etc/systemd/system/pinguard.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/pinguard.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-masked/pinguard.service",
    ] {
        assert!(
            !Path::new(path).exists() && !Path::new(path).is_symlink(),
            "dpkg --purge left {path} behind"
        );
    }
}
