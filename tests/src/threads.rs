//! Real threads placed with sched_setaffinity, for intruders and fake owners.
use std::{
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The calling thread's kernel thread id.
pub fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

pub fn set_affinity(tid: u32, cpus: &[usize]) {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).expect("cpu id fits in cpu_set_t");
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid as i32), &set)
        .unwrap_or_else(|e| panic!("sched_setaffinity({tid}, {cpus:?}) failed: {e}"));
}

/// Affinity of a thread as a list of CPUs (from /proc, like an operator would read it).
pub fn allowed_list(pid: u32, tid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .unwrap_or_else(|e| panic!("reading status of {pid}/{tid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Kernel's own accounting of a thread's CPU time (`sum_exec_runtime`, ns).
pub fn schedstat_run_ns(tid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .unwrap_or_else(|e| panic!("reading schedstat of {tid}: {e}"));
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat run time")
}

/// Spins on the CPU for `d` (a run slice unless preempted).
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
        let me = gettid();
        let before =
            nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("own affinity");
        set_affinity(me, cpus);
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
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &before)
            .expect("restore own affinity");
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
