//! Reading and setting one thread's CPU affinity.
//!
//! Errors keep the errno apart because callers react differently: a thread
//! that exited (ESRCH) is the normal life of a host, EPERM is a privilege
//! problem, EINVAL means the kernel will not let this thread move there.
//! Metrics label failures by [`AffinityError::errno_name`].
use nix::{
    errno::Errno,
    sched::{self, CpuSet as NixCpuSet},
    unistd::Pid,
};
use thiserror::Error;

use crate::host::{
    cgroup::{Cgroups, Cpuset},
    cpulist::CpuSet,
};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AffinityError {
    #[error("thread {tid} no longer exists (ESRCH)")]
    Gone { tid: u32 },
    #[error(
        "not permitted to change the affinity of thread {tid} (EPERM): run as root or with CAP_SYS_NICE"
    )]
    NotPermitted { tid: u32 },
    #[error(
        "the kernel refused affinity {cpus} for thread {tid} (EINVAL): the CPUs are offline or \
         outside the thread's cpuset, or it is a kernel-managed thread (PF_NO_SETAFFINITY)"
    )]
    Invalid { tid: u32, cpus: CpuSet },
    #[error("cannot {op} the affinity of thread {tid}: {} ({})", errno.desc(), errno_name(*errno))]
    Other {
        tid: u32,
        op: &'static str,
        errno: Errno,
    },
    #[error(
        "thread {tid}: affinity was set to {wanted} but reads back as {actual} \
         (a cpuset cgroup may restrict the thread)"
    )]
    Mismatch {
        tid: u32,
        wanted: CpuSet,
        actual: CpuSet,
    },
    #[error("thread {tid}: CPU {cpu} is beyond the {max} CPUs an affinity mask can hold")]
    CpuTooLarge { tid: u32, cpu: u32, max: usize },
    #[error(
        "CPUs {cpus} are outside the cpuset of cgroup {} (CPUs {}, managed by {}) that thread \
         {tid} is in; {}",
        cgroup.path, cgroup.cpus, cgroup.owner, cgroup.fix(cpus)
    )]
    Cpuset {
        tid: u32,
        cpus: CpuSet,
        cgroup: Box<Cpuset>,
    },
    #[error("thread {tid}: {detail}")]
    Manager { tid: u32, detail: String },
}

impl AffinityError {
    #[cfg(test)]
    /// The thread id the error is about.
    pub fn tid(&self) -> u32 {
        match self {
            Self::Gone { tid }
            | Self::NotPermitted { tid }
            | Self::Invalid { tid, .. }
            | Self::Other { tid, .. }
            | Self::Mismatch { tid, .. }
            | Self::CpuTooLarge { tid, .. }
            | Self::Cpuset { tid, .. }
            | Self::Manager { tid, .. } => *tid,
        }
    }

    /// True when the thread exited: not a failure, callers skip it.
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Gone { .. })
    }

    /// The errno behind the error, if the kernel returned one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Gone { .. } => Some(Errno::ESRCH),
            Self::NotPermitted { .. } => Some(Errno::EPERM),
            Self::Invalid { .. } | Self::CpuTooLarge { .. } | Self::Cpuset { .. } => {
                Some(Errno::EINVAL)
            }
            Self::Other { errno, .. } => Some(*errno),
            Self::Mismatch { .. } | Self::Manager { .. } => None,
        }
    }

    /// A short stable label for metrics: the errno name ("ESRCH", "EPERM",
    /// "EINVAL", ...), "MISMATCH" when the kernel accepted the mask but
    /// the thread ended up with a different one, "MANAGER" when the guest's
    /// manager (libvirt) refused.
    pub fn errno_name(&self) -> String {
        match self {
            Self::Manager { .. } => "MANAGER".to_string(),
            _ => self
                .errno()
                .map_or_else(|| "MISMATCH".to_string(), errno_name),
        }
    }

    /// The same error, explained by the thread's cpuset cgroup when that is
    /// what stands in the way of `cpus`.
    pub fn explained(self, cgroups: &Cgroups) -> Self {
        let (tid, cpus) = match &self {
            Self::Invalid { tid, cpus } => (*tid, cpus.clone()),
            Self::Mismatch { tid, wanted, .. } => (*tid, wanted.clone()),
            _ => return self,
        };
        match cgroups.cpuset_of(tid) {
            Some(cg) if !cpus.is_subset(&cg.cpus) => Self::Cpuset {
                tid,
                cgroup: Box::new(cgroups.highest_excluding(cg, &cpus)),
                cpus,
            },
            _ => self,
        }
    }
}

