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
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use thiserror::Error;

use crate::host::procfs::{Proc, ThreadInfo};

/// Bound on one whole QMP exchange (connect, greeting, two commands).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// Where libvirt keeps the live status of running QEMU domains.
pub const DEFAULT_LIBVIRT_DIR: &str = "/run/libvirt/qemu";
/// A QMP reply larger than this is not something pinguard asked for.
const MAX_QMP_LINE: u64 = 1 << 20;

/// Where a guest's vCPU map came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Qmp,
    Libvirt,
    ThreadNames,
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
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        Self {
            qmp: Vec::new(),
            libvirt_dir: PathBuf::from(DEFAULT_LIBVIRT_DIR),
        }
    }
}

/// Talking to a QMP monitor failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QmpError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error(
        "no answer within {0:?}: QEMU serves one QMP client at a time, is another client \
         (libvirt, a script) connected to this socket?"
    )]
    Timeout(Duration),
    #[error("QEMU closed the connection")]
    Closed,
    #[error(
        "not a QMP monitor (it said {0:?}): give a -qmp or -mon mode=control socket, not a -monitor (HMP) one"
    )]
    NotQmp(String),
    #[error("QEMU rejected {command}: {desc}")]
    Rejected { command: String, desc: String },
    #[error("unexpected reply from QEMU: {0}")]
    BadReply(String),
    #[error("{0}")]
    Io(String),
    #[error("QEMU reported no vCPUs")]
    NoVcpus,
    #[error(
        "vCPU thread {tid} reported by QEMU is not visible in /proc (is QEMU in another PID namespace?)"
    )]
    NotVisible { tid: u32 },
    #[error("QEMU reported vCPU threads of different processes ({first} and {other})")]
    MixedProcesses { first: u32, other: u32 },
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

impl Discoverer {
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
        let mut libvirt = self.read_libvirt(None, &mut d.warnings);
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
            if let Some(g) = self.build(pid, c, &mut d.warnings) {
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
        let libvirt = self.read_libvirt(Some(pid), &mut d.warnings).remove(&pid);
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
        if let Some(g) = self.build(pid, c, &mut d.warnings) {
            d.guests.push(g);
        }
        Ok(d)
    }

    /// The QEMU pid a `vhost-<pid>` kernel thread works for.
    fn vhost_owner(&self, pid: u32) -> Option<u32> {
        let comm = self.proc.comm(pid, pid).ok().flatten()?;
        let owner = parse_vhost_name(&comm)?;
        let info = self.proc.thread(pid, pid).ok().flatten()?;
        info.is_kthread().then_some(owner)
    }

