//! Everything the daemon's decisions touch outside themselves: the kernel
//! maps of the probe, thread affinities, /proc and guest discovery, and the
//! clock. [`Live`] is the host; the unit tests of `state` use a fake.
use std::{
    io,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use pin_common::ThreadKey;

use crate::{
    bpf::probe::{Probe, ProbeError},
    guests::{DiscoverError, DiscoverOptions, Discoverer, Discovery},
    host::{
        Host,
        affinity::{Affinities, AffinityError},
        cpulist::CpuSet,
        procfs::{Proc, ThreadInfo},
        topology::Guard,
    },
    isolate::{self, IsolateError, facts::Facts},
    placement::place::{self, Placement, Target},
};

/// The loaded probe, shared by the daemon (which writes its maps) and the
/// metrics collector and HTTP routes (which read them at scrape time).
#[derive(Clone)]
pub struct SharedProbe(Arc<Mutex<Probe>>);

impl SharedProbe {
    pub fn new(probe: Probe) -> Self {
        Self(Arc::new(Mutex::new(probe)))
    }

    /// Map reads and writes are single syscalls: nothing holds the lock long,
    /// and a panic while holding it leaves the maps as consistent as the kernel keeps them.
    pub fn lock(&self) -> MutexGuard<'_, Probe> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the daemon does to the world, and reads from it.
pub trait Effects: Placement {
    /// What the isolate applier changes (`isolation = "runtime"`): kernel
    /// files, cgroups, thread affinities.
    type Isolation: isolate::apply::Io;

    /// The kernel's ownership of CPUs (`TASKS`, `GUARDED`).
    fn set_owner(&mut self, tid: u32, cpu: u32) -> Result<(), ProbeError>;
    fn remove_owner(&mut self, tid: u32) -> Result<(), ProbeError>;
    /// Measures the thread's waits as a vCPU's.
    fn set_watched(&mut self, tid: u32) -> Result<(), ProbeError>;
    fn remove_watched(&mut self, tid: u32) -> Result<(), ProbeError>;
    /// Guest processes whose exit the kernel reports.
    fn set_guest(&mut self, pid: u32) -> Result<(), ProbeError>;
    fn remove_guest(&mut self, pid: u32) -> Result<(), ProbeError>;
    /// Threads the kernel does not count as intruders (on `cpu`, or any).
    fn set_allowed(&mut self, tid: u32, cpu: Option<u32>) -> Result<(), ProbeError>;
    fn remove_allowed(&mut self, tid: u32) -> Result<(), ProbeError>;
    fn allowed(&self) -> Result<Vec<u32>, ProbeError>;
    /// Keys of the per-thread intruder accounting, with the thread's process.
    fn thread_keys(&self) -> Result<Vec<(ThreadKey, u32)>, ProbeError>;
    fn remove_thread(&mut self, key: ThreadKey) -> Result<(), ProbeError>;

    /// A thread's facts from /proc (`None`: it is gone).
    fn thread(&self, tgid: u32, tid: u32) -> io::Result<Option<ThreadInfo>>;
    /// When the thread `tid` of process `tgid` started (`None`: no such
    /// thread in that process now). See [`ThreadInfo::start_time`].
    fn start_time(&self, tgid: u32, tid: u32) -> Option<u64>;
    /// A thread's current name.
    fn comm(&self, tgid: u32, tid: u32) -> Option<String>;
    /// A thread's cgroup v2 path (for `[[allow]] cgroup`).
    fn cgroup(&self, tgid: u32, tid: u32) -> Option<String>;
    fn task_exists(&self, tgid: u32, tid: u32) -> bool;
    fn process_exists(&self, pid: u32) -> bool;
    /// A process's parent (`None`: it is gone).
    fn parent(&self, pid: u32) -> Option<u32>;
    /// Whether the process holds KVM vCPUs (see [`crate::guests::is_kvm_guest`]).
    fn is_kvm_guest(&self, pid: u32) -> bool;

    /// Asks for a full discovery; the answer comes back as
    /// [`Discovered::Scan`] (never on the caller's stack: discovery talks to
    /// QMP sockets and reads files that untrusted peers control).
    fn request_scan(&mut self);
    /// Asks to look at one process again ([`Discovered::Pid`]).
    fn request_rediscover(&mut self, pid: u32);
    /// Forgets what discovery remembers about a process that exited.
    fn forget(&mut self, pid: u32);
    fn set_discover_options(&mut self, opts: DiscoverOptions);

    fn now(&self) -> Instant;
    /// The online CPUs (`None` if they cannot be read): a guarded CPU can
    /// go offline (hotplug).
    fn online_cpus(&self) -> Option<CpuSet>;

    /// The host as the isolate planner sees it (IRQs, workqueues, sysctls,
    /// cpusets, every thread).
    fn isolation_facts(&self, guard: &Guard) -> Result<Facts, IsolateError>;
    fn isolation(&mut self) -> &mut Self::Isolation;
}

/// A discovery result, delivered to the daemon's loop.
#[derive(Debug)]
pub enum Discovered {
    Scan(Result<Discovery, DiscoverError>),
    Pid(u32, Result<Discovery, DiscoverError>),
}

enum Request {
    Scan,
    Rediscover(u32),
    Forget(u32),
    Options(DiscoverOptions),
}

/// The host: the probe's maps, `sched_setaffinity`, /proc, and discovery
/// (QMP, libvirt) on a thread of its own.
pub struct Live {
    probe: SharedProbe,
    proc: Proc,
    placer: place::Live,
    discovery: std::sync::mpsc::Sender<Request>,
    isolation: isolate::apply::Live,
}

impl Live {
    /// Also starts the discovery thread; its results arrive on the receiver.
    pub fn new(
        probe: SharedProbe,
        opts: DiscoverOptions,
    ) -> io::Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Discovered>)> {
        let proc = Proc::default();
        let (req_tx, req_rx) = std::sync::mpsc::channel::<Request>();
        let (res_tx, res_rx) = tokio::sync::mpsc::unbounded_channel();
        let worker_proc = proc.clone();
        std::thread::Builder::new()
            .name("pinguard-discover".into())
            .spawn(move || {
                let mut d = Discoverer::new(worker_proc.clone(), opts);
                // Ends when the daemon drops its sender or stops listening.
                while let Ok(req) = req_rx.recv() {
                    let answer = match req {
                        Request::Scan => Discovered::Scan(d.scan()),
                        Request::Rediscover(pid) => Discovered::Pid(pid, d.rediscover(pid)),
                        Request::Forget(pid) => {
                            d.forget(pid);
                            continue;
                        }
                        Request::Options(o) => {
                            d = Discoverer::new(worker_proc.clone(), o);
                            continue;
                        }
                    };
                    if res_tx.send(answer).is_err() {
                        return;
                    }
                }
            })?;
        Ok((
            Self {
                probe,
                proc,
                placer: place::Live::new(),
                discovery: req_tx,
                isolation: isolate::apply::Live {
                    proc: Proc::default(),
                },
            },
            res_rx,
        ))
    }

    fn ask(&self, req: Request) {
        // The thread only ends with the daemon.
        let _ = self.discovery.send(req);
    }
}

impl Affinities for Live {
    fn get(&self, tid: u32) -> Result<CpuSet, AffinityError> {
        self.placer.get(tid)
    }

    fn set(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
        self.placer.set(tid, cpus)
    }
}

impl Placement for Live {
    fn place(&mut self, t: &Target<'_>, cpus: &CpuSet) -> Result<(), AffinityError> {
        self.placer.place(t, cpus)
    }

    fn begin_plan(&mut self) {
        self.placer.begin_plan();
    }

    fn undo_plan(&mut self) {
        self.placer.undo_plan();
    }
}

impl Effects for Live {
    type Isolation = isolate::apply::Live;

    fn set_owner(&mut self, tid: u32, cpu: u32) -> Result<(), ProbeError> {
        self.probe.lock().set_owner(tid, cpu)
    }

    fn remove_owner(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.probe.lock().remove_owner(tid)
    }

    fn set_watched(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.probe.lock().set_watched(tid, pin_common::watch::VCPU)
    }

    fn remove_watched(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.probe.lock().remove_watched(tid)
    }

    fn set_guest(&mut self, pid: u32) -> Result<(), ProbeError> {
        self.probe.lock().set_guest(pid)
    }

    fn remove_guest(&mut self, pid: u32) -> Result<(), ProbeError> {
        self.probe.lock().remove_guest(pid)
    }

    fn set_allowed(&mut self, tid: u32, cpu: Option<u32>) -> Result<(), ProbeError> {
        self.probe.lock().set_allowed(tid, cpu)
    }

    fn remove_allowed(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.probe.lock().remove_allowed(tid)
    }

    fn allowed(&self) -> Result<Vec<u32>, ProbeError> {
        self.probe.lock().allowed()
    }

    fn thread_keys(&self) -> Result<Vec<(ThreadKey, u32)>, ProbeError> {
        Ok(self
            .probe
            .lock()
            .threads()?
            .into_iter()
            .map(|(k, t)| (k, t.tgid))
            .collect())
    }

    fn remove_thread(&mut self, key: ThreadKey) -> Result<(), ProbeError> {
        self.probe.lock().remove_thread(key)
    }

    fn thread(&self, tgid: u32, tid: u32) -> io::Result<Option<ThreadInfo>> {
        self.proc.thread(tgid, tid)
    }

    fn start_time(&self, tgid: u32, tid: u32) -> Option<u64> {
        self.proc.start_time(tgid, tid).ok().flatten()
    }

    fn comm(&self, tgid: u32, tid: u32) -> Option<String> {
        self.proc.comm(tgid, tid).ok().flatten()
    }

    fn cgroup(&self, tgid: u32, tid: u32) -> Option<String> {
        std::fs::read_to_string(self.proc.root().join(format!("{tgid}/task/{tid}/cgroup")))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            })
    }

    fn task_exists(&self, tgid: u32, tid: u32) -> bool {
        self.proc.root().join(format!("{tgid}/task/{tid}")).exists()
    }

    fn process_exists(&self, pid: u32) -> bool {
        self.proc.root().join(pid.to_string()).exists()
    }

    fn is_kvm_guest(&self, pid: u32) -> bool {
        crate::guests::is_kvm_guest(&self.proc, pid)
    }

    fn parent(&self, pid: u32) -> Option<u32> {
        self.proc.parent(pid)
    }

    fn request_scan(&mut self) {
        self.ask(Request::Scan);
    }

    fn request_rediscover(&mut self, pid: u32) {
        self.ask(Request::Rediscover(pid));
    }

    fn forget(&mut self, pid: u32) {
        self.ask(Request::Forget(pid));
    }

    fn set_discover_options(&mut self, opts: DiscoverOptions) {
        self.ask(Request::Options(opts));
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn online_cpus(&self) -> Option<CpuSet> {
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|s| CpuSet::parse(s.trim()).ok())
    }

    fn isolation_facts(&self, guard: &Guard) -> Result<Facts, IsolateError> {
        isolate::facts::gather(&Host::default(), guard)
    }

    fn isolation(&mut self) -> &mut Self::Isolation {
        &mut self.isolation
    }
}
