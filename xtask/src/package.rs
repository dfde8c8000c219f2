//! `cargo xtask package`: the Debian package `target/debian/pinguard_VERSION_ARCH.deb`.
//!
//! The package is assembled in a staging tree and built with `dpkg-deb`, which
//! every Debian system has, so no packaging tool needs installing; Depends is
//! computed by `dpkg-shlibdeps` (dpkg-dev) from the libraries the binary links.
//! Man pages and completions come from the binary itself (`pinguard
//! manpages`, `pinguard completions`), so they always match its options.
//!
//! Nothing is enabled or started at install time: the daemon needs its
//! guarded CPUs chosen first. The maintainer scripts are debhelper's for a
//! unit installed without enabling it, and call no systemctl where systemd
//! does not run (a container, a chroot).
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{build, util};

const W: &str = "package";
const NAME: &str = "pinguard";
/// Where the unit in packaging/ expects the binary (a hand install), and where the package puts it.
const UNIT_BIN_FROM: &str = "ExecStart=/usr/local/bin/pinguard ";
const UNIT_BIN_TO: &str = "ExecStart=/usr/bin/pinguard ";
pub const DEFAULT_MAINTAINER: &str = "pinguard maintainers <pinguard@users.noreply.github.com>";
const HOMEPAGE: &str = "https://github.com/pinguard/pinguard";

/// setup, release build, then the package. Prints the .deb's path on stdout.
pub fn run(maintainer: &str) -> Result<()> {
    build::run()?;
    let deb = build_deb(maintainer)?;
    println!("{}", deb.display());
    Ok(())
}