    /// libvirt status files by QEMU pid (`only`: just that pid's).
    fn read_libvirt(
        &self,
        only: Option<u32>,
        warnings: &mut Vec<String>,
    ) -> HashMap<u32, LibvirtStatus> {
        let mut out = HashMap::new();
        let dir = &self.opts.libvirt_dir;
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            // No libvirt on this host: nothing to say.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return out,
            Err(e) => {
                warnings.push(format!(
                    "cannot read libvirt status directory {}: {e}",
                    dir.display()
                ));
                return out;
            }
        };
        for entry in rd.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "xml") {
                continue;
            }
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                // libvirt removes the file when the domain stops.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    warnings.push(format!("cannot read {}: {e}", path.display()));
                    continue;
                }
            };
            match parse_libvirt_status(&text, &stem) {
                Ok(st) if only.is_none_or(|p| p == st.pid) => {
                    out.insert(st.pid, st);
                }
                Ok(_) => {}
                Err(e) => warnings.push(format!("{}: {e}", path.display())),
            }
        }
        out
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
    fn build(&mut self, pid: u32, c: Candidate, warnings: &mut Vec<String>) -> Option<Guest> {
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
        let named: Vec<Vcpu> = threads
            .iter()
            .filter_map(|t| parse_vcpu_thread_name(&t.comm).map(|index| Vcpu { index, tid: t.tid }))
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
                    match query_cpus_fast(&path, QMP_TIMEOUT) {
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
        let Some((mut vcpus, source)) = found else {
            warnings.push(format!(
                "guest {name} (pid {pid}): cannot tell its vCPU threads apart; start QEMU with \
                 -name {name},debug-threads=on or a -qmp socket, or pass --qmp PATH"
            ));
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
        Some(Guest {
            name,
            pid,
            vcpus,
            emulator_tids,
            source,
        })
    }

    /// A relative socket path is relative to QEMU's working directory.
    fn resolve(&self, pid: u32, sock: &Path) -> PathBuf {
        if sock.is_absolute() {
            return sock.to_owned();
        }
        match fs::read_link(self.proc.root().join(pid.to_string()).join("cwd")) {
            Ok(cwd) => cwd.join(sock),
            Err(_) => sock.to_owned(),
        }
    }
}

/// Whether a command line is QEMU's (by program name).
pub fn is_qemu_argv(argv: &[String]) -> bool {
    let Some(prog) = argv.first() else {
        return false;
    };
    let base = prog.rsplit('/').next().unwrap_or(prog);
    base.starts_with("qemu-system-") || base == "qemu-kvm" || base == "kvm"
}

/// `CPU 3/KVM` -> 3 (QEMU names vCPU threads so with `debug-threads=on`).
pub fn parse_vcpu_thread_name(comm: &str) -> Option<u32> {
    let rest = comm.strip_prefix("CPU ")?;
    let (index, accel) = rest.split_once('/')?;
    if accel.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    index.parse().ok()
}

/// `vhost-1234` -> 1234 (the vhost worker of QEMU process 1234).
pub fn parse_vhost_name(comm: &str) -> Option<u32> {
    let pid = comm.strip_prefix("vhost-")?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// What pinguard reads from a QEMU command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuCmdline {
    /// `-name guest=X,...` or `-name X`.
    pub name: Option<String>,
    /// `debug-threads=on` in `-name` (vCPU threads are named `CPU n/KVM`).
    pub debug_threads: bool,
    /// Unix sockets of QMP monitors, as written (relative paths are
    /// relative to QEMU's working directory).
    pub qmp_sockets: Vec<PathBuf>,
    /// QMP monitors pinguard cannot use (TCP, stdio, abstract sockets).
    pub other_qmp: Vec<String>,
}

/// Splits QEMU's `key=value,key=value` option syntax, where `,,` is a
/// literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// Key/value pairs of a QEMU option argument. A first element without `=`
/// is the value of the option's implied key; later bare flags are `on`,
/// or `off` with a `no` prefix (the legacy `server,nowait` style).
fn parse_opts(s: &str, implied: &str) -> Vec<(String, String)> {
    split_opts(s)
        .into_iter()
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 => (implied.to_string(), p),
            None => match p.strip_prefix("no") {
                Some(k) => (k.to_string(), "off".to_string()),
                None => (p, "on".to_string()),
            },
        })
        .collect()
}

fn opt<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn is_on(v: Option<&str>) -> bool {
    matches!(v, Some("on" | "yes" | "true" | "y"))
}

