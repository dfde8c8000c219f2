//! Bounded waits. Tests await events instead of sleeping; a benchmark's
//! Ctrl-C ([`interrupt`]) ends every wait of the kit early.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::error::{Error, OrPanic as _, Result};

/// Between two checks of [`wait_for`].
const POLL: Duration = Duration::from_millis(20);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes every wait of the kit return [`Error::Interrupted`] from now on.
/// Async-signal-safe (one atomic store): call it from a signal handler.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// `Err(Interrupted)` once [`interrupt`] was called.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// Sleeps `d`, waking early with an error when interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// Calls `check` every `every` until it returns `Some`; a timeout names `what`.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: what.to_string(),
                timeout,
                detail: String::new(),
            });
        }
        sleep(every.min(timeout.saturating_sub(start.elapsed())))?;
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(what, timeout, POLL, check).or_panic()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_until_some_or_times_out() {
        let mut n = 0;
        let v = poll(
            "n to reach 3",
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                n += 1;
                (n == 3).then_some(n)
            },
        );
        assert_eq!(v.unwrap(), 3);
        let e = poll::<()>("nothing", Duration::from_millis(30), POLL, || None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("timed out after 30ms waiting for nothing"),
            "{e}"
        );
    }
}
