//! The scheduling policy of vCPU threads (`--vcpu-sched fifo:1`), as
//! libvirt's `<vcpusched>` and KubeVirt's realtime option set it: a
//! real-time vCPU runs before every normal thread of its CPU, which is the
//! point on a dedicated CPU, and the reason `check` looks at RT throttling.
use std::{fmt, str::FromStr};

use nix::errno::Errno;
use thiserror::Error;

use crate::host::procfs::Sched;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub enum VcpuSched {
    /// SCHED_OTHER (nice 0): undo a real-time policy.
    Other,
    Fifo(u32),
    Rr(u32),
}

impl FromStr for VcpuSched {
    type Err = String;

    /// "other", "fifo:N" or "rr:N" with N in 1-99.
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = "expected other, fifo:PRIORITY or rr:PRIORITY (priority 1-99), e.g. fifo:1";
        let (name, given) = match s.trim().split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s.trim(), None),
        };
        let priority = |p: Option<&str>| -> Result<u32, String> {
            let p = p.ok_or_else(|| format!("{name} needs a priority: {expected}"))?;
            match p.trim().parse::<u32>() {
                Ok(n @ 1..=99) => Ok(n),
                _ => Err(format!("priority {p:?} is not 1-99: {expected}")),
            }
        };
        match name {
            "other" if given.is_none_or(|p| p.trim() == "0") => Ok(Self::Other),
            "other" => Err(format!("other takes no priority: {expected}")),
            "fifo" => Ok(Self::Fifo(priority(given)?)),
            "rr" => Ok(Self::Rr(priority(given)?)),
            _ => Err(expected.to_string()),
        }
    }
}

impl fmt::Display for VcpuSched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other => f.write_str("other"),
            Self::Fifo(p) => write!(f, "fifo:{p}"),
            Self::Rr(p) => write!(f, "rr:{p}"),
        }
    }
}

impl From<VcpuSched> for String {
    fn from(s: VcpuSched) -> Self {
        s.to_string()
    }
}

impl VcpuSched {
    fn policy_and_priority(self) -> (libc::c_int, libc::c_int) {
        match self {
            Self::Other => (libc::SCHED_OTHER, 0),
            Self::Fifo(p) => (libc::SCHED_FIFO, p as libc::c_int),
            Self::Rr(p) => (libc::SCHED_RR, p as libc::c_int),
        }
    }

    /// The same policy in `/proc` terms, to compare with what a thread has.
    pub fn matches(self, s: &Sched) -> bool {
        let (policy, prio) = self.policy_and_priority();
        s.policy == policy as u32 && s.rtprio == prio as u32
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SchedError {
    #[error("thread {tid} no longer exists")]
    Gone { tid: u32 },
    #[error(
        "the kernel refused {sched} for thread {tid} (EPERM): pinguard needs CAP_SYS_NICE, and \
         with cgroup v1's cpu controller the thread's cgroup needs real-time runtime \
         (cpu.rt_runtime_us > 0)"
    )]
    NotPermitted { tid: u32, sched: VcpuSched },
    #[error("cannot set {sched} for thread {tid}: {}", errno.desc())]
    Other {
        tid: u32,
        sched: VcpuSched,
        errno: Errno,
    },
}

/// Sets `sched` on thread `tid` (`sched_setscheduler`, which applies to one
/// thread when given a thread id).
pub fn set(tid: u32, sched: VcpuSched) -> Result<(), SchedError> {
    let (policy, priority) = sched.policy_and_priority();
    let param = libc::sched_param {
        sched_priority: priority,
    };
    let Ok(t) = libc::pid_t::try_from(tid) else {
        return Err(SchedError::Gone { tid });
    };
    if t == 0 {
        // 0 would be pinguard itself.
        return Err(SchedError::Gone { tid });
    }
    // SAFETY: a plain system call with a valid, initialised parameter.
    let rc = unsafe { libc::sched_setscheduler(t, policy, &param) };
    if rc == 0 {
        return Ok(());
    }
    match Errno::last() {
        Errno::ESRCH => Err(SchedError::Gone { tid }),
        Errno::EPERM => Err(SchedError::NotPermitted { tid, sched }),
        errno => Err(SchedError::Other { tid, sched, errno }),
    }
}

/// What a thread's policy was, to put it back: `None` for policies
/// `VcpuSched` cannot express (batch, idle, deadline), left alone.
pub fn current(s: &Sched) -> Option<VcpuSched> {
    match s.policy {
        0 => Some(VcpuSched::Other),
        1 => Some(VcpuSched::Fifo(s.rtprio)),
        2 => Some(VcpuSched::Rr(s.rtprio)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_with_clear_errors() {
        assert_eq!("fifo:1".parse(), Ok(VcpuSched::Fifo(1)));
        assert_eq!("rr:99".parse(), Ok(VcpuSched::Rr(99)));
        assert_eq!("other".parse(), Ok(VcpuSched::Other));
        assert_eq!("fifo:1".parse::<VcpuSched>().unwrap().to_string(), "fifo:1");
        for bad in ["fifo", "fifo:0", "fifo:100", "rr:x", "deadline", "other:5"] {
            let e = bad.parse::<VcpuSched>().unwrap_err();
            assert!(e.contains("expected other, fifo:PRIORITY"), "{bad}: {e}");
        }
    }
}