/// Reads the guest name and the QMP sockets from a QEMU command line.
pub fn parse_qemu_cmdline(argv: &[String]) -> QemuCmdline {
    let mut out = QemuCmdline::default();
    // chardev id -> socket path, and the chardevs of QMP (-mon mode=control) monitors
    let mut chardevs: HashMap<String, Option<PathBuf>> = HashMap::new();
    let mut qmp_mons: Vec<String> = Vec::new();
    let mut i = 1;
    while i < argv.len() {
        let arg = argv[i].as_str();
        // QEMU accepts --opt as well as -opt.
        let opt_name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'));
        let value = argv.get(i + 1).map(String::as_str);
        let (Some(name), Some(value)) = (opt_name, value) else {
            i += 1;
            continue;
        };
        match name {
            "name" => {
                let opts = parse_opts(value, "guest");
                out.name = opt(&opts, "guest")
                    .filter(|n| !n.is_empty())
                    .map(str::to_string);
                out.debug_threads = is_on(opt(&opts, "debug-threads"));
            }
            "qmp" | "qmp-pretty" => match value.strip_prefix("unix:") {
                Some(rest) => {
                    let opts = parse_opts(rest, "path");
                    match opt(&opts, "path") {
                        Some(p) if !is_on(opt(&opts, "abstract")) && !p.is_empty() => {
                            out.qmp_sockets.push(PathBuf::from(p))
                        }
                        _ => out.other_qmp.push(value.to_string()),
                    }
                }
                None => out.other_qmp.push(value.to_string()),
            },
            "chardev" => {
                let opts = parse_opts(value, "backend");
                if let Some(id) = opt(&opts, "id") {
                    let path = (opt(&opts, "backend") == Some("socket")
                        && !is_on(opt(&opts, "abstract")))
                    .then(|| opt(&opts, "path"))
                    .flatten()
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from);
                    chardevs.insert(id.to_string(), path);
                }
            }
            "mon" => {
                let opts = parse_opts(value, "chardev");
                if opt(&opts, "mode") == Some("control")
                    && let Some(chardev) = opt(&opts, "chardev")
                {
                    qmp_mons.push(chardev.to_string());
                }
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    for id in qmp_mons {
        match chardevs.get(&id) {
            Some(Some(path)) => out.qmp_sockets.push(path.clone()),
            _ => out.other_qmp.push(format!("chardev={id}")),
        }
    }
    out
}

/// The parts of libvirt's live status XML pinguard uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtStatus {
    pub name: String,
    pub pid: u32,
    pub vcpus: Vec<Vcpu>,
}

/// Parses `/run/libvirt/qemu/<domain>.xml` (`<domstatus pid=..>` with
/// `<vcpus><vcpu id=.. pid=../></vcpus>`). `fallback_name` (the file
/// name) is used when the embedded `<domain>` has no `<name>`.
pub fn parse_libvirt_status(xml: &str, fallback_name: &str) -> Result<LibvirtStatus, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domstatus" {
        return Err(format!(
            "expected a <domstatus> element, found <{}>",
            root.tag_name().name()
        ));
    }
    let pid = root
        .attribute("pid")
        .and_then(|p| p.parse().ok())
        .ok_or("<domstatus> has no numeric pid attribute")?;
    // Only the status's own <vcpus>: the embedded <domain> may have a
    // <vcpus> of its own (hotplug configuration) without thread ids.
    let mut vcpus = Vec::new();
    if let Some(list) = root.children().find(|n| n.has_tag_name("vcpus")) {
        for (pos, v) in list
            .children()
            .filter(|n| n.has_tag_name("vcpu"))
            .enumerate()
        {
            let tid = v
                .attribute("pid")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("<vcpu> number {pos} has no numeric pid attribute"))?;
            // Old libvirt wrote no id: the position is the index.
            let index = match v.attribute("id") {
                Some(id) => id
                    .parse()
                    .map_err(|_| format!("<vcpu id={id:?}> is not a number"))?,
                None => pos as u32,
            };
            vcpus.push(Vcpu { index, tid });
        }
    }
    vcpus.sort();
    let name = root
        .children()
        .find(|n| n.has_tag_name("domain"))
        .and_then(|d| d.children().find(|n| n.has_tag_name("name")))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| fallback_name.to_string());
    Ok(LibvirtStatus { name, pid, vcpus })
}

