//! Finding QEMU/KVM guests and the host thread behind each vCPU.
//!
//! Sources of the vCPU index -> thread id map, most trusted first:
//! 1. QMP `query-cpus-fast` on a monitor socket, given with `--qmp` or found
//!    on the QEMU command line (`-qmp unix:...`, `-chardev socket,...` +
//!    `-mon chardev=...,mode=control`);
//! 2. libvirt's live status XML (`/run/libvirt/qemu/<domain>.xml`);
//! 3. thread names `CPU n/KVM` (QEMU's `-name ...,debug-threads=on`).
//!
//! Every other thread of a QEMU process (main loop, IO threads, call_rcu,
//! worker threads, in-process vhost workers) and the `vhost-<pid>` kernel
//! workers it owns are emulator threads.
//!
//! Processes come and go during a scan: a process or thread that vanishes
//! is skipped, never an error. [`Discoverer`] keeps QMP answers between
//! scans so that it is cheap to call every few seconds.
//!
//! [`qmp`] is the QMP client, [`qemu`] reads QEMU's command line and thread
//! names, [`libvirt`] its status files; this module puts them together.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::host::procfs::{Proc, ThreadInfo};

pub mod agent;
mod libvirt;
pub mod qemu;
mod qmp;

use libvirt::{DEFAULT_LIBVIRT_DIR, LibvirtStatus};
pub use qemu::parse_vcpu_thread_name;
#[cfg(any(test, fuzzing))]
pub use {libvirt::parse_libvirt_status, qmp::parse_cpus_fast};

/// What the kernel says a process is, from its file descriptors: only a
/// process that created a VM and vCPUs through /dev/kvm holds
/// `anon_inode:kvm-vm` and `anon_inode:kvm-vcpu:N`. This, not a process or
/// thread name anyone can choose, is what makes it a KVM guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmIdentity {
    /// Holds a KVM VM and these vCPUs (possibly none yet: QEMU names its
    /// vCPU threads before it creates their fds).
    Guest { vcpus: BTreeSet<u32> },
    /// Holds neither.
    NotKvm,
    /// Its fds cannot be read (pinguard lacks CAP_SYS_PTRACE): unknown.
    Unreadable,
}

pub fn kvm_identity(proc: &Proc, pid: u32) -> KvmIdentity {
    let targets = match proc.fd_targets(pid) {
        Ok(t) => t,
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied
                || e.raw_os_error() == Some(libc::EPERM) =>
        {
            return KvmIdentity::Unreadable;
        }
        Err(_) => return KvmIdentity::NotKvm,
    };
    let vcpus: BTreeSet<u32> = targets
        .iter()
        .filter_map(|t| t.strip_prefix("anon_inode:kvm-vcpu:")?.parse().ok())
        .collect();
    if vcpus.is_empty() && !targets.iter().any(|t| t == "anon_inode:kvm-vm") {
        KvmIdentity::NotKvm
    } else {
        KvmIdentity::Guest { vcpus }
    }
}

/// Whether `pid` is (or may be, when its fds cannot be read) a KVM guest.
pub fn is_kvm_guest(proc: &Proc, pid: u32) -> bool {
    kvm_identity(proc, pid) != KvmIdentity::NotKvm
}
use agent::AgentAddr;
use qemu::{is_qemu_argv, parse_guest_kthread_name, parse_qemu_cmdline};
use qmp::{QMP_TIMEOUT, QmpError, query_cpus_fast, query_kvm_enabled};

/// Where a guest's vCPU map came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Qmp,
    Libvirt,
    ThreadNames,
    /// What the kernel itself says: KVM's debugfs (`vcpuN/pid`), or each
    /// vCPU thread seen inside `ioctl(KVM_RUN)` on its `anon_inode:kvm-vcpu:N` fd.
    Kvm,
}

/// A KVM guest whose vCPU threads could not be told apart (no QMP socket,
/// no libvirt status, no `debug-threads=on`, and vCPUs not all in
/// `KVM_RUN`, e.g. paused): it cannot be pinned, and its threads are not
/// intruders either.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unidentified {
    pub name: String,
    pub pid: u32,
    /// The vCPUs KVM says it has.
    pub vcpus: usize,
}

/// KVM's `KVM_RUN` request (`_IO(KVMIO, 0x80)`, include/uapi/linux/kvm.h).
const KVM_RUN: u64 = 0xae80;

/// The fd of `ioctl(fd, KVM_RUN)` from a `/proc/.../syscall` line.
fn kvm_run_fd(syscall: &str) -> Option<u32> {
    let mut f = syscall.split_whitespace();
    if f.next()? != libc::SYS_ioctl.to_string() {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let fd = hex(f.next()?)?;
    (hex(f.next()?)? == KVM_RUN).then_some(u32::try_from(fd).ok()?)
}

/// Who runs a guest, and so through whom its threads are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Manager {
    /// Started by hand or by a tool that keeps no placement of its own:
    /// pinguard sets affinities itself.
    #[default]
    None,
    /// A libvirt domain (found in libvirt's status directory): libvirt owns
    /// its cpuset cgroups and re-applies its own pinning, so pinguard pins
    /// through libvirt (`virsh vcpupin` / `emulatorpin`).
    Libvirt,
}

/// One vCPU of a guest and the host thread that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Vcpu {
    /// QEMU's cpu-index.
    pub index: u32,
    pub tid: u32,
}

/// A running QEMU guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Guest {
    /// libvirt domain name, else `-name`, else `pid-N`.
    pub name: String,
    /// The QEMU process.
    pub pid: u32,
    /// Sorted by index.
    pub vcpus: Vec<Vcpu>,
    /// Every other thread of the process, and the vhost kernel workers it
    /// owns; sorted. Threads the kernel does not let anyone move
    /// (PF_NO_SETAFFINITY, e.g. io_uring workers) are left out.
    pub emulator_tids: Vec<u32>,
    pub source: Source,
    pub manager: Manager,
}

impl Guest {
    #[cfg(test)]
    /// The thread running vCPU `index`.
    pub fn vcpu_tid(&self, index: u32) -> Option<u32> {
        self.vcpus.iter().find(|v| v.index == index).map(|v| v.tid)
    }

    #[cfg(test)]
    /// The vCPU index a thread runs, if it is one of this guest's vCPU threads.
    pub fn vcpu_of(&self, tid: u32) -> Option<u32> {
        self.vcpus.iter().find(|v| v.tid == tid).map(|v| v.index)
    }

    /// Every thread pinguard manages for this guest: vCPUs, then emulator threads.
    pub fn tids(&self) -> impl Iterator<Item = u32> + '_ {
        self.vcpus
            .iter()
            .map(|v| v.tid)
            .chain(self.emulator_tids.iter().copied())
    }
}

