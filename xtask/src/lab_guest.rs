//! `cargo xtask lab-guest`: the latency lab's guest, a kernel + initramfs per
//! kernel flavour built from Debian 12 packages without installing them
//! (`apt-get download` + `dpkg -x`): `target/lab-guest/gp/` (the cloud
//! kernel) and `target/lab-guest/rt/` (PREEMPT_RT), each with `vmlinuz` and
//! `initrd.img`. No disk, no network: the initramfs runs qemu-guest-agent on
//! the standard virtio-serial port `org.qemu.guest_agent.0`, and cyclictest is
//! there to be run through `guest-exec`. Cached: a flavour is rebuilt only when
//! a package version or this recipe changes.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::root;

/// Bump when the initramfs recipe changes: cached images are rebuilt.
const RECIPE: u32 = 3;

/// What runs in the guest besides the kernel.
const USER_PACKAGES: &[&str] = &["busybox-static", "rt-tests", "qemu-guest-agent"];

/// The modules the agent's port needs, in load order (Debian's kernels build
/// virtio and its PCI transport as modules; a missing one is skipped, so a
/// kernel with them built in works too).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
];

/// One kernel flavour: its directory under target/lab-guest and the Debian
/// metapackage that names the current kernel.
pub struct Flavour {
    pub dir: &'static str,
    pub metapackage: &'static str,
}

pub const FLAVOURS: &[Flavour] = &[
    Flavour {
        dir: "gp",
        metapackage: "linux-image-cloud-amd64",
    },
    Flavour {
        dir: "rt",
        metapackage: "linux-image-rt-amd64",
    },
];

/// `target/lab-guest` of this checkout (or of CARGO_TARGET_DIR).
pub fn out_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("lab-guest")
}

pub fn run() -> Result<()> {
    let out = out_dir();
    let debs = out.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    for f in FLAVOURS {
        build(f, &out, &debs)?;
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The candidate version apt would install.
fn version(package: &str) -> Result<String> {
    let text = output(Command::new("apt-cache").args(["policy", package]))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)")
        .with_context(|| {
            format!("apt knows no {package} (a Debian 12 apt source is needed; apt-get update?)")
        })
}

/// The kernel image package a metapackage depends on (linux-image-6.1.0-N-rt-amd64).
fn kernel_package(metapackage: &str) -> Result<String> {
    let text = output(Command::new("apt-cache").args(["depends", metapackage]))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .with_context(|| format!("{metapackage} depends on no linux-image package"))
}

/// The .deb of `package` in `debs`, downloaded unless already there.
fn deb(package: &str, debs: &Path) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        let v = version(package)?.replace(':', "%3a");
        let name = format!("{package}_{v}_amd64.deb");
        let p = debs.join(&name);
        Ok(p.is_file().then_some(p))
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    eprintln!("lab-guest: apt-get download {package}");
    output(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(debs),
    )?;
    find()?.with_context(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            debs.display()
        )
    })
}