/// "Permission denied" rather than "Permission denied (os error 13)".
fn io_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connects with a bound on the wait: connect(2) on a unix socket blocks
/// while the listener's backlog is full (QEMU listens with a backlog of 1
/// and serves one client at a time), for at most SO_SNDTIMEO.
fn connect_unix(path: &Path, timeout: Duration) -> Result<UnixStream, QmpError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(QmpError::Connect(format!(
            "the path is longer than the {} bytes a unix socket address holds",
            addr.sun_path.len() - 1
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) has no memory-safety preconditions; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(QmpError::Connect(io_reason(&io::Error::last_os_error())));
    }
    // SAFETY: fd is a freshly created socket nobody else owns.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let io_err = |e: io::Error| QmpError::Io(io_reason(&e));
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(if is_timeout(&e) {
            QmpError::Timeout(timeout)
        } else {
            QmpError::Connect(io_reason(&e))
        });
    }
    Ok(stream)
}

/// One short QMP session.
struct QmpSession {
    reader: BufReader<UnixStream>,
    deadline: Instant,
    timeout: Duration,
}

impl QmpSession {
    fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = connect_unix(path, timeout)?;
        let mut s = Self {
            reader: BufReader::new(stream),
            deadline,
            timeout,
        };
        let line = s.read_line()?;
        let greeting: Option<Value> = serde_json::from_str(&line).ok();
        if greeting.as_ref().and_then(|g| g.get("QMP")).is_none() {
            let mut shown: String = line.chars().take(60).collect();
            if shown.len() < line.len() {
                shown.push_str("...");
            }
            return Err(QmpError::NotQmp(shown));
        }
        Ok(s)
    }

    fn read_line(&mut self) -> Result<String, QmpError> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(self.timeout));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| QmpError::Io(io_reason(&e)))?;
            let mut line = String::new();
            let n = (&mut self.reader)
                .take(MAX_QMP_LINE)
                .read_line(&mut line)
                .map_err(|e| {
                    if is_timeout(&e) {
                        QmpError::Timeout(self.timeout)
                    } else {
                        QmpError::Io(io_reason(&e))
                    }
                })?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if n as u64 == MAX_QMP_LINE && !line.ends_with('\n') {
                return Err(QmpError::BadReply(format!(
                    "a message longer than {MAX_QMP_LINE} bytes"
                )));
            }
            let line = line.trim();
            if !line.is_empty() {
                return Ok(line.to_string());
            }
        }
    }

    /// The next message that is not an asynchronous event.
    fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            let line = self.read_line()?;
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| QmpError::BadReply(format!("invalid JSON ({e}): {line}")))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let id = format!("pinguard-{command}");
        let msg = serde_json::json!({ "execute": command, "id": id });
        let mut line = msg.to_string();
        line.push('\n');
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| {
                if is_timeout(&e) {
                    QmpError::Timeout(self.timeout)
                } else {
                    QmpError::Io(io_reason(&e))
                }
            })?;
        loop {
            let v = self.read_message()?;
            match v.get("id") {
                Some(got) if got != id.as_str() => continue,
                _ => {}
            }
            return parse_reply(command, v);
        }
    }
}

/// The `return` value of a QMP reply, or its error.
fn parse_reply(command: &str, v: Value) -> Result<Value, QmpError> {
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    if let Some(e) = v.get("error") {
        let desc = e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("no description")
            .to_string();
        return Err(QmpError::Rejected {
            command: command.to_string(),
            desc,
        });
    }
    Err(QmpError::BadReply(v.to_string()))
}

/// Parses the `return` of `query-cpus-fast`:
/// `[{"cpu-index": 0, "thread-id": 1234, ...}, ...]`.
pub fn parse_cpus_fast(ret: &Value) -> Result<Vec<Vcpu>, QmpError> {
    let list = ret
        .as_array()
        .ok_or_else(|| QmpError::BadReply(format!("query-cpus-fast returned {ret}")))?;
    let mut vcpus = Vec::with_capacity(list.len());
    for cpu in list {
        let field = |k: &str| {
            cpu.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    QmpError::BadReply(format!("query-cpus-fast entry without {k}: {cpu}"))
                })
        };
        vcpus.push(Vcpu {
            index: field("cpu-index")?,
            tid: field("thread-id")?,
        });
    }
    if vcpus.is_empty() {
        return Err(QmpError::NoVcpus);
    }
    vcpus.sort();
    Ok(vcpus)
}