/// Where to look for guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverOptions {
    /// QMP sockets given explicitly (`--qmp`): failing to query one is an error.
    pub qmp: Vec<PathBuf>,
    /// libvirt's status directory (normally [`DEFAULT_LIBVIRT_DIR`]).
    pub libvirt_dir: PathBuf,
    /// KVM's debugfs directory (`<pid>-<vmfd>/vcpuN/pid`).
    pub kvm_debugfs: PathBuf,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        Self {
            qmp: Vec::new(),
            libvirt_dir: PathBuf::from(DEFAULT_LIBVIRT_DIR),
            kvm_debugfs: PathBuf::from("/sys/kernel/debug/kvm"),
        }
    }
}

#[derive(Debug, Error)]
pub enum DiscoverError {
    #[error("cannot list processes in {}: {source}", path.display())]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--qmp {}: {source}", path.display())]
    Qmp {
        path: PathBuf,
        #[source]
        source: QmpError,
    },
}

/// The result of one scan.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Sorted by (name, pid).
    pub guests: Vec<Guest>,
    /// What was skipped and why (a socket on a command line that did not
    /// answer, a QEMU without a usable vCPU map, an unreadable status file).
    pub warnings: Vec<String>,
    /// Explicit `--qmp` sockets that could not be queried. Guests found
    /// otherwise are still in `guests`; one-shot commands treat these as
    /// fatal, the daemon may keep going.
    pub errors: Vec<DiscoverError>,
    /// KVM guests found but not identified.
    pub unidentified: Vec<Unidentified>,
}

impl Discovery {
    #[cfg(test)]
    /// Logs the warnings and fails on the first error.
    pub fn into_result(self) -> Result<Vec<Guest>, DiscoverError> {
        for w in &self.warnings {
            log::warn!("{w}");
        }
        match self.errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(self.guests),
        }
    }
}

#[cfg(test)]
/// Finds every QEMU guest (one-shot). Warnings are logged; a failing
/// `--qmp` socket is an error.
pub fn discover(proc: &Proc, opts: &DiscoverOptions) -> Result<Vec<Guest>, DiscoverError> {
    Discoverer::new(proc.clone(), opts.clone())
        .scan()?
        .into_result()
}

#[cfg(test)]
/// Looks at one process only (one-shot): `None` if it is not a QEMU guest
/// (or exited, or has no usable vCPU map).
pub fn discover_pid(
    proc: &Proc,
    opts: &DiscoverOptions,
    pid: u32,
) -> Result<Option<Guest>, DiscoverError> {
    Ok(Discoverer::new(proc.clone(), opts.clone())
        .rediscover(pid)?
        .into_result()?
        .into_iter()
        .next())
}

/// Repeated discovery with memory: vCPU maps learned over QMP are kept per
/// process until one of its vCPU threads disappears, a new `CPU n/...`
/// thread shows up, or the caller asks with [`Discoverer::rediscover`] /
/// [`Discoverer::forget`] (the daemon does so on exec/exit events). QMP is
/// the costly source: a socket round trip, and QEMU 7.2 serves one client
/// at a time, so querying it on every scan would also get in others' way.
#[derive(Debug)]
pub struct Discoverer {
    proc: Proc,
    opts: DiscoverOptions,
    qmp_cache: HashMap<u32, Vec<Vcpu>>,
    /// Which process each `--qmp` socket belongs to.
    qmp_owner: HashMap<PathBuf, u32>,
}

/// What the process scan found about one pid.
struct Candidate {
    argv: Vec<String>,
    libvirt: Option<LibvirtStatus>,
    explicit: Option<(PathBuf, Vec<Vcpu>)>,
    vhost: Vec<u32>,
}

/// A guest to measure inside (`latency --vm`): unlike the guests
/// [`Discoverer::scan`] returns, it may run under TCG (no KVM vCPU fds, its
/// vCPU threads named `CPU n/TCG`), as long as something authoritative (QMP,
/// libvirt's status, QEMU's thread names) names its vCPU threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurableGuest {
    pub name: String,
    pub pid: u32,
    /// Sorted by index.
    pub vcpus: Vec<Vcpu>,
    pub source: Source,
    pub manager: Manager,
    /// `kvm`, `tcg`, or what the command line asked for when nothing says more.
    pub accelerator: String,
    /// How to reach its guest agent, or why it cannot be.
    pub agent: Result<AgentAddr, String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FindError {
    #[error("no running QEMU guest is named {name:?} (guests here: {})", if seen.is_empty() { "none".to_string() } else { seen.join(", ") })]
    NotFound { name: String, seen: Vec<String> },
    #[error(
        "{count} QEMU processes are named {name:?} (pids {pids}): give each guest its own -name"
    )]
    Ambiguous {
        name: String,
        count: usize,
        pids: String,
    },
    #[error(
        "guest {name} (pid {pid}): cannot tell its vCPU threads apart ({why}); start QEMU with a \
         -qmp unix:PATH,server=on,wait=off socket or -name {name},debug-threads=on"
    )]
    NoVcpus { name: String, pid: u32, why: String },
    #[error("cannot list processes: {0}")]
    Proc(String),
}

