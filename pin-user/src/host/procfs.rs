//! Reading processes and threads from procfs.
//!
//! Every read tolerates the process or thread vanishing between listing and
//! reading (ENOENT/ESRCH): that is the normal life of a host, not an error, so
//! such reads return `None` and callers move on.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::host::cpulist::CpuSet;

/// A procfs mount (normally `/proc`; tests point it at a fixture tree).
#[derive(Debug, Clone)]
pub struct Proc {
    root: PathBuf,
}

impl Default for Proc {
    fn default() -> Self {
        Self::new("/proc")
    }
}

/// The facts about one thread that pinguard classifies on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ThreadInfo {
    /// Thread group id (the process).
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
    /// Scheduler state letter (R, S, D, I, ...).
    pub state: char,
    /// `task_struct::flags` (PF_KTHREAD, PF_NO_SETAFFINITY, ...).
    pub flags: u32,
    /// CPU the thread last ran on.
    pub last_cpu: u32,
    /// The thread's affinity.
    pub allowed: CpuSet,
    /// When it started (clock ticks since boot, `stat` field 22): with the
    /// tid, its identity (a tid is reused; a tid and a start time are not).
    #[serde(skip)]
    pub start_time: u64,
    /// Its scheduling class, from the same read of `stat` (`None` when the
    /// facts come from elsewhere than /proc).
    #[serde(skip)]
    pub sched: Option<Sched>,
}

impl ThreadInfo {
    pub fn is_kthread(&self) -> bool {
        self.flags & pin_common::PF_KTHREAD != 0
    }

    /// A kernel worker cloned from a user thread (vhost workers, KVM's NX
    /// huge page recovery): in the process, but never running its code.
    pub fn is_user_worker(&self) -> bool {
        // PF_USER_WORKER, include/linux/sched.h (6.4+).
        self.flags & 0x0000_4000 != 0
    }

    pub fn no_setaffinity(&self) -> bool {
        self.flags & pin_common::PF_NO_SETAFFINITY != 0
    }
}