/// Asks a QEMU monitor which thread runs each vCPU: connect, query, close
/// (QEMU 7.2 serves one QMP client at a time, so the socket is not held).
pub fn query_cpus_fast(path: &Path, timeout: Duration) -> Result<Vec<Vcpu>, QmpError> {
    let mut s = QmpSession::connect(path, timeout)?;
    s.execute("qmp_capabilities")?;
    let ret = s.execute("query-cpus-fast")?;
    parse_cpus_fast(&ret)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn recognises_qemu_and_thread_names() {
        assert!(is_qemu_argv(&args("/usr/bin/qemu-system-x86_64 -m 128")));
        assert!(is_qemu_argv(&args("/usr/libexec/qemu-kvm -name x")));
        assert!(is_qemu_argv(&args("qemu-system-aarch64")));
        assert!(!is_qemu_argv(&args("/usr/bin/qemu-img info x")));
        assert!(!is_qemu_argv(&args("bash -c qemu-system-x86_64")));
        assert!(!is_qemu_argv(&[]));

        assert_eq!(parse_vcpu_thread_name("CPU 0/KVM"), Some(0));
        assert_eq!(parse_vcpu_thread_name("CPU 127/KVM"), Some(127));
        assert_eq!(parse_vcpu_thread_name("CPU 3/TCG"), Some(3));
        for not in [
            "CPU /KVM",
            "CPU 1/",
            "CPU x/KVM",
            "cpu 1/KVM",
            "qemu-system-x86",
            "IO mon_iothread",
        ] {
            assert_eq!(parse_vcpu_thread_name(not), None, "{not}");
        }
        assert_eq!(parse_vhost_name("vhost-4242"), Some(4242));
        assert_eq!(parse_vhost_name("vhost-"), None);
        assert_eq!(parse_vhost_name("vhost-net"), None);
    }

    #[test]
    fn qemu_cmdline_forms() {
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 -accel kvm -name g1,debug-threads=on \
             -qmp unix:/tmp/a/qmp.sock,server=on,wait=off -daemonize",
        ));
        assert_eq!(c.name.as_deref(), Some("g1"));
        assert!(c.debug_threads);
        assert_eq!(c.qmp_sockets, vec![PathBuf::from("/tmp/a/qmp.sock")]);

        // Legacy flags, relative path, guest= key, --option spelling.
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 --name guest=web,process=qemu-web -qmp unix:qmp.sock,server,nowait",
        ));
        assert_eq!(c.name.as_deref(), Some("web"));
        assert!(!c.debug_threads);
        assert_eq!(c.qmp_sockets, vec![PathBuf::from("qmp.sock")]);

        // libvirt style: a chardev plus a control-mode monitor.
        let c = parse_qemu_cmdline(&args(
            "/usr/bin/qemu-system-x86_64 -name guest=db,debug-threads=on \
             -chardev socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-1-db/monitor.sock,server=on,wait=off \
             -mon chardev=charmonitor,id=monitor,mode=control \
             -chardev socket,id=hmp,path=/tmp/hmp.sock,server=on \
             -mon chardev=hmp,mode=readline",
        ));
        assert_eq!(c.name.as_deref(), Some("db"));
        assert_eq!(
            c.qmp_sockets,
            vec![PathBuf::from(
                "/var/lib/libvirt/qemu/domain-1-db/monitor.sock"
            )]
        );

        // Passed file descriptors, TCP and abstract sockets cannot be used.
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 -chardev socket,id=m,fd=23,server=on,wait=off \
             -mon chardev=m,mode=control -qmp tcp:localhost:4444,server=on \
             -qmp unix:/x,abstract=on -name plain",
        ));
        assert!(c.qmp_sockets.is_empty());
        assert_eq!(c.other_qmp.len(), 3, "{:?}", c.other_qmp);
        assert_eq!(c.name.as_deref(), Some("plain"));

        // Escaped commas in values, and no -name at all.
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 -qmp unix:/tmp/a,,b.sock,server=on",
        ));
        assert_eq!(c.qmp_sockets, vec![PathBuf::from("/tmp/a,b.sock")]);
        assert_eq!(c.name, None);
        // A trailing option without its value is ignored, not a panic.
        assert_eq!(
            parse_qemu_cmdline(&args("qemu-system-x86_64 -qmp")),
            QemuCmdline::default()
        );
    }

    #[test]
    fn libvirt_status_xml() {
        let xml = r#"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST.
-->
<domstatus state='running' reason='booted' pid='17150'>
  <monitor path='/var/lib/libvirt/qemu/domain-59-web/monitor.sock' type='unix'/>
  <vcpus>
    <vcpu id='1' pid='17157'/>
    <vcpu id='0' pid='17156'/>
  </vcpus>
  <qemuCaps><flag name='kvm'/></qemuCaps>
  <domain type='kvm' id='59'>
    <name>web</name>
    <vcpu placement='static'>2</vcpu>
    <vcpus>
      <vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>
      <vcpu id='1' enabled='yes' hotpluggable='yes' order='2'/>
    </vcpus>
  </domain>
</domstatus>"#;
        let st = parse_libvirt_status(xml, "file-stem").unwrap();
        assert_eq!(st.name, "web");
        assert_eq!(st.pid, 17150);
        assert_eq!(
            st.vcpus,
            vec![
                Vcpu {
                    index: 0,
                    tid: 17156
                },
                Vcpu {
                    index: 1,
                    tid: 17157
                }
            ]
        );

        // Old libvirt: no ids, no embedded domain.
        let old = "<domstatus state='running' pid='12262'><vcpus><vcpu pid='12266'/>\
                   <vcpu pid='12267'/></vcpus></domstatus>";
        let st = parse_libvirt_status(old, "testvm").unwrap();
        assert_eq!(st.name, "testvm");
        assert_eq!(
            st.vcpus[1],
            Vcpu {
                index: 1,
                tid: 12267
            }
        );

        assert!(
            parse_libvirt_status("<domain/>", "x")
                .unwrap_err()
                .contains("domstatus")
        );
        assert!(
            parse_libvirt_status("<domstatus/>", "x")
                .unwrap_err()
                .contains("pid")
        );
        assert!(
            parse_libvirt_status(
                "<domstatus pid='1'><vcpus><vcpu id='0'/></vcpus></domstatus>",
                "x"
            )
            .unwrap_err()
            .contains("pid")
        );
        assert!(
            parse_libvirt_status("not xml", "x")
                .unwrap_err()
                .contains("invalid XML")
        );
    }

    #[test]
    fn cpus_fast_replies() {
        let ret: Value = serde_json::from_str(
            r#"[{"thread-id": 14293, "props": {"core-id": 1, "thread-id": 0, "socket-id": 0},
                 "qom-path": "/machine/unattached/device[2]", "cpu-index": 1, "target": "x86_64"},
                {"thread-id": 14292, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
                 "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_cpus_fast(&ret).unwrap(),
            vec![
                Vcpu {
                    index: 0,
                    tid: 14292
                },
                Vcpu {
                    index: 1,
                    tid: 14293
                }
            ]
        );
        assert_eq!(
            parse_cpus_fast(&serde_json::json!([])),
            Err(QmpError::NoVcpus)
        );
        assert!(matches!(
            parse_cpus_fast(&serde_json::json!([{"cpu-index": 0}])),
            Err(QmpError::BadReply(m)) if m.contains("thread-id")
        ));
        assert!(matches!(
            parse_reply("query-cpus-fast", serde_json::json!({"error": {"class": "CommandNotFound", "desc": "nope"}})),
            Err(QmpError::Rejected { desc, .. }) if desc == "nope"
        ));
    }

    /// A fake QEMU monitor: greeting, an event before each reply, and
    /// `query-cpus-fast` answering `vcpus`.
    fn fake_qmp(
        path: &Path,
        vcpus: Vec<(u32, u32)>,
        greeting: &'static str,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            w.write_all(greeting.as_bytes()).unwrap();
            let reader = BufReader::new(stream);
            for line in reader.lines() {
                let Ok(line) = line else { return };
                let req: Value = serde_json::from_str(&line).unwrap();
                let id = req["id"].clone();
                w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n")
                    .unwrap();
                let ret = match req["execute"].as_str().unwrap() {
                    "qmp_capabilities" => serde_json::json!({}),
                    "query-cpus-fast" => Value::Array(
                        vcpus
                            .iter()
                            .map(|(i, t)| serde_json::json!({"cpu-index": i, "thread-id": t, "target": "x86_64"}))
                            .collect(),
                    ),
                    _ => Value::Null,
                };
                let reply = serde_json::json!({"return": ret, "id": id});
                w.write_all(format!("{reply}\r\n").as_bytes()).unwrap();
            }
        })
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": [\"oob\"]}}\r\n";

    #[test]
    fn qmp_client_against_fake_monitor() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qmp(&sock, vec![(1, 101), (0, 100)], GREETING);
        let vcpus = query_cpus_fast(&sock, QMP_TIMEOUT).unwrap();
        assert_eq!(
            vcpus,
            vec![Vcpu { index: 0, tid: 100 }, Vcpu { index: 1, tid: 101 }]
        );
        server.join().unwrap();

        // An HMP monitor is recognised as such.
        let hmp = dir.path().join("hmp.sock");
        let server = fake_qmp(
            &hmp,
            vec![],
            "QEMU 7.2.0 monitor - type 'help' for more information\r\n",
        );
        let err = query_cpus_fast(&hmp, QMP_TIMEOUT).unwrap_err();
        assert!(matches!(err, QmpError::NotQmp(_)), "{err}");
        assert!(err.to_string().contains("-monitor"), "{err}");
        server.join().unwrap();

        // A silent monitor (another client holds it) times out, boundedly.
        let busy = dir.path().join("busy.sock");
        let _listener = UnixListener::bind(&busy).unwrap();
        let err = query_cpus_fast(&busy, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err, QmpError::Timeout(Duration::from_millis(200)));

        let err = query_cpus_fast(&dir.path().join("missing.sock"), QMP_TIMEOUT).unwrap_err();
        assert_eq!(err.to_string(), "cannot connect: No such file or directory");
        let long = dir.path().join("x".repeat(200));
        assert!(matches!(
            query_cpus_fast(&long, QMP_TIMEOUT),
            Err(QmpError::Connect(_))
        ));
    }

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
            // /proc/<tid>/status resolves any thread id, as the kernel does.
            let alias = root.join(tid.to_string());
            fs::create_dir_all(&alias).unwrap();
            fs::write(alias.join("status"), status).unwrap();
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
        }
    }

    const PF_KTHREAD: u32 = pin_common::PF_KTHREAD;
    const PF_NO_SETAFFINITY: u32 = pin_common::PF_NO_SETAFFINITY;

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
        // A guest without names and without QMP is skipped with a warning.
        fake.process(300, "qemu-system-x86_64 -name anon");
        fake.thread(300, 300, "qemu-system-x86", 0);
        fake.thread(300, 301, "qemu-system-x86", 0);
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
        assert_eq!(g.emulator_tids, vec![100, 101, 105, 200]);
        assert_eq!(g.vcpu_tid(1), Some(103));
        assert_eq!(g.vcpu_of(102), Some(0));
        assert_eq!(g.tids().count(), 6);
        assert_eq!(found.warnings.len(), 1, "{:?}", found.warnings);
        assert!(
            found.warnings[0].contains("anon") && found.warnings[0].contains("debug-threads=on")
        );

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
