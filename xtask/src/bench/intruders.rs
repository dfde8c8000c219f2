//! Intruders with a known run time on the guarded CPU: the ground truth the
//! detection of each tool is scored against.
//!
//! One intruder = one thread, created on the housekeeping CPU and asleep
//! there. For its intrusion the bench moves it (asleep) to the guarded CPU
//! and wakes it: it spins for the burst (20 µs, 200 µs or 2 ms of wall
//! clock; on a busy CPU the burst may be split into slices) and blocks
//! again. The growth of its `/proc/TID/schedstat` run time over
//! the intrusion, read while it sleeps before and after, is all on the
//! guarded CPU: that is the reference. The bench then moves it back and wakes
//! it on the housekeeping CPU, where it waits until the end: its thread stays
//! alive for the tools that read live threads, and `ps` sees `psr` 1 only
//! while it was an intruder (from the wake-up there to the one back home).
use std::{
    io::{Read as _, Write as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{sched::sched_setaffinity, unistd::Pid};
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
    /// Growth of `/proc/TID/schedstat`'s run time over the intrusion (all of
    /// it on the guarded CPU).
    pub ref_ns: u64,
}

/// The intruder threads, alive (asleep on the housekeeping CPU) until dropped.
pub struct Intruders {
    pub done: Vec<Intrusion>,
    /// Each thread's wake-up pipe: closing it ends the thread.
    release: Vec<std::io::PipeWriter>,
    threads: Vec<JoinHandle<()>>,
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
    /// Call it from a thread on the housekeeping CPU.
    pub fn run(per_burst: usize, gap: Duration) -> Result<Self> {
        let mut me = Self {
            done: Vec::new(),
            release: Vec::new(),
            threads: Vec::new(),
        };
        let home = cpus::to_set(&[OTHER_CPU].into())?;
        let away = cpus::to_set(&[GUARDED_CPU].into())?;
        for i in 0..per_burst * BURSTS_US.len() {
            let burst_us = BURSTS_US[i % BURSTS_US.len()];
            let (tid_tx, tid_rx) = mpsc::channel();
            // The bench wakes the thread with a byte on a pipe and sees the
            // burst's end in a flag: the intruder itself wakes nobody (a
            // cross-CPU wake-up costs it tens of µs in this nested VM) and
            // blocks at once in read() (no spinning before it parks).
            let (mut rx, tx) = std::io::pipe().context("pipe")?;
            let burst_done = Arc::new(AtomicBool::new(false));
            let done_flag = burst_done.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("intruder-{burst_us}us"))
                .spawn(move || {
                    let pinned = sched_setaffinity(Pid::from_raw(0), &home);
                    let _ = tid_tx.send(pinned.map(|()| gettid()));
                    let mut b = [0u8; 1];
                    // 1: the intrusion (woken on the guarded CPU).
                    if !matches!(rx.read(&mut b), Ok(1)) {
                        return;
                    }
                    // Wall-clock spin (vDSO, no system call): a system call per
                    // iteration would be a traced event per iteration for
                    // `perf sched record` (sched_stat_runtime) and inflate
                    // short bursts several times.
                    let end = Instant::now() + Duration::from_micros(burst_us);
                    while Instant::now() < end {
                        std::hint::spin_loop();
                    }
                    done_flag.store(true, Ordering::Release);
                    // 2: woken back home; then EOF at the end.
                    while matches!(rx.read(&mut b), Ok(1)) {}
                })
                .context("spawning an intruder thread")?;
            me.threads.push(spawned);
            me.release.push(tx);
            let tx = me.release.last_mut().expect("just pushed");
            let tid = tid_rx
                .recv_timeout(STEP_TIMEOUT)
                .context("an intruder thread did not start")?
                .context("binding an intruder to the housekeeping CPU")?;
            let asleep = |tid: u32| -> Result<u64> {
                let t0 = Instant::now();
                while state(tid) != Some('S') {
                    if t0.elapsed() > STEP_TIMEOUT {
                        bail!("intruder {tid} did not block");
                    }
                    std::thread::sleep(Duration::from_micros(20));
                }
                run_ns(std::process::id(), tid)
                    .with_context(|| format!("no schedstat for intruder {tid}"))
            };
            let before = asleep(tid)?;
            sched_setaffinity(Pid::from_raw(tid as i32), &away)
                .with_context(|| format!("moving intruder {tid} to CPU {GUARDED_CPU}"))?;
            tx.write_all(&[1]).context("waking an intruder")?;
            let t0 = Instant::now();
            while !burst_done.load(Ordering::Acquire) {
                if t0.elapsed() > STEP_TIMEOUT {
                    bail!("intruder {tid} did not finish its burst");
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            let after = asleep(tid)?;
            sched_setaffinity(Pid::from_raw(tid as i32), &home)
                .with_context(|| format!("moving intruder {tid} back to CPU {OTHER_CPU}"))?;
            tx.write_all(&[2]).context("waking an intruder")?;
            me.done.push(Intrusion {
                burst_us,
                tid,
                ref_ns: after.saturating_sub(before),
            });
            wait::sleep(gap)?;
        }
        Ok(me)
    }
}

impl Drop for Intruders {
    fn drop(&mut self) {
        // EOF on every pipe: every thread's wait returns and it ends.
        self.release.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