/// Reads a file, mapping "the task is gone" to `None`.
fn read_gone_ok(path: &Path) -> io::Result<Option<String>> {
    match read_small(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a task's `stat` or `status` holds fits here in one read (1-2 KiB).
const PROC_READ: usize = 4096;

/// `fs::read_to_string` for procfs files: the same result, in one open, two
/// reads (the second sees the end) and a close. std asks for the size first
/// (statx; procfs says 0) and then reads in small growing steps: ~7 system
/// calls per file, which made `pinguard audit` on 10 000 threads as slow as
/// `ps` (docs/BENCHMARKS.md, "Scale").
fn read_small(path: &Path) -> io::Result<String> {
    use std::io::Read as _;
    let mut file = fs::File::open(path)?;
    let mut buf = vec![0u8; PROC_READ];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// ENOENT and ESRCH both mean the task exited under us.
pub fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

impl Proc {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn numeric_entries(dir: &Path) -> io::Result<Vec<u32>> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if is_gone(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut ids: Vec<u32> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// All process ids.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        Self::numeric_entries(&self.root)
    }

    /// Thread ids of a process (empty if it exited).
    pub fn tids(&self, pid: u32) -> io::Result<Vec<u32>> {
        Self::numeric_entries(&self.root.join(pid.to_string()).join("task"))
    }

    fn task_dir(&self, pid: u32, tid: u32) -> PathBuf {
        self.root
            .join(pid.to_string())
            .join("task")
            .join(tid.to_string())
    }

    /// Reads one thread's facts; `None` if it exited.
    pub fn thread(&self, pid: u32, tid: u32) -> io::Result<Option<ThreadInfo>> {
        let dir = self.task_dir(pid, tid);
        let Some(stat) = read_gone_ok(&dir.join("stat"))? else {
            return Ok(None);
        };
        let Some(status) = read_gone_ok(&dir.join("status"))? else {
            return Ok(None);
        };
        let parsed = parse_stat(&stat).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unparsable {}/stat", dir.display()),
            )
        })?;
        let allowed = parse_status(&status).allowed.unwrap_or_default();
        Ok(Some(ThreadInfo {
            tgid: pid,
            tid,
            comm: parsed.comm,
            state: parsed.state,
            flags: parsed.flags,
            last_cpu: parsed.processor,
            allowed,
            start_time: parsed.start_time,
            sched: Sched::parse_stat(&stat),
        }))
    }

    /// When a thread started (see [`ThreadInfo::start_time`]); `None` if it
    /// exited. One file, not the two [`Proc::thread`] reads: the daemon asks
    /// for every vCPU at every tick.
    pub fn start_time(&self, pid: u32, tid: u32) -> io::Result<Option<u64>> {
        let path = self.task_dir(pid, tid).join("stat");
        let Some(stat) = read_gone_ok(&path)? else {
            return Ok(None);
        };
        parse_stat(&stat)
            .map(|s| Some(s.start_time))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unparsable {}", path.display()),
                )
            })
    }

    /// A process's parent (`stat` field 4); `None` if it exited.
    pub fn parent(&self, pid: u32) -> Option<u32> {
        let stat = fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
        let close = stat.rfind(')')?;
        stat.get(close + 1..)?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// All threads of a process that are still there.
    pub fn threads(&self, pid: u32) -> io::Result<Vec<ThreadInfo>> {
        let mut out = Vec::new();
        for tid in self.tids(pid)? {
            if let Some(t) = self.thread(pid, tid)? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Every thread on the host (the `ps -eLo` view).
    pub fn all_threads(&self) -> io::Result<Vec<ThreadInfo>> {
        let mut out = Vec::new();
        for pid in self.pids()? {
            out.extend(self.threads(pid)?);
        }
        Ok(out)
    }

    /// The command line of a process, split at NULs; `None` if it exited.
    /// Kernel threads have an empty command line.
    pub fn cmdline(&self, pid: u32) -> io::Result<Option<Vec<String>>> {
        let path = self.root.join(pid.to_string()).join("cmdline");
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(
                bytes
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect(),
            )),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The environment a process started with (`/proc/<pid>/environ`) as
    /// (name, value) pairs; `None` if it exited. Needs ptrace access to the
    /// process (root, or the same user): otherwise a PermissionDenied error.
    pub fn environ(&self, pid: u32) -> io::Result<Option<Vec<(String, String)>>> {
        let path = self.root.join(pid.to_string()).join("environ");
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(
                bytes
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        let s = String::from_utf8_lossy(s);
                        match s.split_once('=') {
                            Some((k, v)) => (k.to_string(), v.to_string()),
                            None => (s.into_owned(), String::new()),
                        }
                    })
                    .collect(),
            )),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `comm` of a thread (`None` if it exited).
    pub fn comm(&self, pid: u32, tid: u32) -> io::Result<Option<String>> {
        Ok(read_gone_ok(&self.task_dir(pid, tid).join("comm"))?.map(|s| s.trim_end().to_string()))
    }

    /// What a process's open file descriptors point to (`/proc/PID/fd/*`
    /// link targets, e.g. "anon_inode:kvm-vcpu:0"); empty if it exited.
    /// Reading another process's links is a ptrace-read access: without
    /// CAP_SYS_PTRACE it fails (PermissionDenied) for processes with more
    /// capabilities or another uid, i.e. for every QEMU a restricted daemon sees.
    pub fn fd_targets(&self, pid: u32) -> io::Result<Vec<String>> {
        let rd = match fs::read_dir(self.root.join(pid.to_string()).join("fd")) {
            Ok(rd) => rd,
            Err(e) if is_gone(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            match fs::read_link(entry.path()) {
                Ok(t) => out.push(t.to_string_lossy().into_owned()),
                // Closed meanwhile.
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The system call a thread is blocked in or executing
    /// (`/proc/PID/task/TID/syscall`: "NR arg1 ... arg6 sp pc", "running",
    /// or "-1 sp pc" in user space); `None` if it exited. Reading it is a
    /// ptrace-attach check, like the fds.
    pub fn syscall(&self, pid: u32, tid: u32) -> io::Result<Option<String>> {
        read_gone_ok(&self.task_dir(pid, tid).join("syscall"))
    }

    /// For a process in a PID namespace of its own: its threads' ids in
    /// that namespace -> on the host (`NSpid:` of each thread's status,
    /// outermost first). Empty when it shares pinguard's namespace.
    pub fn ns_tids(&self, pid: u32) -> std::collections::HashMap<u32, u32> {
        let mut out = std::collections::HashMap::new();
        for tid in self.tids(pid).unwrap_or_default() {
            let Ok(Some(status)) = read_gone_ok(&self.task_dir(pid, tid).join("status")) else {
                continue;
            };
            let ids = parse_status(&status).nspid;
            if let (Some(&host), Some(&inner), true) = (ids.first(), ids.last(), ids.len() > 1) {
                out.insert(inner, host);
            }
        }
        out
    }

    /// A thread's scheduling class; `None` if it exited.
    pub fn sched(&self, pid: u32, tid: u32) -> Option<Sched> {
        let stat = read_gone_ok(&self.task_dir(pid, tid).join("stat")).ok()??;
        Sched::parse_stat(&stat)
    }

    /// What file descriptor `fd` of process `pid` points to.
    pub fn fd_target(&self, pid: u32, fd: u32) -> Option<String> {
        fs::read_link(
            self.root
                .join(pid.to_string())
                .join("fd")
                .join(fd.to_string()),
        )
        .ok()
        .map(|t| t.to_string_lossy().into_owned())
    }

    /// The thread group a thread id belongs to (`Tgid:` of /proc/<tid>/status).
    pub fn tgid_of(&self, tid: u32) -> io::Result<Option<u32>> {
        let Some(status) = read_gone_ok(&self.root.join(tid.to_string()).join("status"))? else {
            return Ok(None);
        };
        Ok(status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse().ok()))
    }
}

pub struct Stat {
    comm: String,
    state: char,
    flags: u32,
    processor: u32,
    start_time: u64,
}

/// A thread's scheduling class, as `ps -eLo class,rtprio,ni` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Sched {
    /// `SCHED_*` policy number (0 other, 1 fifo, 2 rr, 3 batch, 5 idle, 6 deadline).
    #[serde(skip)]
    pub policy: u32,
    /// ps's name for the policy: TS, FF, RR, B, IDL, DLN.
    pub class: &'static str,
    /// Real-time priority (1-99), 0 for other policies.
    pub rtprio: u32,
    /// Nice value (only meaningful for TS/B/IDL).
    pub nice: i32,
}

impl Sched {
    pub fn class_name(policy: u32) -> &'static str {
        match policy {
            0 => "TS",
            1 => "FF",
            2 => "RR",
            3 => "B",
            5 => "IDL",
            6 => "DLN",
            _ => "?",
        }
    }

    /// Real-time (FIFO or RR): it runs before every normal thread of its CPU.
    pub fn is_realtime(&self) -> bool {
        matches!(self.policy, 1 | 2)
    }

    /// From `/proc/PID/task/TID/stat` (fields 19 nice, 40 rt_priority, 41 policy).
    pub fn parse_stat(stat: &str) -> Option<Self> {
        let close = stat.rfind(')')?;
        let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3).copied();
        let policy: u32 = field(41)?.parse().ok()?;
        Some(Self {
            policy,
            class: Self::class_name(policy),
            rtprio: field(40)?.parse().ok()?,
            nice: field(19)?.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Sched {
    /// "FF 1" for real-time threads, "TS 0" (the nice value) for the others.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_realtime() {
            write!(f, "{} {}", self.class, self.rtprio)
        } else {
            write!(f, "{} {}", self.class, self.nice)
        }
    }
}

/// The fields pinguard reads from `/proc/PID/task/TID/status`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// `Cpus_allowed_list:`; `None` when absent or unparsable.
    pub allowed: Option<CpuSet>,
    /// `NSpid:`, outermost namespace first; empty when absent.
    pub nspid: Vec<u32>,
}

/// Parses a status file. Unknown or malformed lines are skipped: the file is
/// the kernel's, but a thread's name is in it, so any text can appear there.
pub fn parse_status(text: &str) -> Status {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key));
    Status {
        allowed: field("Cpus_allowed_list:").and_then(|v| CpuSet::parse(v).ok()),
        nspid: field("NSpid:")
            .map(|v| v.split_whitespace().filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_default(),
    }
}

