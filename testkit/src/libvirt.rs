//! A real libvirtd and transient KVM domains.
//!
//! [`Libvirtd::ensure`] uses the libvirtd that runs, or starts `virtlogd`
//! and `libvirtd` itself (there is no systemd on the lab) and stops what it
//! started on drop. [`Domain::create`] defines a transient kvm domain
//! without disks (`virsh create`); dropping it destroys the domain and
//! waits until its QEMU is gone. libvirt removes the domain's cgroups
//! itself when the domain stops.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

use crate::{
    error::{Error, OrPanic as _, Result},
    host, wait,
};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const STATUS_DIR: &str = "/run/libvirt/qemu";

/// What is missing for tests that need libvirt.
pub fn missing_libvirt() -> Option<String> {
    if let Some(m) = crate::env::missing_kvm() {
        return Some(m);
    }
    for bin in ["virsh", "libvirtd", "virtlogd"] {
        if which::which(bin).is_err() {
            return Some(format!(
                "{bin} is not installed (run `cargo xtask setup`: libvirt-daemon-system, libvirt-clients)"
            ));
        }
    }
    None
}

/// `virsh ARGS` against the system instance: its stdout.
pub fn try_virsh(args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .arg("-q")
        .args(args)
        .env("LIBVIRT_DEFAULT_URI", "qemu:///system")
        .output()
        .map_err(|e| Error::io("running virsh", e))?;
    if !out.status.success() {
        return Err(Error::Exited {
            command: format!("virsh {}", args.join(" ")),
            status: out.status,
            when: "with an error".into(),
            detail: format!(": {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[track_caller]
pub fn virsh(args: &[&str]) -> String {
    try_virsh(args).or_panic()
}

/// A libvirtd to talk to; stops on drop what it started.
pub struct Libvirtd {
    /// Daemons this guard started (name, pidfile).
    started: Vec<(&'static str, PathBuf)>,
}

impl Libvirtd {
    pub fn try_ensure() -> Result<Self> {
        let mut me = Self {
            started: Vec::new(),
        };
        if try_virsh(&["version"]).is_ok() {
            return Ok(me);
        }
        // libvirt runs QEMU as libvirt-qemu (group kvm): as udev would set it.
        for (name, pidfile) in [
            ("virtlogd", "/run/virtlogd.pid"),
            ("libvirtd", "/run/libvirtd.pid"),
        ] {
            if running(Path::new(pidfile)).is_some() {
                continue;
            }
            let st = Command::new(name)
                .arg("-d")
                .status()
                .map_err(|e| Error::io(format!("starting {name} -d"), e))?;
            if !st.success() {
                return Err(Error::Exited {
                    command: format!("{name} -d"),
                    status: st,
                    when: "at start".into(),
                    detail: String::new(),
                });
            }
            me.started.push((name, PathBuf::from(pidfile)));
        }
        wait::poll(
            "libvirtd to answer `virsh version`",
            START_TIMEOUT,
            Duration::from_millis(100),
            || try_virsh(&["version"]).ok().map(drop),
        )?;
        Ok(me)
    }

    #[track_caller]
    pub fn ensure() -> Self {
        Self::try_ensure().or_panic()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for (name, pidfile) in self.started.iter().rev() {
            if let Some(pid) = running(pidfile) {
                let _ = signal::kill(pid, Signal::SIGTERM);
                let gone = wait::poll(
                    &format!("{name} to stop"),
                    STOP_TIMEOUT,
                    Duration::from_millis(50),
                    || (!host::is_alive(pid.as_raw() as u32)).then_some(()),
                );
                if gone.is_err() {
                    let _ = signal::kill(pid, Signal::SIGKILL);
                }
            }
        }
    }
}

/// The pid in `pidfile`, if that process runs.
fn running(pidfile: &Path) -> Option<Pid> {
    let pid: i32 = fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    host::is_alive(pid as u32).then_some(Pid::from_raw(pid))
}

/// A transient kvm domain without disks; destroyed on drop.
pub struct Domain {
    pub name: String,
    pid: u32,
    _dir: tempfile::TempDir,
}

impl Domain {
    /// Creates and starts domain `name` with `vcpus` vCPUs, its vCPUs
    /// paused (`virsh create --paused`: created, idle).
    pub fn try_create(name: &str, vcpus: u32) -> Result<Self> {
        let dir =
            tempfile::tempdir().map_err(|e| Error::io("creating a temporary directory", e))?;
        let xml = dir.path().join("domain.xml");
        fs::write(
            &xml,
            format!(
                "<domain type='kvm'>\n  <name>{name}</name>\n  <memory unit='MiB'>128</memory>\n  \
                 <vcpu placement='static'>{vcpus}</vcpu>\n  <os><type arch='x86_64'>hvm</type></os>\n  \
                 <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>\n</domain>\n"
            ),
        )
        .map_err(|e| Error::io("writing the domain XML", e))?;
        let xml = xml.to_string_lossy().into_owned();
        try_virsh(&["create", &xml, "--paused"])?;
        let pidfile = Path::new(STATUS_DIR).join(format!("{name}.pid"));
        let pid = wait::poll(
            "the domain's QEMU pid",
            START_TIMEOUT,
            Duration::from_millis(50),
            || running(&pidfile).map(|p| p.as_raw() as u32),
        );
        let pid = match pid {
            Ok(p) => p,
            Err(e) => {
                let _ = try_virsh(&["destroy", name]);
                return Err(e);
            }
        };
        let d = Self {
            name: name.to_string(),
            pid,
            _dir: dir,
        };
        // libvirt names vCPU threads (`-name guest=...,debug-threads=on`).
        wait::poll(
            "the domain's vCPU threads",
            START_TIMEOUT,
            Duration::from_millis(50),
            || (d.vcpu_tids().len() == vcpus as usize).then_some(()),
        )?;
        Ok(d)
    }

    #[track_caller]
    pub fn create(name: &str, vcpus: u32) -> Self {
        Self::try_create(name, vcpus).or_panic()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// vCPU index -> thread, from QEMU's thread names.
    pub fn vcpu_tids(&self) -> Vec<u32> {
        let mut v: Vec<(u32, u32)> = host::tids(self.pid)
            .into_iter()
            .filter_map(|tid| {
                let comm = host::comm(self.pid, tid)?;
                let i = comm
                    .strip_prefix("CPU ")?
                    .strip_suffix("/KVM")?
                    .parse()
                    .ok()?;
                Some((i, tid))
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, tid)| tid).collect()
    }

    /// libvirt's live pinning of each vCPU, as `virsh vcpupin` prints it.
    pub fn vcpupin(&self) -> Vec<String> {
        virsh(&["vcpupin", &self.name, "--live"])
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect()
    }

    /// libvirt's live emulator pinning, as `virsh emulatorpin` prints it.
    pub fn emulatorpin(&self) -> String {
        virsh(&["emulatorpin", &self.name, "--live"])
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = try_virsh(&["destroy", &self.name]);
        let _ = wait::poll(
            "the domain's QEMU to exit",
            STOP_TIMEOUT,
            Duration::from_millis(50),
            || (!host::is_alive(self.pid)).then_some(()),
        );
    }
}
