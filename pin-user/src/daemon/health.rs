//! What `/healthz` answers: the probe is attached, and the event loop is
//! alive and doing its periodic work. The HTTP server runs on its own thread,
//! so a stalled event loop is reported instead of hanging the check.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Shared between the event loop (which beats) and the HTTP server (which checks).
#[derive(Debug, Clone)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the last completed tick (0: none yet).
    last_tick_ms: Arc<AtomicU64>,
    /// The longest a tick may be late before the daemon counts as stalled.
    stale_after: Duration,
    /// Milliseconds since `started` when the running discovery scan began (0: none).
    scan_since_ms: Arc<AtomicU64>,
}

/// A scan longer than this is stuck on something its deadlines did not catch
/// (each QMP session has 2 s; /proc and libvirt reads are bounded).
pub const SCAN_STUCK: Duration = Duration::from_secs(60);

impl Health {
    /// `verify_interval` is the tick period; three missed ticks (and at
    /// least five seconds) mean the loop is stuck.
    pub fn new(verify_interval: Duration) -> Self {
        Self {
            started: Instant::now(),
            last_tick_ms: Arc::new(AtomicU64::new(0)),
            stale_after: (verify_interval * 3).max(Duration::from_secs(5)),
            scan_since_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Called by the event loop with the running scan's start, if any.
    pub fn scanning(&self, since: Option<Instant>) {
        let ms = since.map_or(0, |s| {
            s.saturating_duration_since(self.started).as_millis().max(1) as u64
        });
        self.scan_since_ms.store(ms, Ordering::Relaxed);
    }

    /// Called by the event loop after each tick.
    pub fn ticked(&self) {
        let ms = self.started.elapsed().as_millis().max(1) as u64;
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// `attached`/`expected`: programs whose links the kernel still has.
    /// Ok, or why not (one reason per line).
    pub fn check(&self, attached: usize, expected: usize, now: Instant) -> Result<(), String> {
        let mut problems = Vec::new();
        if expected == 0 || attached < expected {
            problems.push(format!(
                "eBPF observer not attached ({attached} of {expected} programs loaded)"
            ));
        }
        let since_start = now.saturating_duration_since(self.started);
        let last = self.last_tick_ms.load(Ordering::Relaxed);
        let age = if last == 0 {
            since_start
        } else {
            since_start.saturating_sub(Duration::from_millis(last))
        };
        if age > self.stale_after {
            let what = if last == 0 {
                "no tick yet"
            } else {
                "last tick"
            };
            problems.push(format!(
                "event loop stalled: {what} {:.1} s ago (expected at least every {:.1} s)",
                age.as_secs_f64(),
                self.stale_after.as_secs_f64()
            ));
        }
        let scan = self.scan_since_ms.load(Ordering::Relaxed);
        if scan != 0 {
            let running = since_start.saturating_sub(Duration::from_millis(scan));
            if running > SCAN_STUCK {
                problems.push(format!(
                    "guest discovery stuck: a scan has run for {:.0} s (a QMP socket or /proc read \
                     that does not answer?); guests started meanwhile are not placed",
                    running.as_secs_f64()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_while_ticking_and_attached() {
        let h = Health::new(Duration::from_secs(1));
        h.ticked();
        assert_eq!(h.check(3, 3, Instant::now()), Ok(()));
    }

    #[test]
    fn a_stalled_loop_is_unhealthy_and_says_since_when() {
        let h = Health::new(Duration::from_secs(1));
        h.ticked();
        let err = h
            .check(3, 3, Instant::now() + Duration::from_secs(30))
            .unwrap_err();
        assert!(err.starts_with("event loop stalled: last tick 3"), "{err}");
        // Before the first tick, the start counts.
        let fresh = Health::new(Duration::from_secs(1));
        assert_eq!(fresh.check(1, 1, Instant::now()), Ok(()));
        let err = fresh
            .check(1, 1, Instant::now() + Duration::from_secs(6))
            .unwrap_err();
        assert!(err.contains("no tick yet"), "{err}");
    }

    #[test]
    fn a_stuck_discovery_scan_is_unhealthy() {
        let h = Health::new(Duration::from_secs(1));
        let start = Instant::now();
        h.scanning(Some(start));
        let later = start + SCAN_STUCK + Duration::from_secs(1);
        // Ticks go on (discovery runs on its own thread), yet it is stuck.
        let err = h.check(1, 1, later).unwrap_err();
        assert!(err.contains("guest discovery stuck"), "{err}");
        h.scanning(None);
        assert!(!h.check(1, 1, start).is_err_and(|e| e.contains("discovery")));
    }

    #[test]
    fn detached_programs_are_unhealthy() {
        let h = Health::new(Duration::from_secs(1));
        h.ticked();
        let err = h.check(2, 3, Instant::now()).unwrap_err();
        assert!(err.contains("2 of 3 programs"), "{err}");
    }
}