/// The package from the release binary already built; returns the .deb's path.
pub fn build_deb(maintainer: &str) -> Result<PathBuf> {
    let bin = util::pinguard_bin()?;
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo xtask build` first",
            bin.display()
        );
    }
    let version = debian_version(&binary_version(&bin)?);
    let arch = command_line(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture (is this Debian?)")?;
    let out = util::target_dir()?.join("debian");
    let stage = out.join(format!("{NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    eprintln!("{W}: staging {}", stage.display());
    fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    fs::set_permissions(&stage, fs::Permissions::from_mode(0o755))?;
    let root = util::root();
    let tree = Tree(stage.clone());

    tree.copy(&bin, "usr/bin/pinguard", 0o755)?;
    // As dh_strip: no symbol table (the eBPF object inside is data, untouched).
    util::run(
        W,
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
            ])
            .arg(tree.path("usr/bin/pinguard")),
    )?;
    tree.write("lib/systemd/system/pinguard.service", &unit(&root)?, 0o644)?;
    tree.copy(
        &root.join("packaging/pinguard.toml"),
        "etc/pinguard/pinguard.toml",
        0o644,
    )?;
    tree.copy_dir(&root.join("dashboards"), "usr/share/pinguard/dashboards")?;
    man_pages(&bin, &tree, &out)?;
    completions(&bin, &tree)?;
    let (date, year, commit) = commit_date(&root)?;
    tree.write(
        "usr/share/doc/pinguard/copyright",
        COPYRIGHT.replace("{YEAR}", &year).as_bytes(),
        0o644,
    )?;
    let changelog = format!(
        "{NAME} ({version}) unstable; urgency=medium\n\n  * Built by `cargo xtask package` from commit {commit}.\n\n -- {maintainer}  {date}\n"
    );
    tree.write(
        "usr/share/doc/pinguard/changelog.gz",
        &gzip(changelog.as_bytes())?,
        0o644,
    )?;

    let depends = shlib_depends(&bin, &out)?;
    let installed_kib = dir_size(&stage)?.div_ceil(1024);
    let control = format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Suggests: rt-tests, fonts-dejavu-core\n\
         Section: admin\n\
         Priority: optional\n\
         Homepage: {HOMEPAGE}\n\
         Description: {DESCRIPTION}"
    );
    tree.write("DEBIAN/control", control.as_bytes(), 0o644)?;
    tree.write("DEBIAN/conffiles", b"/etc/pinguard/pinguard.toml\n", 0o644)?;
    tree.write("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    tree.write("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    tree.write("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;
    md5sums(&tree)?;

    let deb = out.join(format!("{NAME}_{version}_{arch}.deb"));
    util::run(
        W,
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    eprintln!("{W}: built {} (Depends: {depends})", deb.display());
    Ok(deb)
}

const DESCRIPTION: &str = "keeps the dedicated CPUs of virtual machines dedicated
 pinguard discovers the vCPU threads of QEMU/KVM guests, pins each one to its
 own guarded CPU, and watches with eBPF what else runs on those CPUs: the
 owner vCPU, an allowed per-CPU kernel thread, or an intruder. It can enforce
 the placement, and it exports what it sees as Prometheus metrics.
 .
 The systemd unit is installed but neither enabled nor started: choose the
 guarded CPUs in /etc/pinguard/pinguard.toml, then
 `systemctl enable --now pinguard`. Grafana dashboard and Prometheus rules
 are in /usr/share/pinguard/.
";

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pinguard
Source: https://github.com/pinguard/pinguard

Files: *
Copyright: {YEAR} the pinguard authors
License: MIT or Apache-2.0
 pinguard is dual-licensed under the MIT license and the Apache License,
 Version 2.0, at your option. On Debian systems the Apache License is in
 /usr/share/common-licenses/Apache-2.0.
";

// What dh_installsystemd --no-enable writes (debhelper 13, bookworm):
// deb-systemd-helper records which symlinks enabling would create, so a
// purge removes them even when the admin enabled the unit with systemctl;
// the running systemd (only where /run/systemd/system exists) is reloaded,
// restarted on upgrade and stopped on removal through deb-systemd-invoke.
const POSTINST: &str = r#"#!/bin/sh
# pinguard postinst. A fresh install starts nothing: the guarded CPUs come
# first (/etc/pinguard/pinguard.toml), then systemctl enable --now pinguard.
set -e
if [ "$1" = configure ] || [ "$1" = abort-upgrade ] || [ "$1" = abort-deconfigure ] || [ "$1" = abort-remove ]; then
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper unmask pinguard.service >/dev/null || true
        deb-systemd-helper update-state pinguard.service >/dev/null || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "$2" ]; then
            deb-systemd-invoke try-restart pinguard.service >/dev/null || true
        fi
    fi
fi
if [ "$1" = configure ] && [ -z "$2" ]; then
    echo "pinguard: set the guarded CPUs in /etc/pinguard/pinguard.toml, then: systemctl enable --now pinguard"
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
# pinguard prerm: stop the daemon (its eBPF programs detach with it).
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop pinguard.service >/dev/null || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
# pinguard postrm: forget the unit; on purge drop its enablement symlinks and
# deb-systemd-helper's state. dpkg removes the conffile and /etc/pinguard.
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = remove ] && command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper mask pinguard.service >/dev/null || true
fi
if [ "$1" = purge ] && command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper purge pinguard.service >/dev/null || true
    deb-systemd-helper unmask pinguard.service >/dev/null || true
fi
exit 0
"#;

/// The staging tree: every file gets an explicit mode, every directory 0755,
/// whatever the caller's umask.
struct Tree(PathBuf);

impl Tree {
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn write(&self, rel: &str, contents: &[u8], mode: u32) -> Result<()> {
        let path = self.path(rel);
        self.mkdirs(&path)?;
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))
    }

    fn copy(&self, from: &Path, rel: &str, mode: u32) -> Result<()> {
        let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.write(rel, &bytes, mode)
    }

    /// `from` recursively, without test fixtures (`tests/` folders).
    fn copy_dir(&self, from: &Path, rel: &str) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(from)
            .with_context(|| format!("reading {}", from.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let sub = format!("{rel}/{name}");
            if path.is_dir() {
                if name != "tests" {
                    self.copy_dir(&path, &sub)?;
                }
            } else {
                self.copy(&path, &sub, 0o644)?;
            }
        }
        Ok(())
    }

    fn mkdirs(&self, file: &Path) -> Result<()> {
        let mut dir = file.parent();
        let mut missing = Vec::new();
        while let Some(d) = dir {
            if d.exists() || !d.starts_with(&self.0) {
                break;
            }
            missing.push(d.to_path_buf());
            dir = d.parent();
        }
        for d in missing.iter().rev() {
            fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }

    /// Every regular file under the tree, relative, sorted.
    fn files(&self) -> Result<Vec<String>> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) -> Result<()> {
            for entry in fs::read_dir(dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    walk(&path, base, out)?;
                } else if let Ok(rel) = path.strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.0, &self.0, &mut out)?;
        out.sort();
        Ok(out)
    }
}

/// The unit from packaging/, pointing at the packaged binary. Fails loudly
/// when the unit's ExecStart moved, rather than shipping a unit that cannot start.
fn unit(root: &Path) -> Result<Vec<u8>> {
    let path = root.join("packaging/pinguard.service");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if !text.contains(UNIT_BIN_FROM) {
        bail!(
            "{} has no line starting with {UNIT_BIN_FROM:?}: update xtask/src/package.rs to point the unit at /usr/bin/pinguard",
            path.display()
        );
    }
    Ok(text.replace(UNIT_BIN_FROM, UNIT_BIN_TO).into_bytes())
}

/// `pinguard 0.1.0` -> `0.1.0`.
fn binary_version(bin: &Path) -> Result<String> {
    let line = command_line(Command::new(bin).arg("--version"))?;
    match line.split_whitespace().collect::<Vec<_>>()[..] {
        [NAME, v] => Ok(v.to_string()),
        _ => bail!(
            "`{} --version` printed {line:?}, expected \"pinguard VERSION\"",
            bin.display()
        ),
    }
}

/// A semver pre-release sorts before its release in Debian only with `~`.
fn debian_version(semver: &str) -> String {
    semver.replacen('-', "~", 1)
}

fn man_pages(bin: &Path, tree: &Tree, out: &Path) -> Result<()> {
    let dir = out.join("man");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let listed = command_output(Command::new(bin).arg("manpages").arg(&dir))?;
    let mut pages: Vec<&str> = listed.lines().collect();
    pages.sort();
    if !pages.iter().any(|p| p.ends_with("/pinguard-run.1")) {
        bail!("`pinguard manpages` wrote no pinguard-run.1: {pages:?}");
    }
    for page in pages {
        let page = Path::new(page);
        let name = page
            .file_name()
            .context("a man page without a file name")?
            .to_string_lossy();
        let roff = fs::read(page).with_context(|| format!("reading {}", page.display()))?;
        tree.write(
            &format!("usr/share/man/man1/{name}.gz"),
            &gzip(&roff)?,
            0o644,
        )?;
    }
    Ok(())
}

/// Where Debian's bash-completion, zsh and fish look for vendor scripts.
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "usr/share/bash-completion/completions/pinguard"),
    ("zsh", "usr/share/zsh/vendor-completions/_pinguard"),
    ("fish", "usr/share/fish/vendor_completions.d/pinguard.fish"),
];

fn completions(bin: &Path, tree: &Tree) -> Result<()> {
    for (shell, dest) in COMPLETIONS {
        let script = command_output(Command::new(bin).args(["completions", shell]))?;
        tree.write(dest, script.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Depends from the libraries the binary links, as dpkg-shlibdeps computes
/// it for debhelper (it insists on a debian/control in its working directory).
fn shlib_depends(bin: &Path, out: &Path) -> Result<String> {
    let work = out.join("shlibdeps");
    fs::create_dir_all(work.join("debian"))?;
    fs::write(
        work.join("debian/control"),
        format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n"),
    )?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.arg("-O").arg(format!("-e{}", bin.display()));
    cmd.current_dir(&work);
    let text = command_output(&mut cmd).context(
        "dpkg-shlibdeps failed (it is in dpkg-dev: apt-get install dpkg-dev, or run `cargo xtask setup`)",
    )?;
    let depends = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {text:?}"))?
        .trim()
        .to_string();
    if depends.is_empty() {
        bail!("dpkg-shlibdeps found no dependencies for {}", bin.display());
    }
    Ok(depends)
}

/// DEBIAN/md5sums for every file but the control files and conffiles
/// (dpkg tracks conffiles' hashes itself), as dh_md5sums writes it.
fn md5sums(tree: &Tree) -> Result<()> {
    let files: Vec<String> = tree
        .files()?
        .into_iter()
        .filter(|f| !f.starts_with("DEBIAN/") && !f.starts_with("etc/"))
        .collect();
    let sums = command_output(Command::new("md5sum").args(&files).current_dir(&tree.0))?;
    tree.write("DEBIAN/md5sums", sums.as_bytes(), 0o644)
}

/// The last commit's date (RFC 2822, for the changelog), its year and short
/// hash: the package says what it was built from, and rebuilding the same
/// commit gives the same text.
fn commit_date(root: &Path) -> Result<(String, String, String)> {
    let line = command_line(
        Command::new("git")
            .args(["log", "-1", "--format=%aD|%ad|%h", "--date=format:%Y"])
            .current_dir(root),
    )
    .context("git log (packaging needs the git checkout)")?;
    match line.split('|').collect::<Vec<_>>()[..] {
        [date, year, hash] => Ok((date.into(), year.into(), hash.into())),
        _ => bail!("git log printed {line:?}"),
    }
}

/// gzip -9n: no name or time stamp inside, so equal input gives equal bytes.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("could not run gzip")?;
    child
        .stdin
        .take()
        .context("gzip's stdin")?
        .write_all(data)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed ({})", util::describe(out.status));
    }
    Ok(out.stdout)
}

/// Bytes of the installed files (the DEBIAN directory is not installed).
fn dir_size(stage: &Path) -> Result<u64> {
    let tree = Tree(stage.to_path_buf());
    let mut total = 0;
    for f in tree.files()? {
        if !f.starts_with("DEBIAN/") {
            total += fs::metadata(stage.join(&f))?.len();
        }
    }
    Ok(total)
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let shown = util::show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            util::describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed invalid UTF-8"))
}

fn command_line(cmd: &mut Command) -> Result<String> {
    Ok(command_output(cmd)?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_sort_prereleases_first() {
        assert_eq!(debian_version("0.1.0"), "0.1.0");
        assert_eq!(debian_version("0.2.0-rc.1"), "0.2.0~rc.1");
    }

    #[test]
    fn the_unit_points_at_the_packaged_binary() {
        let unit = String::from_utf8(unit(&util::root()).unwrap()).unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/pinguard run"), "{unit}");
        assert!(!unit.contains("ExecStart=/usr/local"), "{unit}");
    }
}