/// "ESRCH" for `Errno::ESRCH` (nix's Debug output is the constant's name).
pub fn errno_name(errno: Errno) -> String {
    format!("{errno:?}")
}

fn pid(tid: u32) -> Result<Pid, AffinityError> {
    // Pid 0 means "the calling thread" to the kernel; never let a bogus 0
    // silently pin pinguard itself. Ids above i32::MAX cannot exist.
    match i32::try_from(tid) {
        Ok(t) if t > 0 => Ok(Pid::from_raw(t)),
        _ => Err(AffinityError::Gone { tid }),
    }
}

fn to_nix(tid: u32, cpus: &CpuSet) -> Result<NixCpuSet, AffinityError> {
    let mut set = NixCpuSet::new();
    for cpu in cpus.iter() {
        set.set(cpu as usize)
            .map_err(|_| AffinityError::CpuTooLarge {
                tid,
                cpu,
                max: NixCpuSet::count(),
            })?;
    }
    Ok(set)
}

fn from_nix(set: &NixCpuSet) -> CpuSet {
    (0..NixCpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .map(|c| c as u32)
        .collect()
}

/// The CPUs a thread may run on.
pub fn get(tid: u32) -> Result<CpuSet, AffinityError> {
    let p = pid(tid)?;
    match sched::sched_getaffinity(p) {
        Ok(set) => Ok(from_nix(&set)),
        Err(Errno::ESRCH) => Err(AffinityError::Gone { tid }),
        Err(Errno::EPERM) => Err(AffinityError::NotPermitted { tid }),
        Err(errno) => Err(AffinityError::Other {
            tid,
            op: "read",
            errno,
        }),
    }
}

/// Restricts a thread to `cpus`.
pub fn set(tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
    let p = pid(tid)?;
    if cpus.is_empty() {
        return Err(AffinityError::Invalid {
            tid,
            cpus: cpus.clone(),
        });
    }
    let mask = to_nix(tid, cpus)?;
    sched::sched_setaffinity(p, &mask).map_err(|errno| match errno {
        Errno::ESRCH => AffinityError::Gone { tid },
        Errno::EPERM => AffinityError::NotPermitted { tid },
        Errno::EINVAL => AffinityError::Invalid {
            tid,
            cpus: cpus.clone(),
        },
        errno => AffinityError::Other {
            tid,
            op: "set",
            errno,
        },
    })
}

/// Sets the affinity and reads it back: the kernel silently narrows a mask
/// to the thread's cpuset, so success of the syscall alone proves little.
/// A refusal the thread's cpuset explains names the cgroup and its manager.
pub fn apply_and_verify(tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
    let verified = set(tid, cpus).and_then(|()| {
        let actual = get(tid)?;
        if &actual != cpus {
            return Err(AffinityError::Mismatch {
                tid,
                wanted: cpus.clone(),
                actual,
            });
        }
        Ok(())
    });
    verified.map_err(|e| match e {
        // Only a refusal or a narrowed mask can be the cpuset's doing.
        AffinityError::Invalid { .. } | AffinityError::Mismatch { .. } => {
            e.explained(&Cgroups::read())
        }
        e => e,
    })
}

/// Reading and setting thread affinities: the host's
/// ([`crate::placement::place::Live`]) or, in unit tests, an in-memory table
/// (`fake::Table`), so the decisions that move threads can be tested
/// without moving any.
pub trait Affinities {
    fn get(&self, tid: u32) -> Result<CpuSet, AffinityError>;
    /// Sets the affinity and verifies it (see [`apply_and_verify`]).
    fn set(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError>;
}

#[cfg(test)]
pub mod fake {
    //! An in-memory affinity table for unit tests.
    use std::collections::BTreeMap;

    use super::{Affinities, AffinityError, CpuSet};

    #[derive(Debug, Default)]
    pub struct Table {
        pub cpus: BTreeMap<u32, CpuSet>,
        /// Threads whose next `set` fails with this error.
        pub fail: BTreeMap<u32, AffinityError>,
        /// Every successful `set`, in order.
        pub log: Vec<(u32, CpuSet)>,
    }

    impl Affinities for Table {
        fn get(&self, tid: u32) -> Result<CpuSet, AffinityError> {
            self.cpus
                .get(&tid)
                .cloned()
                .ok_or(AffinityError::Gone { tid })
        }

        fn set(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
            if let Some(e) = self.fail.remove(&tid) {
                return Err(e);
            }
            match self.cpus.get_mut(&tid) {
                Some(c) => {
                    *c = cpus.clone();
                    self.log.push((tid, cpus.clone()));
                    Ok(())
                }
                None => Err(AffinityError::Gone { tid }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gettid() -> u32 {
        nix::unistd::gettid().as_raw() as u32
    }

    #[test]
    fn set_and_read_back_on_own_thread() {
        // A dedicated thread so the test harness's threads keep their affinity.
        std::thread::spawn(|| {
            let tid = gettid();
            let before = get(tid).unwrap();
            let one = CpuSet::single(before.first().unwrap());
            apply_and_verify(tid, &one).unwrap();
            assert_eq!(get(tid).unwrap(), one);
            apply_and_verify(tid, &before).unwrap();
            assert_eq!(get(tid).unwrap(), before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn errors_are_typed_with_errno_names() {
        // Thread ids above pid_max cannot exist.
        let gone = get(i32::MAX as u32).unwrap_err();
        assert!(gone.is_gone(), "{gone:?}");
        assert_eq!(gone.errno_name(), "ESRCH");
        assert!(set(0, &CpuSet::single(0)).unwrap_err().is_gone());

        let tid = gettid();
        let err = set(tid, &CpuSet::new()).unwrap_err();
        assert_eq!(err.errno_name(), "EINVAL");
        let err = set(tid, &CpuSet::single(5000)).unwrap_err();
        assert!(matches!(err, AffinityError::CpuTooLarge { cpu: 5000, .. }));
        assert_eq!(err.tid(), tid);

        let mismatch = AffinityError::Mismatch {
            tid: 1,
            wanted: CpuSet::single(1),
            actual: CpuSet::single(0),
        };
        assert_eq!(mismatch.errno_name(), "MISMATCH");
        let other = AffinityError::Other {
            tid: 1,
            op: "set",
            errno: Errno::EFAULT,
        };
        assert_eq!(other.errno_name(), "EFAULT");
        assert!(other.to_string().contains("EFAULT"), "{other}");
    }

    #[test]
    fn offline_cpu_is_einval() {
        // CPU 1000 fits the mask but is not online on any machine this runs on.
        let online = crate::host::topology::Topology::read().map(|t| t.online);
        if online.is_ok_and(|o| o.contains(1000)) {
            return;
        }
        std::thread::spawn(|| {
            let err = set(gettid(), &CpuSet::single(1000)).unwrap_err();
            assert!(matches!(err, AffinityError::Invalid { .. }), "{err:?}");
            assert_eq!(err.errno_name(), "EINVAL");
        })
        .join()
        .unwrap();
    }
}
