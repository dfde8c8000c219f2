//! Placing a libvirt domain's threads through libvirt itself.
//!
//! libvirt keeps each domain's pinning in its live definition
//! (`<cputune>`), writes it into the domain's cpuset cgroups
//! (`.../emulator`, `.../vcpuN`) and re-applies it whenever it re-pins or
//! restarts the domain. A `sched_setaffinity` behind its back is refused
//! once libvirt has narrowed a vCPU's cpuset, and silently undone
//! otherwise. So pinguard asks libvirt (`virsh vcpupin`, `virsh
//! emulatorpin`): libvirt updates the cgroups, the threads and its own view
//! at once, and `virsh vcpupin` agrees with pinguard afterwards.
//!
//! `virsh` rather than the libvirt C library: it is what operators use, it
//! is installed wherever libvirt is, it honours `LIBVIRT_DEFAULT_URI`, and
//! pinning is rare enough that a process per call (about 50 ms here) costs
//! nothing that matters.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::host::cpulist::CpuSet;

/// Bound on one virsh call: a hung libvirtd must not hang pinguard.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LibvirtError {
    #[error("cannot run virsh (install libvirt-clients): {0}")]
    NoVirsh(String),
    #[error("`virsh {command}` did not answer within {}s", VIRSH_TIMEOUT.as_secs())]
    Timeout { command: String },
    #[error("`virsh {command}` failed: {message}")]
    Failed { command: String, message: String },
    #[error(
        "domain {domain} is transient (started with virsh create): it has no persistent \
         definition to write --persist into; define it (virsh define) or pin without --persist"
    )]
    Transient { domain: String },
}

/// Runs `virsh ARGS` (bounded): its stdout, or its error message.
pub fn virsh(args: &[&str]) -> Result<String, LibvirtError> {
    let command = args.join(" ");
    let mut child = Command::new("virsh")
        .args(["-q"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LibvirtError::NoVirsh(e.to_string()))?;
    let deadline = Instant::now() + VIRSH_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LibvirtError::Timeout { command });
            }
        }
    };
    // It has exited: collecting its output cannot block.
    let out = child
        .wait_with_output()
        .map_err(|e| LibvirtError::NoVirsh(e.to_string()))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr),
    );
    if status.success() {
        Ok(stdout)
    } else {
        let message = stderr
            .lines()
            .map(|l| l.trim_start_matches("error: ").trim())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Err(LibvirtError::Failed {
            command,
            message: if message.is_empty() {
                format!("exit status {status}")
            } else {
                message
            },
        })
    }
}

/// Which definition of the domain a pin changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The running domain only.
    Live,
    /// The persistent definition only (takes effect at the next start).
    Config,
}

impl Scope {
    fn flag(self) -> &'static str {
        match self {
            Self::Live => "--live",
            Self::Config => "--config",
        }
    }
}

/// `virsh vcpupin DOMAIN VCPU CPUS`.
pub fn vcpupin(domain: &str, vcpu: u32, cpus: &CpuSet, scope: Scope) -> Result<(), LibvirtError> {
    let (vcpu, cpus) = (vcpu.to_string(), cpus.to_string());
    virsh(&["vcpupin", "--domain", domain, &vcpu, &cpus, scope.flag()]).map(drop)
}

/// `virsh emulatorpin DOMAIN CPUS`: every thread in the domain's emulator cgroup.
pub fn emulatorpin(domain: &str, cpus: &CpuSet, scope: Scope) -> Result<(), LibvirtError> {
    let cpus = cpus.to_string();
    virsh(&["emulatorpin", "--domain", domain, &cpus, scope.flag()]).map(drop)
}

/// Fails unless the domain has a persistent definition.
pub fn require_persistent(domain: &str) -> Result<(), LibvirtError> {
    let info = virsh(&["dominfo", "--domain", domain])?;
    if parse_persistent(&info) == Some(false) {
        return Err(LibvirtError::Transient {
            domain: domain.to_string(),
        });
    }
    Ok(())
}

/// `Persistent: yes|no` from `virsh dominfo`.
fn parse_persistent(dominfo: &str) -> Option<bool> {
    dominfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "Persistent").then(|| v.trim() == "yes")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virsh_output_is_parsed() {
        let info =
            "Id:             2\nName:           lv1\nPersistent:     no\nAutostart:      disable\n";
        assert_eq!(parse_persistent(info), Some(false));
        assert_eq!(parse_persistent("Persistent: yes\n"), Some(true));
        assert_eq!(parse_persistent(""), None);
    }
}
