//! Intruders with a known run time on the guarded CPU: the ground truth the
//! detection of each tool is scored against.
//!
//! One intruder = one thread, created already bound to the guarded CPU (its
//! creator briefly takes that affinity, so it never runs anywhere else
//! before), that spins until its own CPU clock has advanced by the burst
//! (20 µs, 200 µs or 2 ms; on a busy CPU the burst may be split into slices)
//! and then blocks. Once it is off the CPU, its `/proc/TID/schedstat` run time
//! is final for the guarded CPU: that is the reference. The bench then moves
//! it (asleep) to the housekeeping CPU and wakes it there, where it waits
//! until the end: its thread stays alive for the tools that read live
//! threads, and `ps` sees `psr` 1 only while it was an intruder.
use std::{
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{sched_getaffinity, sched_setaffinity},
    time::{ClockId, clock_gettime},
    unistd::Pid,
};
use testkit::{
    cpus,
    threads::{gettid, run_ns},
    wait,
};

use super::{GUARDED_CPU, OTHER_CPU};

/// The bursts, µs.
pub const BURSTS_US: [u64; 3] = [20, 200, 2_000];
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// One intrusion and what the kernel accounted for it.
#[derive(Debug, Clone)]
pub struct Intrusion {
    pub burst_us: u64,
    pub tid: u32,
    /// `/proc/TID/schedstat` run time once it blocked (all of it on the guarded CPU).
    pub ref_ns: u64,
}

/// The intruder threads, alive (asleep on the housekeeping CPU) until dropped.
pub struct Intruders {
    pub done: Vec<Intrusion>,
    release: Vec<mpsc::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

fn thread_cpu_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Thread state letter from /proc/self/task/TID/stat.
fn state(tid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

impl Intruders {
    /// `per_burst` intrusions of each burst length, interleaved, `gap` apart.
    pub fn run(per_burst: usize, gap: Duration) -> Result<Self> {
        let mut me = Self {
            done: Vec::new(),
            release: Vec::new(),
            threads: Vec::new(),
        };
        let home = cpus::to_set(&[OTHER_CPU].into())?;
        for i in 0..per_burst * BURSTS_US.len() {
            let burst_us = BURSTS_US[i % BURSTS_US.len()];
            let (tid_tx, tid_rx) = mpsc::channel();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let own = sched_getaffinity(Pid::from_raw(0)).context("reading our affinity")?;
            sched_setaffinity(Pid::from_raw(0), &cpus::to_set(&[GUARDED_CPU].into())?)
                .with_context(|| format!("moving to CPU {GUARDED_CPU} to create an intruder"))?;
            let spawned = std::thread::Builder::new()
                .name(format!("intruder-{burst_us}us"))
                .spawn(move || {
                    let start = thread_cpu_ns();
                    let burst = burst_us * 1_000;
                    while thread_cpu_ns().saturating_sub(start) < burst {
                        std::hint::spin_loop();
                    }
                    let _ = tid_tx.send(gettid());
                    // Woken on the housekeeping CPU, then wait there for the end.
                    let _ = go_rx.recv();
                    let _ = go_rx.recv();
                });
            sched_setaffinity(Pid::from_raw(0), &own).context("restoring our affinity")?;
            me.threads
                .push(spawned.context("spawning an intruder thread")?);
            me.release.push(go_tx.clone());
            let tid = tid_rx
                .recv_timeout(STEP_TIMEOUT)
                .context("an intruder thread did not finish its burst")?;
            // Off the CPU (blocked in recv) before its run time is final.
            let t0 = Instant::now();
            while state(tid) != Some('S') {
                if t0.elapsed() > STEP_TIMEOUT {
                    bail!("intruder {tid} did not block after its burst");
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            let ref_ns = run_ns(std::process::id(), tid)
                .with_context(|| format!("no schedstat for intruder {tid}"))?;
            sched_setaffinity(Pid::from_raw(tid as i32), &home)
                .with_context(|| format!("moving intruder {tid} to CPU {OTHER_CPU}"))?;
            let _ = go_tx.send(());
            me.done.push(Intrusion {
                burst_us,
                tid,
                ref_ns,
            });
            wait::sleep(gap)?;
        }
        Ok(me)
    }
}

impl Drop for Intruders {
    fn drop(&mut self) {
        for tx in self.release.drain(..) {
            let _ = tx.send(());
            let _ = tx.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