impl Discoverer {
    /// Finds the guest called `name` (libvirt domain or QEMU `-name`) for a
    /// measurement inside it: its vCPU threads (QMP `query-cpus-fast` first),
    /// its accelerator and its guest agent.
    pub fn find_measurable(&mut self, name: &str) -> Result<MeasurableGuest, FindError> {
        let mut warnings = Vec::new();
        let mut libvirt = libvirt::read_status_dir(&self.opts.libvirt_dir, None, &mut warnings);
        let pids = self
            .proc
            .pids()
            .map_err(|e| FindError::Proc(e.to_string()))?;
        let mut seen = Vec::new();
        let mut hits = Vec::new();
        for pid in pids {
            let Ok(Some(argv)) = self.proc.cmdline(pid) else {
                continue;
            };
            let lv = libvirt.remove(&pid);
            if argv.is_empty() || (lv.is_none() && !is_qemu_argv(&argv)) {
                continue;
            }
            let cmd = parse_qemu_cmdline(&argv);
            let gname = lv
                .as_ref()
                .map(|l| l.name.clone())
                .or_else(|| cmd.name.clone())
                .unwrap_or_else(|| format!("pid-{pid}"));
            if gname == name {
                hits.push((pid, cmd, lv));
            } else {
                seen.push(gname);
            }
        }
        for w in warnings {
            log::warn!("{w}");
        }
        let (pid, cmd, lv) = match hits.len() {
            0 => {
                seen.sort();
                seen.dedup();
                return Err(FindError::NotFound {
                    name: name.into(),
                    seen,
                });
            }
            1 => hits.remove(0),
            count => {
                return Err(FindError::Ambiguous {
                    name: name.into(),
                    count,
                    pids: hits
                        .iter()
                        .map(|h| h.0.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        };
        let threads = self.proc.threads(pid).unwrap_or_default();
        let tids: HashSet<u32> = threads.iter().map(|t| t.tid).collect();
        let valid = |v: &[Vcpu]| !v.is_empty() && v.iter().all(|v| tids.contains(&v.tid));
        let mut why = Vec::new();
        let mut found: Option<(Vec<Vcpu>, Source)> = None;
        let mut kvm_enabled: Option<bool> = None;
        if lv.is_none() {
            for sock in &cmd.qmp_sockets {
                let path = self.resolve(pid, sock);
                match query_cpus_fast(&path, QMP_TIMEOUT).map(|v| self.host_tids(pid, v)) {
                    Ok(v) if valid(&v) => {
                        kvm_enabled = query_kvm_enabled(&path, QMP_TIMEOUT).ok();
                        found = Some((v, Source::Qmp));
                        break;
                    }
                    Ok(_) => why.push(format!(
                        "QMP socket {} named threads that are not this process's",
                        path.display()
                    )),
                    Err(e) => why.push(format!("QMP socket {}: {e}", path.display())),
                }
            }
            if cmd.qmp_sockets.is_empty() {
                why.push("no QMP socket on its command line".into());
            }
        }
        if found.is_none()
            && let Some(l) = &lv
        {
            if valid(&l.vcpus) {
                found = Some((l.vcpus.clone(), Source::Libvirt));
            } else {
                why.push("libvirt's status names no live vCPU threads".into());
            }
        }
        let named: Vec<Vcpu> = threads
            .iter()
            .filter_map(|t| parse_vcpu_thread_name(&t.comm).map(|index| Vcpu { index, tid: t.tid }))
            .collect();
        let tcg_names = threads
            .iter()
            .any(|t| t.comm.ends_with("/TCG") && parse_vcpu_thread_name(&t.comm).is_some());
        if found.is_none() {
            if named.is_empty() {
                why.push("no thread is named CPU n/KVM or CPU n/TCG".into());
            } else {
                found = Some((named, Source::ThreadNames));
            }
        }
        let Some((mut vcpus, source)) = found else {
            return Err(FindError::NoVcpus {
                name: name.into(),
                pid,
                why: why.join("; "),
            });
        };
        vcpus.sort();
        let accelerator = match kvm_enabled {
            Some(true) => "kvm".to_string(),
            Some(false) => "tcg".to_string(),
            None if tcg_names => "tcg".to_string(),
            None => match kvm_identity(&self.proc, pid) {
                KvmIdentity::Guest { vcpus } if !vcpus.is_empty() => "kvm".into(),
                KvmIdentity::Guest { .. } | KvmIdentity::NotKvm => "tcg".into(),
                KvmIdentity::Unreadable => cmd.accel.clone().unwrap_or_else(|| "unknown".into()),
            },
        };
        let agent = match &lv {
            Some(l) => match &l.agent {
                Some(socket) => Ok(AgentAddr::Libvirt {
                    domain: l.name.clone(),
                    socket: socket.clone(),
                }),
                None => Err(format!(
                    "libvirt domain {} has no guest agent channel: add <channel type='unix'><target \
                     type='virtio' name='{}'/></channel> to its <devices> (virsh edit {})",
                    l.name,
                    qemu::AGENT_PORT,
                    l.name
                )),
            },
            None => match cmd.agent_sockets.first() {
                Some(p) => Ok(AgentAddr::Socket(self.resolve(pid, p))),
                None if !cmd.other_agents.is_empty() => Err(format!(
                    "its guest agent port ({}) is not on a unix socket chardev pinguard can \
                     connect to",
                    cmd.other_agents.join(", ")
                )),
                None => Err(format!(
                    "its command line has no guest agent port: add -device virtio-serial \
                     -chardev socket,path=/run/NAME-qga.sock,server=on,wait=off,id=qga0 \
                     -device virtserialport,chardev=qga0,name={}",
                    qemu::AGENT_PORT
                )),
            },
        };
        Ok(MeasurableGuest {
            name: name.into(),
            pid,
            vcpus,
            source,
            manager: if lv.is_some() {
                Manager::Libvirt
            } else {
                Manager::None
            },
            accelerator,
            agent,
        })
    }

    pub fn new(proc: Proc, opts: DiscoverOptions) -> Self {
        Self {
            proc,
            opts,
            qmp_cache: HashMap::new(),
            qmp_owner: HashMap::new(),
        }
    }

    /// Drops what is remembered about a process (call when it exits or execs).
    pub fn forget(&mut self, pid: u32) {
        self.qmp_cache.remove(&pid);
    }

    /// Finds every guest on the host.
    pub fn scan(&mut self) -> Result<Discovery, DiscoverError> {
        let mut d = Discovery::default();
        let pids = self.proc.pids().map_err(|source| DiscoverError::Proc {
            path: self.proc.root().to_owned(),
            source,
        })?;
        let mut libvirt = libvirt::read_status_dir(&self.opts.libvirt_dir, None, &mut d.warnings);
        let mut explicit = self.query_explicit(None, &mut d);
        let mut candidates: BTreeMap<u32, Candidate> = BTreeMap::new();
        let mut vhost: HashMap<u32, Vec<u32>> = HashMap::new();
        for pid in pids {
            // A read error other than "gone" (e.g. hidepid) means we cannot
            // manage that process anyway.
            let Ok(Some(argv)) = self.proc.cmdline(pid) else {
                continue;
            };
            if argv.is_empty() {
                // Kernel threads (and zombies) have no command line.
                if let Some(owner) = self.vhost_owner(pid) {
                    vhost.entry(owner).or_default().push(pid);
                }
                continue;
            }
            let lv = libvirt.remove(&pid);
            let ex = explicit.remove(&pid);
            if lv.is_some() || ex.is_some() || is_qemu_argv(&argv) {
                candidates.insert(
                    pid,
                    Candidate {
                        argv,
                        libvirt: lv,
                        explicit: ex,
                        vhost: Vec::new(),
                    },
                );
            }
        }
        for (owner, kthreads) in vhost {
            if let Some(c) = candidates.get_mut(&owner) {
                c.vhost = kthreads;
            }
        }
        self.qmp_cache.retain(|pid, _| candidates.contains_key(pid));
        self.qmp_owner.retain(|_, pid| candidates.contains_key(pid));
        for (pid, c) in candidates {
            if let Some(g) = self.build(pid, c, &mut d) {
                d.guests.push(g);
            }
        }
        d.guests
            .sort_by(|a, b| (&a.name, a.pid).cmp(&(&b.name, b.pid)));
        Ok(d)
    }

    /// Looks at one process again from scratch (its QMP socket is queried
    /// anew): at most one guest in the result.
    pub fn rediscover(&mut self, pid: u32) -> Result<Discovery, DiscoverError> {
        self.forget(pid);
        let mut d = Discovery::default();
        let Ok(Some(argv)) = self.proc.cmdline(pid) else {
            return Ok(d);
        };
        if argv.is_empty() {
            return Ok(d);
        }
        let libvirt = libvirt::read_status_dir(&self.opts.libvirt_dir, Some(pid), &mut d.warnings)
            .remove(&pid);
        let explicit = self.query_explicit(Some(pid), &mut d).remove(&pid);
        if libvirt.is_none() && explicit.is_none() && !is_qemu_argv(&argv) {
            return Ok(d);
        }
        let pids = self.proc.pids().map_err(|source| DiscoverError::Proc {
            path: self.proc.root().to_owned(),
            source,
        })?;
        let vhost = pids
            .into_iter()
            .filter(|&p| self.vhost_owner(p) == Some(pid))
            .collect();
        let c = Candidate {
            argv,
            libvirt,
            explicit,
            vhost,
        };
        if let Some(g) = self.build(pid, c, &mut d) {
            d.guests.push(g);
        }
        Ok(d)
    }

    /// The QEMU pid a per-guest kernel thread (`vhost-<pid>`,
    /// `kvm-pit/<pid>`, ...) works for.
    fn vhost_owner(&self, pid: u32) -> Option<u32> {
        let comm = self.proc.comm(pid, pid).ok().flatten()?;
        let owner = parse_guest_kthread_name(&comm)?;
        let info = self.proc.thread(pid, pid).ok().flatten()?;
        info.is_kthread().then_some(owner)
    }

    /// Queries the `--qmp` sockets (those of `only`, and those not yet
    /// known to belong to another process): pid -> (socket, vCPUs).
    fn query_explicit(
        &mut self,
        only: Option<u32>,
        d: &mut Discovery,
    ) -> HashMap<u32, (PathBuf, Vec<Vcpu>)> {
        let mut out = HashMap::new();
        for path in self.opts.qmp.clone() {
            if let Some(&owner) = self.qmp_owner.get(&path) {
                if only.is_some_and(|p| p != owner) {
                    continue;
                }
                if let Some(cached) = self.qmp_cache.get(&owner)
                    && self.still_valid(owner, cached)
                {
                    out.insert(owner, (path, cached.clone()));
                    continue;
                }
            }
            match query_cpus_fast(&path, QMP_TIMEOUT)
                .and_then(|v| self.owner_of(&v).map(|p| (p, v)))
            {
                Ok((pid, vcpus)) => {
                    self.qmp_owner.insert(path.clone(), pid);
                    self.qmp_cache.insert(pid, vcpus.clone());
                    out.insert(pid, (path, vcpus));
                }
                Err(source) => d.errors.push(DiscoverError::Qmp { path, source }),
            }
        }
        out
    }

    /// The process the vCPU threads QEMU reported belong to.
    fn owner_of(&self, vcpus: &[Vcpu]) -> Result<u32, QmpError> {
        let mut owner = None;
        for v in vcpus {
            let tgid = self
                .proc
                .tgid_of(v.tid)
                .ok()
                .flatten()
                .ok_or(QmpError::NotVisible { tid: v.tid })?;
            match owner {
                None => owner = Some(tgid),
                Some(o) if o != tgid => {
                    return Err(QmpError::MixedProcesses {
                        first: o,
                        other: tgid,
                    });
                }
                Some(_) => {}
            }
        }
        owner.ok_or(QmpError::NoVcpus)
    }

    fn still_valid(&self, pid: u32, vcpus: &[Vcpu]) -> bool {
        let tids: HashSet<u32> = self
            .proc
            .tids(pid)
            .unwrap_or_default()
            .into_iter()
            .collect();
        !vcpus.is_empty() && vcpus.iter().all(|v| tids.contains(&v.tid))
    }

    /// Works out one guest's vCPU map and emulator threads.
    fn build(&mut self, pid: u32, c: Candidate, d: &mut Discovery) -> Option<Guest> {
        let warnings = &mut d.warnings;
        let threads: Vec<ThreadInfo> = self.proc.threads(pid).ok()?;
        if threads.is_empty() {
            return None; // exited under us
        }
        let tids: HashSet<u32> = threads.iter().map(|t| t.tid).collect();
        let valid = |v: &[Vcpu]| !v.is_empty() && v.iter().all(|v| tids.contains(&v.tid));
        let cmd = parse_qemu_cmdline(&c.argv);
        let name = c
            .libvirt
            .as_ref()
            .map(|l| l.name.clone())
            .or_else(|| cmd.name.clone())
            .unwrap_or_else(|| format!("pid-{pid}"));
        // A name is not an identity: any program can call itself
        // qemu-system-x86_64 and name a thread "CPU 0/KVM".
        let kvm: Option<BTreeSet<u32>> = match kvm_identity(&self.proc, pid) {
            KvmIdentity::Guest { vcpus } if !vcpus.is_empty() => Some(vcpus),
            KvmIdentity::Guest { .. } | KvmIdentity::NotKvm => {
                warnings.push(format!(
                    "pid {pid} ({name:?}) looks like QEMU but holds no KVM vCPU (not a KVM \
                     guest, or still starting); ignored"
                ));
                return None;
            }
            KvmIdentity::Unreadable => {
                warnings.push(format!(
                    "pid {pid} ({name:?}): cannot read /proc/{pid}/fd (pinguard needs \
                     CAP_SYS_PTRACE for that): its vCPUs are taken from names, unverified"
                ));
                None
            }
        };
        let named: Vec<Vcpu> = threads
            .iter()
            .filter_map(|t| parse_vcpu_thread_name(&t.comm).map(|index| Vcpu { index, tid: t.tid }))
            .filter(|v| kvm.as_ref().is_none_or(|k| k.contains(&v.index)))
            .collect();

        let mut found: Option<(Vec<Vcpu>, Source)> = None;
        if let Some((path, vcpus)) = &c.explicit {
            if valid(vcpus) {
                found = Some((vcpus.clone(), Source::Qmp));
            } else {
                warnings.push(format!(
                    "guest {name} (pid {pid}): the vCPU threads --qmp {} reported are gone",
                    path.display()
                ));
            }
        }
        if found.is_none()
            && let Some(cached) = self.qmp_cache.get(&pid)
        {
            // A `CPU n/...` thread the cached map lacks means a vCPU was hot-plugged.
            let hotplugged = named.iter().any(|n| !cached.iter().any(|v| v.tid == n.tid));
            if valid(cached) && !hotplugged {
                found = Some((cached.clone(), Source::Qmp));
            } else {
                self.qmp_cache.remove(&pid);
            }
        }
        if found.is_none() {
            if let Some(lv) = &c.libvirt {
                // The monitor socket on a libvirt guest's command line is
                // libvirtd's own connection: QEMU would not answer a second
                // client, so libvirt's status file stands in for QMP.
                if valid(&lv.vcpus) {
                    found = Some((lv.vcpus.clone(), Source::Libvirt));
                }
            } else if c.explicit.is_none() {
                for sock in &cmd.qmp_sockets {
                    let path = self.resolve(pid, sock);
                    if self.opts.qmp.contains(&path) {
                        // Given with --qmp and already failed: reported as an error.
                        continue;
                    }
                    match query_cpus_fast(&path, QMP_TIMEOUT).map(|v| self.host_tids(pid, v)) {
                        Ok(vcpus) if valid(&vcpus) => {
                            self.qmp_cache.insert(pid, vcpus.clone());
                            found = Some((vcpus, Source::Qmp));
                            break;
                        }
                        Ok(_) => warnings.push(format!(
                            "guest {name} (pid {pid}): QMP socket {} answered with threads that \
                             are not this process's; ignoring it",
                            path.display()
                        )),
                        Err(e) => warnings.push(format!(
                            "guest {name} (pid {pid}): QMP socket {} from its command line: {e}; \
                             falling back to thread names",
                            path.display()
                        )),
                    }
                }
            }
        }
        if found.is_none() && !named.is_empty() {
            found = Some((named, Source::ThreadNames));
        }
        if found.is_none()
            && let Some(k) = &kvm
        {
            let in_kvm = self.vcpus_from_kvm(pid, &threads, k);
            if !in_kvm.is_empty() {
                found = Some((in_kvm, Source::Kvm));
            }
        }
        let Some((mut vcpus, source)) = found else {
            warnings.push(format!(
                "guest {name} (pid {pid}): cannot tell its vCPU threads apart (no QMP socket, \
                 no libvirt status, no thread names, and not every vCPU is running); start QEMU \
                 with -name {name},debug-threads=on or a -qmp socket, or pass --qmp PATH"
            ));
            if let Some(k) = &kvm {
                d.unidentified.push(Unidentified {
                    name,
                    pid,
                    vcpus: k.len(),
                });
            }
            return None;
        };
        vcpus.sort();
        let vcpu_tids: HashSet<u32> = vcpus.iter().map(|v| v.tid).collect();
        let mut emulator_tids: Vec<u32> = threads
            .iter()
            .filter(|t| !vcpu_tids.contains(&t.tid) && !t.no_setaffinity())
            .map(|t| t.tid)
            .collect();
        for k in &c.vhost {
            if let Ok(Some(info)) = self.proc.thread(*k, *k)
                && !info.no_setaffinity()
            {
                emulator_tids.push(*k);
            }
        }
        emulator_tids.sort_unstable();
        let manager = if c.libvirt.is_some() {
            Manager::Libvirt
        } else {
            Manager::None
        };
        Some(Guest {
            name,
            pid,
            vcpus,
            emulator_tids,
            source,
            manager,
        })
    }

    /// The vCPU threads of `pid`, from what the kernel says. KVM's debugfs
    /// (`kvm/<pid>-<vmfd>/vcpuN/pid`, when debugfs is mounted) names the
    /// thread that last ran each vCPU. Without it: a halted vCPU sleeps
    /// inside `ioctl(KVM_RUN)` on its vCPU fd (`anon_inode:kvm-vcpu:N`),
    /// which `/proc/.../syscall` shows; a vCPU executing guest code reads
    /// "running" and a paused one (`-S`, `stop`) waits in QEMU, and those
    /// are not guessed at. Kernel workers cloned from a vCPU thread (KVM's
    /// NX huge page recovery) show the registers they were cloned with and
    /// are left out. The map is returned only when it names one thread of
    /// this process per vCPU of `kvm`.
    fn vcpus_from_kvm(&self, pid: u32, threads: &[ThreadInfo], kvm: &BTreeSet<u32>) -> Vec<Vcpu> {
        let ours: HashSet<u32> = threads.iter().map(|t| t.tid).collect();
        let one_each = |mut v: Vec<Vcpu>| {
            v.sort();
            let ok = v.len() == kvm.len()
                && v.iter().all(|x| ours.contains(&x.tid))
                && v.iter().map(|x| x.index).collect::<BTreeSet<_>>() == *kvm;
            if ok { v } else { Vec::new() }
        };
        let from_debugfs = one_each(self.kvm_debugfs_vcpus(pid));
        if !from_debugfs.is_empty() {
            return from_debugfs;
        }
        let in_kvm_run = threads
            .iter()
            .filter(|t| !t.is_user_worker() && !t.is_kthread())
            .filter_map(|t| {
                let line = self.proc.syscall(pid, t.tid).ok().flatten()?;
                let target = self.proc.fd_target(pid, kvm_run_fd(&line)?)?;
                let index = target.strip_prefix("anon_inode:kvm-vcpu:")?.parse().ok()?;
                Some(Vcpu { index, tid: t.tid })
            })
            .collect();
        one_each(in_kvm_run)
    }

    /// `vcpuN/pid` of every VM of process `pid` in KVM's debugfs.
    fn kvm_debugfs_vcpus(&self, pid: u32) -> Vec<Vcpu> {
        let prefix = format!("{pid}-");
        let Ok(vms) = fs::read_dir(&self.opts.kvm_debugfs) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for vm in vms.flatten() {
            if !vm.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            for vcpu in fs::read_dir(vm.path()).into_iter().flatten().flatten() {
                let name = vcpu.file_name().to_string_lossy().into_owned();
                let Some(index) = name.strip_prefix("vcpu").and_then(|i| i.parse().ok()) else {
                    continue;
                };
                let tid = fs::read_to_string(vcpu.path().join("pid"))
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                if let Some(tid) = tid.filter(|t| *t > 0) {
                    out.push(Vcpu { index, tid });
                }
            }
        }
        out
    }

    /// A relative socket path is relative to QEMU's working directory.
    /// A QEMU in a mount namespace of its own (a container: KubeVirt's
    /// virt-launcher, `unshare --mount`) names a path in that namespace; it
    /// is reached through `/proc/PID/root` (or `/proc/PID/cwd`).
    fn resolve(&self, pid: u32, sock: &Path) -> PathBuf {
        let dir = self.proc.root().join(pid.to_string());
        let ns = |d: &Path| fs::read_link(d.join("ns/mnt")).ok();
        let own_ns = ns(&self.proc.root().join("self"));
        if own_ns.is_some() && ns(&dir) != own_ns {
            return match sock.strip_prefix("/") {
                Ok(rel) => dir.join("root").join(rel),
                Err(_) => dir.join("cwd").join(sock),
            };
        }
        if sock.is_absolute() {
            return sock.to_owned();
        }
        match fs::read_link(dir.join("cwd")) {
            Ok(cwd) => cwd.join(sock),
            Err(_) => sock.to_owned(),
        }
    }

    /// The vCPU map QEMU gave over QMP, in host thread ids: a QEMU in a PID
    /// namespace of its own reports the ids of that namespace, and
    /// `NSpid:` in each thread's status maps them to the host's.
    fn host_tids(&self, pid: u32, vcpus: Vec<Vcpu>) -> Vec<Vcpu> {
        let map = self.proc.ns_tids(pid);
        if map.is_empty() {
            return vcpus;
        }
        vcpus
            .into_iter()
            .map(|v| Vcpu {
                index: v.index,
                tid: map.get(&v.tid).copied().unwrap_or(v.tid),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        qmp::fake::{GREETING, serve as fake_qmp},
        *,
    };

    /// A fake procfs with processes and threads.
    struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn proc(&self) -> Proc {
            Proc::new(self.dir.path().join("proc"))
        }

        fn process(&self, pid: u32, cmdline: &str) {
            let d = self.dir.path().join("proc").join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            let nul: Vec<u8> = cmdline
                .split_whitespace()
                .flat_map(|a| a.bytes().chain([0]))
                .collect();
            fs::write(d.join("cmdline"), nul).unwrap();
        }

        fn thread(&self, pid: u32, tid: u32, comm: &str, flags: u32) {
            let root = self.dir.path().join("proc");
            let d = root
                .join(pid.to_string())
                .join("task")
                .join(tid.to_string());
            fs::create_dir_all(&d).unwrap();
            let mut fields = vec!["0".to_string(); 50];
            fields[0] = "S".into();
            fields[6] = flags.to_string();
            fs::write(
                d.join("stat"),
                format!("{tid} ({comm}) {}", fields.join(" ")),
            )
            .unwrap();
            let status =
                format!("Name:\t{comm}\nTgid:\t{pid}\nPid:\t{tid}\nCpus_allowed_list:\t0-3\n");
            fs::write(d.join("status"), &status).unwrap();
            fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
            // QEMU holds a KVM vCPU fd for each vCPU thread.
            if let Some(index) = parse_vcpu_thread_name(comm) {
                self.kvm_fd(pid, index);
            }
            // /proc/<tid>/status resolves any thread id, as the kernel does.
            let alias = root.join(tid.to_string());
            fs::create_dir_all(&alias).unwrap();
            fs::write(alias.join("status"), status).unwrap();
        }

        fn fd_dir(&self, pid: u32) -> PathBuf {
            self.dir
                .path()
                .join("proc")
                .join(pid.to_string())
                .join("fd")
        }

        /// A KVM vCPU fd of `pid` (what QEMU holds for each vCPU).
        fn kvm_fd(&self, pid: u32, index: u32) {
            let fd = self.fd_dir(pid);
            fs::create_dir_all(&fd).unwrap();
            std::os::unix::fs::symlink(
                format!("anon_inode:kvm-vcpu:{index}"),
                fd.join((100 + index).to_string()),
            )
            .unwrap();
        }

        /// Thread `tid` blocked in `ioctl(fd, KVM_RUN)` on vCPU `index`'s fd.
        fn in_kvm_run(&self, pid: u32, tid: u32, index: u32) {
            let line = format!("16 {:#x} 0xae80 0x0 0x0 0x0 0x0 0x7ffc 0x7f00", 100 + index);
            self.syscall(pid, tid, &line);
        }

        /// What `/proc/PID/task/TID/syscall` says.
        fn syscall(&self, pid: u32, tid: u32, line: &str) {
            let d = self
                .dir
                .path()
                .join("proc")
                .join(pid.to_string())
                .join("task")
                .join(tid.to_string());
            fs::write(d.join("syscall"), format!("{line}\n")).unwrap();
        }

        /// A thread that only looks like a vCPU (no KVM fd behind it).
        fn impostor_thread(&self, pid: u32, tid: u32, comm: &str) {
            let fd = self.fd_dir(pid);
            self.thread(pid, tid, comm, 0);
            let _ = fs::remove_dir_all(fd);
        }

        fn libvirt_dir(&self) -> PathBuf {
            let d = self.dir.path().join("libvirt");
            fs::create_dir_all(&d).unwrap();
            d
        }
    }

    fn opts(fake: &FakeProc) -> DiscoverOptions {
        DiscoverOptions {
            qmp: vec![],
            libvirt_dir: fake.dir.path().join("no-libvirt"),
            kvm_debugfs: fake.dir.path().join("kvm"),
        }
    }

    const PF_KTHREAD: u32 = pin_common::PF_KTHREAD;
    const PF_NO_SETAFFINITY: u32 = pin_common::PF_NO_SETAFFINITY;

    #[test]
    fn qmp_thread_ids_from_a_pid_namespace_become_host_ids() {
        let fake = FakeProc::new();
        fake.process(500, "qemu-system-x86_64 -name ctr");
        for (tid, inner) in [(500, 1), (501, 2), (502, 3)] {
            fake.thread(500, tid, "qemu-system-x86", 0);
            let status = fake.dir.path().join(format!("proc/500/task/{tid}/status"));
            let mut text = fs::read_to_string(&status).unwrap();
            text.push_str(&format!("NSpid:\t{tid}\t{inner}\n"));
            fs::write(&status, text).unwrap();
        }
        let d = Discoverer::new(fake.proc(), opts(&fake));
        let inner = vec![Vcpu { index: 0, tid: 3 }];
        assert_eq!(d.host_tids(500, inner), vec![Vcpu { index: 0, tid: 502 }]);
        // Same namespace: ids unchanged.
        fake.process(600, "qemu-system-x86_64 -name plain");
        fake.thread(600, 601, "qemu-system-x86", 0);
        let same = vec![Vcpu { index: 0, tid: 601 }];
        assert_eq!(d.host_tids(600, same.clone()), same);
    }

    #[test]
    fn kvm_run_names_the_vcpu_fd() {
        assert_eq!(
            kvm_run_fd("16 0x12 0xae80 0x0 0x0 0x0 0x0 0x7ffc 0x7f00"),
            Some(0x12)
        );
        assert_eq!(
            kvm_run_fd("16 0x12 0x5401 0x0 0x0 0x0 0x0 0x7ffc 0x7f00"),
            None
        );
        assert_eq!(
            kvm_run_fd("202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffc 0x7f00"),
            None
        );
        assert_eq!(kvm_run_fd("running"), None);
        assert_eq!(kvm_run_fd("-1 0x7ffc 0x7f00"), None);
    }

    #[test]
    fn a_guest_without_names_or_qmp_is_found_in_kvm_run_or_reported_unidentified() {
        let fake = FakeProc::new();
        // Running: both vCPU threads sit in KVM_RUN on their vCPU fds.
        fake.process(100, "qemu-system-x86_64 -name quiet");
        for tid in [100, 101, 102, 103] {
            fake.thread(100, tid, "qemu-system-x86", 0);
        }
        fake.kvm_fd(100, 0);
        fake.kvm_fd(100, 1);
        fake.in_kvm_run(100, 103, 0);
        fake.in_kvm_run(100, 102, 1);
        // KVM's NX recovery worker, cloned from vCPU 0 inside KVM_RUN,
        // shows the same system call: a user worker, not a vCPU.
        fake.thread(100, 104, "kvm-nx-lpage-re", 0x4000);
        fake.in_kvm_run(100, 104, 0);
        // Busy: its one vCPU executes guest code, the only thread that does.
        fake.process(300, "qemu-system-x86_64 -name busy");
        for tid in [300, 301, 302] {
            fake.thread(300, tid, "qemu-system-x86", 0);
        }
        fake.kvm_fd(300, 0);
        fake.syscall(300, 300, "271 0x1 0x4 0x7ffc 0x0 0x8 0x0 0x7ffc 0x7f00");
        fake.syscall(300, 301, "running");
        fake.syscall(300, 302, "running");
        // KVM's debugfs names the thread that runs vCPU 0.
        let vcpu0 = fake.dir.path().join("kvm/300-11/vcpu0");
        fs::create_dir_all(&vcpu0).unwrap();
        fs::write(vcpu0.join("pid"), "301\n").unwrap();
        // Paused (-S): its vCPU waits in QEMU, not in KVM_RUN.
        fake.process(200, "qemu-system-x86_64 -name paused -S");
        fake.thread(200, 200, "qemu-system-x86", 0);
        fake.thread(200, 201, "qemu-system-x86", 0);
        fake.kvm_fd(200, 0);

        let found = Discoverer::new(fake.proc(), opts(&fake)).scan().unwrap();
        assert_eq!(found.guests.len(), 2, "{:?}", found.guests);
        let busy = &found.guests[0];
        assert_eq!((busy.name.as_str(), busy.source), ("busy", Source::Kvm));
        assert_eq!(busy.vcpus, vec![Vcpu { index: 0, tid: 301 }]);
        let g = &found.guests[1];
        assert_eq!((g.name.as_str(), g.source), ("quiet", Source::Kvm));
        assert_eq!(
            g.vcpus,
            vec![Vcpu { index: 0, tid: 103 }, Vcpu { index: 1, tid: 102 }]
        );
        assert_eq!(g.emulator_tids, vec![100, 101, 104]);
        assert_eq!(
            found.unidentified,
            vec![Unidentified {
                name: "paused".into(),
                pid: 200,
                vcpus: 1
            }]
        );
    }

    #[test]
    fn finds_guests_by_thread_names() {
        let fake = FakeProc::new();
        fake.process(1, "/sbin/init");
        fake.thread(1, 1, "init", 0);
        fake.process(100, "qemu-system-x86_64 -name g1,debug-threads=on -S");
        fake.thread(100, 100, "qemu-system-x86", 0);
        fake.thread(100, 101, "call_rcu", 0);
        fake.thread(100, 103, "CPU 1/KVM", 0);
        fake.thread(100, 102, "CPU 0/KVM", 0);
        fake.thread(100, 104, "iou-wrk-100", PF_NO_SETAFFINITY);
        fake.thread(100, 105, "vhost-100", 0);
        // An old-style vhost kernel worker of guest 100, and an impostor.
        fake.process(200, "");
        fake.thread(200, 200, "vhost-100", PF_KTHREAD);
        fake.process(201, "fake");
        fake.thread(201, 201, "vhost-100", 0);
        // The in-kernel PIT's worker of guest 100.
        fake.process(202, "");
        fake.thread(202, 202, "kvm-pit/100", PF_KTHREAD);
        // A guest without names and without QMP is skipped with a warning.
        fake.process(300, "qemu-system-x86_64 -name anon");
        fake.thread(300, 300, "qemu-system-x86", 0);
        fake.thread(300, 301, "qemu-system-x86", 0);
        fake.kvm_fd(300, 0);
        // A program that only calls itself QEMU and names a thread like a
        // vCPU: no KVM vCPU behind it, so not a guest.
        fake.process(700, "qemu-system-x86_64 -name g1,debug-threads=on");
        fake.thread(700, 700, "qemu-system-x86", 0);
        fake.impostor_thread(700, 701, "CPU 0/KVM");
        // A QEMU that exited between listing and reading.
        fake.process(400, "qemu-system-x86_64 -name gone,debug-threads=on");

        let mut d = Discoverer::new(fake.proc(), opts(&fake));
        let found = d.scan().unwrap();
        assert!(found.errors.is_empty());
        assert_eq!(found.guests.len(), 1, "{:?}", found.guests);
        let g = &found.guests[0];
        assert_eq!(g.name, "g1");
        assert_eq!(g.pid, 100);
        assert_eq!(g.source, Source::ThreadNames);
        assert_eq!(
            g.vcpus,
            vec![Vcpu { index: 0, tid: 102 }, Vcpu { index: 1, tid: 103 }]
        );
        assert_eq!(g.emulator_tids, vec![100, 101, 105, 200, 202]);
        assert_eq!(g.vcpu_tid(1), Some(103));
        assert_eq!(g.vcpu_of(102), Some(0));
        assert_eq!(g.tids().count(), 7);
        assert_eq!(found.warnings.len(), 2, "{:?}", found.warnings);
        assert!(
            found.warnings[0].contains("anon") && found.warnings[0].contains("debug-threads=on")
        );
        assert!(
            found.warnings[1].contains("pid 700") && found.warnings[1].contains("no KVM vCPU"),
            "{:?}",
            found.warnings
        );
        assert!(!is_kvm_guest(&fake.proc(), 700));
        assert!(is_kvm_guest(&fake.proc(), 100));

        // One pid at a time, and nothing for a non-guest.
        let again = d.rediscover(100).unwrap();
        assert_eq!(again.guests, found.guests);
        assert!(d.rediscover(1).unwrap().guests.is_empty());
        assert!(d.rediscover(99999).unwrap().guests.is_empty());
        assert_eq!(
            discover_pid(&fake.proc(), &opts(&fake), 100)
                .unwrap()
                .unwrap()
                .name,
            "g1"
        );
        assert_eq!(discover(&fake.proc(), &opts(&fake)).unwrap().len(), 1);
    }

    #[test]
    fn libvirt_status_wins_over_thread_names() {
        let fake = FakeProc::new();
        // libvirt runs QEMU with its monitor on a socket libvirtd holds:
        // pinguard must not try it (it would hang for the timeout).
        fake.process(
            500,
            "/usr/bin/qemu-system-x86_64 -name guest=web,debug-threads=on \
             -chardev socket,id=charmonitor,path=/nonexistent/monitor.sock,server=on,wait=off \
             -mon chardev=charmonitor,id=monitor,mode=control",
        );
        fake.thread(500, 500, "qemu-system-x86", 0);
        fake.thread(500, 510, "CPU 0/KVM", 0);
        fake.thread(500, 511, "worker", 0);
        let dir = fake.libvirt_dir();
        fs::write(
            dir.join("web.xml"),
            "<domstatus state='running' pid='500'><vcpus><vcpu id='0' pid='510'/></vcpus>\
             <domain type='kvm'><name>web</name></domain></domstatus>",
        )
        .unwrap();
        fs::write(dir.join("broken.xml"), "<domstatus").unwrap();
        fs::write(dir.join("web.pid"), "500").unwrap();
        let o = DiscoverOptions {
            qmp: vec![],
            libvirt_dir: dir,
            ..opts(&fake)
        };
        let found = Discoverer::new(fake.proc(), o).scan().unwrap();
        assert_eq!(found.guests.len(), 1);
        let g = &found.guests[0];
        assert_eq!((g.name.as_str(), g.source), ("web", Source::Libvirt));
        assert_eq!(g.vcpus, vec![Vcpu { index: 0, tid: 510 }]);
        assert_eq!(g.emulator_tids, vec![500, 511]);
        assert_eq!(found.warnings.len(), 1, "{:?}", found.warnings);
        assert!(found.warnings[0].contains("broken.xml"));
    }

    #[test]
    fn a_tcg_guest_is_measurable_with_its_vcpus_from_qmp_and_its_agent_socket() {
        let fp = FakeProc::new();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        fp.process(
            700,
            &format!(
                "qemu-system-x86_64 -name tcg1 -accel tcg -qmp unix:{},server=on,wait=off \
                 -device virtio-serial -chardev socket,path=/tmp/tcg1-qga.sock,server=on,wait=off,id=qga0 \
                 -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
                sock.display()
            ),
        );
        fp.thread(700, 700, "qemu-system-x86", 0);
        fp.thread(700, 702, "CPU 0/TCG", 0);
        fp.process(800, "qemu-system-x86_64 -name plain -accel tcg");
        fp.thread(800, 800, "qemu-system-x86", 0);
        fp.thread(800, 801, "CPU 0/TCG", 0);
        let server = fake_qmp(&sock, vec![(0, 702)], GREETING);
        let opts = DiscoverOptions {
            libvirt_dir: dir.path().join("no-libvirt"),
            ..Default::default()
        };
        let mut d = Discoverer::new(fp.proc(), opts);
        let g = d.find_measurable("tcg1").unwrap();
        server.join().unwrap();
        assert_eq!((g.pid, g.source), (700, Source::Qmp));
        assert_eq!(g.vcpus, vec![Vcpu { index: 0, tid: 702 }]);
        assert_eq!(g.accelerator, "tcg");
        assert_eq!(
            g.agent,
            Ok(AgentAddr::Socket(PathBuf::from("/tmp/tcg1-qga.sock")))
        );
        // No QMP, no agent port: the vCPU from its thread name, and the fix.
        let g = d.find_measurable("plain").unwrap();
        assert_eq!((g.source, g.vcpus[0].tid), (Source::ThreadNames, 801));
        let why = g.agent.unwrap_err();
        assert!(
            why.contains("-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"),
            "{why}"
        );
        let e = d.find_measurable("nope").unwrap_err().to_string();
        assert!(
            e.contains("no running QEMU guest is named \"nope\"") && e.contains("plain, tcg1"),
            "{e}"
        );
    }

    #[test]
    fn qmp_from_cmdline_and_explicit() {
        let fake = FakeProc::new();
        let sock = fake.dir.path().join("g.sock");
        // No debug-threads: only QMP can tell the vCPUs apart.
        fake.process(
            600,
            &format!(
                "qemu-system-x86_64 -name g2 -qmp unix:{},server=on,wait=off",
                sock.display()
            ),
        );
        fake.thread(600, 600, "qemu-system-x86", 0);
        fake.thread(600, 601, "qemu-system-x86", 0);
        fake.thread(600, 602, "qemu-system-x86", 0);
        fake.kvm_fd(600, 0);
        let server = fake_qmp(&sock, vec![(0, 602)], GREETING);
        let mut d = Discoverer::new(fake.proc(), opts(&fake));
        let found = d.scan().unwrap();
        server.join().unwrap();
        assert!(found.warnings.is_empty(), "{:?}", found.warnings);
        let g = &found.guests[0];
        assert_eq!((g.name.as_str(), g.source), ("g2", Source::Qmp));
        assert_eq!(g.vcpus, vec![Vcpu { index: 0, tid: 602 }]);
        assert_eq!(g.emulator_tids, vec![600, 601]);

        // The second scan answers from the cache: the fake monitor is gone.
        let found = d.scan().unwrap();
        assert_eq!(found.guests[0].source, Source::Qmp);
        assert!(found.warnings.is_empty());

        // Rediscovering asks QEMU again; with the monitor gone that is a
        // warning and the guest cannot be mapped.
        let again = d.rediscover(600).unwrap();
        assert!(again.guests.is_empty());
        assert!(
            again.warnings[0].contains("cannot connect"),
            "{:?}",
            again.warnings
        );
        assert!(again.warnings.iter().any(|w| w.contains("debug-threads")));

        // An explicit --qmp socket maps its guest through the thread ids.
        let explicit = fake.dir.path().join("explicit.sock");
        let server = fake_qmp(&explicit, vec![(0, 601)], GREETING);
        let o = DiscoverOptions {
            qmp: vec![explicit.clone()],
            libvirt_dir: fake.dir.path().join("none"),
            ..opts(&fake)
        };
        let found = discover(&fake.proc(), &o).unwrap();
        server.join().unwrap();
        assert_eq!(found[0].vcpus, vec![Vcpu { index: 0, tid: 601 }]);

        // An explicit socket that does not answer is an error naming it.
        let err = discover(&fake.proc(), &o).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "--qmp {}: cannot connect: Connection refused",
                explicit.display()
            )
        );
    }
}
