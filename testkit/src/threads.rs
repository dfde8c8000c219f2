//! Threads on the host: affinity (set, read, snapshot and restore), the
//! kernel's run-time accounting, scheduling policy, and [`Worker`] threads
//! that tests control exactly.
use std::{
    collections::BTreeMap,
    fs,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    sched::{sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

use crate::{
    cpus::{self, Cpus},
    error::{Error, OrPanic as _, Result},
    host,
};

/// The calling thread's kernel thread id.
pub fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

/// Sets a thread's affinity (0: the calling thread).
pub fn try_set_affinity(tid: u32, cpus: &[usize]) -> Result<()> {
    let set = cpus::to_set(&cpus.iter().copied().collect())?;
    sched_setaffinity(Pid::from_raw(tid as i32), &set)
        .map_err(|e| Error::sys(format!("sched_setaffinity({tid}, {cpus:?})"), e))
}

#[track_caller]
pub fn set_affinity(tid: u32, cpus: &[usize]) {
    try_set_affinity(tid, cpus).or_panic()
}

/// Binds the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    try_set_affinity(0, &[cpu])
}

/// A thread's affinity from the kernel (0: the calling thread).
pub fn affinity(tid: u32) -> Result<Cpus> {
    let set = sched_getaffinity(Pid::from_raw(tid as i32))
        .map_err(|e| Error::sys(format!("reading the affinity of thread {tid}"), e))?;
    Ok(cpus::of_set(&set))
}

/// A thread's `Cpus_allowed_list` from /proc, as an operator reads it
/// ("0-1"); empty once the thread is gone.
pub fn cpus_allowed(pid: u32, tid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Every thread's `Cpus_allowed_list` on the host at one moment, keyed by
/// (pid, tid), to see and put back what changed since.
#[derive(Debug, Clone, Default)]
pub struct AffinitySnapshot(BTreeMap<(u32, u32), String>);

/// A thread whose affinity differs from the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub pid: u32,
    pub tid: u32,
    pub was: String,
    pub now: String,
}

impl AffinitySnapshot {
    pub fn take() -> Self {
        let mut out = BTreeMap::new();
        for pid in host::pids() {
            for tid in host::tids(pid) {
                let cpus = cpus_allowed(pid, tid);
                // Empty: it exited between the listing and the read.
                if !cpus.is_empty() {
                    out.insert((pid, tid), cpus);
                }
            }
        }
        Self(out)
    }

    /// Threads of the snapshot that still exist with another affinity.
    pub fn changed(&self) -> Vec<Changed> {
        self.0
            .iter()
            .filter_map(|(&(pid, tid), was)| {
                let now = cpus_allowed(pid, tid);
                (!now.is_empty() && now != *was).then(|| Changed {
                    pid,
                    tid,
                    was: was.clone(),
                    now,
                })
            })
            .collect()
    }

    /// Puts every [`changed`](Self::changed) thread back to its snapshot
    /// affinity; returns each with the outcome. Threads born after the
    /// snapshot are not covered.
    pub fn restore(&self) -> Vec<(Changed, Result<()>)> {
        put_back(self.changed())
    }
}

/// Sets each thread back to its `was` affinity.
pub fn put_back(changes: Vec<Changed>) -> Vec<(Changed, Result<()>)> {
    changes
        .into_iter()
        .map(|c| {
            let back = cpus::parse_list(&c.was)
                .and_then(|cpus| try_set_affinity(c.tid, &cpus.into_iter().collect::<Vec<_>>()));
            (c, back)
        })
        .collect()
}

/// The kernel's accounting of a thread's time on a CPU (`sum_exec_runtime`,
/// ns, the first field of schedstat), if it still exists.
pub fn run_ns(pid: u32, tid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// [`run_ns`] of a thread of this process; panics if it has none.
pub fn schedstat_run_ns(tid: u32) -> u64 {
    run_ns(std::process::id(), tid).unwrap_or_else(|| panic!("no schedstat for thread {tid}"))
}

/// The summed [`run_ns`] of a process's live threads.
pub fn process_run_ns(pid: u32) -> u64 {
    host::tids(pid)
        .into_iter()
        .filter_map(|tid| run_ns(pid, tid))
        .sum()
}

/// Makes the calling thread SCHED_FIFO at `priority` (a real-time competitor
/// that normal threads, and lower real-time ones, cannot preempt).
pub fn become_fifo(priority: i32) {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: plain syscall on the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    assert_eq!(
        rc,
        0,
        "sched_setscheduler: {}",
        std::io::Error::last_os_error()
    );
}

/// Back to SCHED_OTHER (best effort: the thread is about to idle anyway).
pub fn become_normal() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
}

/// Spins on the CPU for `d` (a run slice unless preempted).
pub fn spin(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

enum Cmd {
    Run(Box<dyn FnOnce() + Send>),
    Exit,
}

/// A named thread that runs closures on request and otherwise sleeps blocked
/// on a channel (off the CPU), so tests control exactly when it runs.
pub struct Worker {
    tid: u32,
    tx: mpsc::Sender<Cmd>,
    done: mpsc::Receiver<()>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts a thread named `name` that is created already bound to `cpus`:
    /// the creating thread briefly takes that affinity so the new thread never
    /// runs anywhere else (its whole life is visible on those CPUs).
    pub fn spawn_on(name: &str, cpus: &[usize]) -> Self {
        let before = sched_getaffinity(Pid::from_raw(0)).expect("own affinity");
        set_affinity(0, cpus);
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (done_tx, done) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                tid_tx.send(gettid()).expect("report tid");
                while let Ok(Cmd::Run(f)) = rx.recv() {
                    f();
                    if done_tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn worker");
        sched_setaffinity(Pid::from_raw(0), &before).expect("restore own affinity");
        let tid = tid_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("worker started");
        Self {
            tid,
            tx,
            done,
            handle: Some(handle),
        }
    }

    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// Runs `f` on the worker and waits (bounded) until it is done.
    pub fn run(&self, f: impl FnOnce() + Send + 'static) {
        self.tx.send(Cmd::Run(Box::new(f))).expect("worker alive");
        self.done
            .recv_timeout(Duration::from_secs(60))
            .expect("worker finished its job within 60 s");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Exit);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A named thread bound to one CPU that runs 4 ms and sleeps 2 ms, over
/// and over, until dropped: an intruder that keeps showing up.
pub struct Bursty {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Bursty {
    #[track_caller]
    pub fn start(name: &str, cpu: usize) -> Self {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let bound = pin_current_thread(cpu)
                    .map_err(|e| format!("binding the intruder to CPU {cpu}: {e}"));
                let failed = bound.is_err();
                let _ = ready_tx.send(bound);
                if failed {
                    return;
                }
                while !flag.load(Ordering::Relaxed) {
                    spin(Duration::from_millis(4));
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .expect("spawning the intruder thread");
        let bursty = Self {
            stop,
            handle: Some(handle),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => bursty,
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("the intruder thread did not start: {e}"),
        }
    }
}

impl Drop for Bursty {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_reads_agree_and_a_snapshot_sees_a_change_and_puts_it_back() {
        let me = std::process::id();
        let online = affinity(0).unwrap();
        let first = *online.first().unwrap();
        // A worker of our own, so that no other thread of the test binary moves.
        let w = Worker::spawn_on("tk-affinity", &[first]);
        let tid = w.tid();
        assert_eq!(affinity(tid).unwrap(), [first].into());
        assert_eq!(cpus_allowed(me, tid), first.to_string());
        let snap = AffinitySnapshot::take();
        assert!(snap.changed().iter().all(|c| c.tid != tid));
        let all: Vec<usize> = online.iter().copied().collect();
        set_affinity(tid, &all);
        let changed: Vec<Changed> = snap
            .changed()
            .into_iter()
            .filter(|c| c.tid == tid)
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].was, first.to_string());
        // Only ours: restoring the whole host would undo others' changes.
        let restored = put_back(changed);
        assert!(restored[0].1.is_ok(), "{:?}", restored[0].1);
        assert_eq!(affinity(tid).unwrap(), [first].into());
        assert!(schedstat_run_ns(gettid()) > 0);
        assert!(process_run_ns(me) >= schedstat_run_ns(gettid()));
    }
}
