//! Enforcement: re-pinning drifted vCPUs and evicting intruders, with a
//! per-thread rate limit and back-off so pinguard never fights another tool in
//! a tight loop, and strict rules about what it never touches.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{host::cpulist::CpuSet, host::procfs::ThreadInfo};

/// Why a thread is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untouchable {
    /// Kernel threads are the kernel's business, bound or not.
    KernelThread,
    /// The kernel forbids changing its affinity (PF_NO_SETAFFINITY).
    NoSetAffinity,
}

/// Kernel threads and PF_NO_SETAFFINITY threads are never touched.
pub fn untouchable(t: &ThreadInfo) -> Option<Untouchable> {
    if t.is_kthread() {
        Some(Untouchable::KernelThread)
    } else if t.no_setaffinity() {
        Some(Untouchable::NoSetAffinity)
    } else {
        None
    }
}

/// The affinity an evicted thread gets: what it had minus the guarded CPUs,
/// or the housekeeping CPUs if nothing would be left.
pub fn eviction_target(current: &CpuSet, guarded: &CpuSet, housekeeping: &CpuSet) -> CpuSet {
    let rest = current.difference(guarded);
    if rest.is_empty() {
        housekeeping.clone()
    } else {
        rest
    }
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    last: Instant,
    count: u32,
}

/// Per-thread rate limit with exponential back-off: the first action is
/// immediate; a thread acted on again within the back-off window waits
/// `min_interval * 2^strikes`, capped at `max_backoff`.
#[derive(Debug)]
pub struct Limiter {
    min_interval: Duration,
    max_backoff: Duration,
    threads: HashMap<u32, Strikes>,
}

impl Limiter {
    pub fn new(min_interval: Duration, max_backoff: Duration) -> Self {
        Self {
            min_interval,
            max_backoff,
            threads: HashMap::new(),
        }
    }

    /// Whether an action on `tid` may happen at `now`; records it if so.
    /// Otherwise returns how long until it may.
    pub fn check(&mut self, tid: u32, now: Instant) -> Result<(), Duration> {
        let (min_interval, max_backoff) = (self.min_interval, self.max_backoff);
        let wait_for = |count: u32| {
            let factor = 1u32.checked_shl(count.min(20)).unwrap_or(u32::MAX);
            min_interval.saturating_mul(factor).min(max_backoff)
        };
        if let Some(s) = self.threads.get_mut(&tid) {
            let since = now.saturating_duration_since(s.last);
            // Quiet for longer than the longest back-off: forgive.
            if since > max_backoff * 2 {
                s.count = 0;
            } else {
                let wait = wait_for(s.count);
                if since < wait {
                    return Err(wait - since);
                }
                s.count += 1;
            }
            s.last = now;
            return Ok(());
        }
        if self.threads.len() > 65536 {
            // Bounded memory: drop entries that can no longer hold anything back.
            let horizon = self.max_backoff * 2;
            self.threads
                .retain(|_, s| now.saturating_duration_since(s.last) <= horizon);
        }
        self.threads.insert(
            tid,
            Strikes {
                last: now,
                count: 0,
            },
        );
        Ok(())
    }

    pub fn forget(&mut self, tid: u32) {
        self.threads.remove(&tid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_then_forgives() {
        let mut l = Limiter::new(Duration::from_millis(100), Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(l.check(7, t0).is_ok());
        // Second action within 100 ms must wait.
        assert_eq!(
            l.check(7, t0 + Duration::from_millis(40)),
            Err(Duration::from_millis(60))
        );
        assert!(l.check(7, t0 + Duration::from_millis(100)).is_ok());
        // Now 200 ms, then 400, ... capped at 1 s.
        assert!(l.check(7, t0 + Duration::from_millis(250)).is_err());
        assert!(l.check(7, t0 + Duration::from_millis(300)).is_ok());
        let mut t = t0 + Duration::from_millis(300);
        for _ in 0..10 {
            t += Duration::from_secs(1);
            assert!(l.check(7, t).is_ok(), "cap at max_backoff");
        }
        // Other threads are independent.
        assert!(l.check(8, t).is_ok());
        // After a long quiet period the thread starts over.
        assert!(l.check(7, t + Duration::from_secs(3)).is_ok());
        assert!(
            l.check(7, t + Duration::from_secs(3) + Duration::from_millis(100))
                .is_ok()
        );
    }

    #[test]
    fn eviction_keeps_the_rest_of_the_mask() {
        let g = CpuSet::parse("2-3").unwrap();
        let hk = CpuSet::parse("0-1").unwrap();
        assert_eq!(
            eviction_target(&CpuSet::parse("1-3").unwrap(), &g, &hk),
            CpuSet::single(1)
        );
        assert_eq!(eviction_target(&CpuSet::parse("2").unwrap(), &g, &hk), hk);
    }

    #[test]
    fn never_touches_kernel_threads() {
        let mut t = ThreadInfo {
            tgid: 10,
            tid: 10,
            comm: "ksoftirqd/1".into(),
            state: 'S',
            flags: pin_common::PF_KTHREAD,
            last_cpu: 1,
            allowed: CpuSet::single(1),
            start_time: 0,
            sched: None,
        };
        assert_eq!(untouchable(&t), Some(Untouchable::KernelThread));
        t.flags = pin_common::PF_NO_SETAFFINITY;
        assert_eq!(untouchable(&t), Some(Untouchable::NoSetAffinity));
        t.flags = 0;
        assert_eq!(untouchable(&t), None);
    }
}