fn build(f: &Flavour, out: &Path, debs: &Path) -> Result<()> {
    let dir = out.join(f.dir);
    let kernel = kernel_package(f.metapackage)?;
    let mut packages = vec![kernel.clone()];
    packages.extend(USER_PACKAGES.iter().map(|p| p.to_string()));
    let mut stamp = format!("recipe {RECIPE}\n");
    for p in &packages {
        stamp += &format!("{p} {}\n", version(p)?);
    }
    let (vmlinuz, initrd, stamp_path) = (
        dir.join("vmlinuz"),
        dir.join("initrd.img"),
        dir.join("packages"),
    );
    if vmlinuz.is_file()
        && initrd.is_file()
        && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
    {
        eprintln!("lab-guest: {} is up to date ({kernel})", dir.display());
        return Ok(());
    }
    let stage = dir.join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage)?;
    for p in &packages {
        let deb = deb(p, debs)?;
        output(Command::new("dpkg").arg("-x").arg(&deb).arg(&stage))?;
    }
    let release = kernel
        .strip_prefix("linux-image-")
        .context("kernel package name")?;
    let mut image = Initramfs::default();
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "run", "var", "lib", "lib64", "usr", "usr/bin",
        "usr/sbin",
    ] {
        image.dir(d);
    }
    image.file("bin/busybox", read(&stage.join("bin/busybox"))?, 0o755);
    image.file(
        "usr/bin/cyclictest",
        read(&stage.join("usr/bin/cyclictest"))?,
        0o755,
    );
    image.file(
        "usr/sbin/qemu-ga",
        read(&stage.join("usr/sbin/qemu-ga"))?,
        0o755,
    );
    // Their shared libraries: this is Debian 12 too (the packages' own
    // distribution), so ldd on the extracted binaries names the libraries of
    // the same release; the loader comes along.
    for bin in ["usr/bin/cyclictest", "usr/sbin/qemu-ga"] {
        for lib in shared_libraries(&stage.join(bin))? {
            let rel = lib.strip_prefix("/").unwrap_or(&lib).to_path_buf();
            let bytes = read(&lib)?;
            let mut parent = PathBuf::new();
            for c in rel.parent().into_iter().flat_map(Path::components) {
                parent.push(c);
                image.dir(&parent.to_string_lossy());
            }
            image.file(&rel.to_string_lossy(), bytes, 0o755);
        }
    }
    image.dir("lib/modules");
    let modules = stage.join("lib/modules").join(release);
    let mut found = Vec::new();
    for m in MODULES {
        if let Some(p) = find_module(&modules, m) {
            image.file(&format!("lib/modules/{m}.ko"), read(&p)?, 0o644);
            found.push(*m);
        }
    }
    if found.is_empty() {
        bail!("no virtio module in {}", modules.display());
    }
    // /init loads them in this order (dependencies first).
    image.file(
        "lib/modules/load",
        (found.join("\n") + "\n").into_bytes(),
        0o644,
    );
    image.file("init", INIT.as_bytes().to_vec(), 0o755);

    let boot = stage.join("boot").join(format!("vmlinuz-{release}"));
    std::fs::copy(&boot, &vmlinuz).with_context(|| format!("copying {}", boot.display()))?;
    std::fs::write(&initrd, image.finish())
        .with_context(|| format!("writing {}", initrd.display()))?;
    std::fs::write(&stamp_path, stamp)?;
    std::fs::remove_dir_all(&stage)?;
    eprintln!("lab-guest: built {} ({kernel})", dir.display());
    Ok(())
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(found) = find_module(&p, name) {
                return Some(found);
            }
        } else if p
            .file_name()
            .is_some_and(|n| n == format!("{name}.ko").as_str())
        {
            return Some(p);
        }
    }
    None
}

/// The absolute paths `ldd` resolves for `bin` (and the loader).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            bail!("{}: {}", bin.display(), line.trim());
        }
    }
    Ok(libs)
}

/// The guest's PID 1: mounts, the virtio-serial modules, the agent's port
/// (no udev, so its /dev/virtio-ports name is made here), then the agent,
/// restarted if it dies.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# cyclictest keeps its statistics in POSIX shared memory.
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
for m in $(cat /lib/modules/load); do
    insmod /lib/modules/$m.ko
done
port=""
for i in $(seq 1 100); do
    for n in /sys/class/virtio-ports/*/name; do
        [ -f "$n" ] && [ "$(cat $n)" = org.qemu.guest_agent.0 ] && port=$(basename $(dirname $n))
    done
    [ -n "$port" ] && [ -e /dev/$port ] && break
    sleep 0.05
done
mkdir -p /dev/virtio-ports
[ -n "$port" ] && ln -sf /dev/$port /dev/virtio-ports/org.qemu.guest_agent.0
echo "pinguard lab guest: $(uname -r), agent on ${port:-nothing}"
while true; do
    qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run
    sleep 1
done
"#;

/// A cpio archive in the kernel's "newc" format (uncompressed: the kernel
/// reads it as is, and the images stay small).
#[derive(Default)]
struct Initramfs {
    data: Vec<u8>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
    files: BTreeMap<String, ()>,
}

impl Initramfs {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, 0o040755, &[]);
        }
    }

    fn file(&mut self, name: &str, body: Vec<u8>, perm: u32) {
        if self.files.insert(name.to_string(), ()).is_none() {
            self.entry(name, 0o100000 | perm, &body);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}