/// Parses `/proc/<pid>/stat`. The comm field is in parentheses and may itself
/// contain spaces and parentheses, so split at the *last* `)`.
pub fn parse_stat(s: &str) -> Option<Stat> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3).copied();
    Some(Stat {
        comm,
        state: field(3)?.chars().next()?,
        flags: field(9)?.parse().ok()?,
        processor: field(39)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduling_class_as_ps_shows_it() {
        // `chrt -f 7 sleep` and `nice -n 5 cat`, read on this lab.
        let fifo = "16997 (sleep) S 16995 16995 1151 0 -1 4194560 229 0 1 0 0 0 0 0 -8 0 1 0 \
                    243662 2990080 445 18446744073709551615 94605524701184 94605524719113 \
                    140725894170832 0 0 0 0 6 0 1 0 0 17 1 7 1 0 0 0 94605524733200 \
                    94605524734464 94605548679168 140725894179563 140725894179571 \
                    140725894179571 140725894180841 0";
        let s = Sched::parse_stat(fifo).unwrap();
        assert_eq!((s.class, s.rtprio, s.is_realtime()), ("FF", 7, true));
        assert_eq!(s.to_string(), "FF 7");
        let niced = "17000 (a) b) R 16995 16995 1151 0 -1 4194304 177 0 1 0 0 0 0 0 25 5 1 0 \
                     243682 3133440 394 18446744073709551615 94760435720192 94760435740073 \
                     140720596004672 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94760435756080 \
                     94760435757696 94760705048576 140720596007649 140720596007669 \
                     140720596007669 140720596008939 0";
        let s = Sched::parse_stat(niced).unwrap();
        assert_eq!((s.class, s.rtprio, s.nice), ("TS", 0, 5));
        assert_eq!(s.to_string(), "TS 5");
    }

    #[test]
    fn parses_stat_with_awkward_comm() {
        let line = "4242 (CPU 0/KVM) S 1 4242 4242 0 -1 4194624 2637 0 0 0 12 34 0 0 20 0 5 0 \
                    123 1000 200 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_stat(line).unwrap();
        assert_eq!(st.comm, "CPU 0/KVM");
        assert_eq!(st.state, 'S');
        assert_eq!(st.flags, 4194624);
        assert_eq!(st.processor, 1);
        assert_eq!(st.start_time, 123);
        let odd = "7 (a) b) R 1 7 7 0 -1 2097216 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0";
        let st = parse_stat(odd).unwrap();
        assert_eq!(st.comm, "a) b");
        assert_eq!(st.processor, 0);
        assert!(parse_stat("garbage").is_none());
    }

    proptest::proptest! {
        /// Any bytes: no panic. A well-formed line with any comm (spaces,
        /// parentheses, what a thread may name itself): the comm comes back.
        #[test]
        fn stat_lines_never_panic_and_keep_any_comm(junk in ".{0,80}", comm in "[^\\n]{0,15}") {
            let _ = parse_stat(&junk);
            let line = format!("7 ({comm}) R 1 7 7 0 -1 2097216 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0");
            let st = parse_stat(&line).unwrap();
            proptest::prop_assert_eq!(st.comm, comm);
        }
    }

    #[test]
    fn reads_live_self() {
        let proc = Proc::default();
        let me = std::process::id();
        let threads = proc.threads(me).unwrap();
        assert!(
            threads.iter().any(|t| t.tid == me),
            "own main thread missing: {threads:?}"
        );
        assert!(!threads[0].allowed.is_empty());
        assert_eq!(proc.tgid_of(me).unwrap(), Some(me));
        // A process that does not exist is not an error.
        assert_eq!(proc.thread(u32::MAX - 1, u32::MAX - 1).unwrap(), None);
        assert!(proc.tids(u32::MAX - 1).unwrap().is_empty());
        // The start time alone agrees with the full read, and a gone thread has none.
        let main = threads.iter().find(|t| t.tid == me).unwrap();
        assert_eq!(proc.start_time(me, me).unwrap(), Some(main.start_time));
        assert!(main.start_time > 0);
        assert_eq!(proc.start_time(u32::MAX - 1, u32::MAX - 1).unwrap(), None);
    }

    #[test]
    fn small_reads_are_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            0,
            1,
            PROC_READ - 1,
            PROC_READ,
            PROC_READ + 1,
            3 * PROC_READ + 7,
        ] {
            let text: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let path = dir.path().join(format!("f{len}"));
            fs::write(&path, &text).unwrap();
            assert_eq!(read_small(&path).unwrap(), text, "{len} bytes");
        }
        let bad = dir.path().join("bad");
        fs::write(&bad, [0xff, 0xfe]).unwrap();
        assert_eq!(
            read_small(&bad).unwrap_err().kind(),
            io::ErrorKind::InvalidData,
            "as fs::read_to_string"
        );
        assert!(is_gone(&read_small(&dir.path().join("none")).unwrap_err()));
        // A live procfs file reads the same both ways.
        let status = Path::new("/proc/self/status");
        let (a, b) = (
            read_small(status).unwrap(),
            fs::read_to_string(status).unwrap(),
        );
        assert_eq!(a.lines().next(), b.lines().next());
        assert_eq!(a.lines().count(), b.lines().count());
    }

    #[test]
    fn a_threads_facts_carry_its_scheduling_class() {
        let proc = Proc::default();
        let me = std::process::id();
        let t = proc.thread(me, me).unwrap().unwrap();
        assert_eq!(t.sched, proc.sched(me, me));
        assert!(t.sched.is_some());
    }

    #[test]
    fn reads_own_environ() {
        let proc = Proc::default();
        let env = proc.environ(std::process::id()).unwrap().unwrap();
        // The initial environment, as std sees it unless a test changed it.
        let path = std::env::var("PATH").unwrap_or_default();
        assert!(
            env.iter().any(|(k, v)| k == "PATH" && *v == path),
            "PATH={path:?} missing from {env:?}"
        );
        assert_eq!(proc.environ(u32::MAX - 1).unwrap(), None);
    }
}
