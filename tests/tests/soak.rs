//! The churn soak: guests and threads come and go under an enforcing daemon,
//! and its memory, file descriptors and series stay flat. Short in CI
//! (`PINGUARD_SOAK_SECS`, default 15); `cargo xtask soak --secs N` runs it longer.
use std::time::{Duration, Instant};

use testkit::{
    daemon::Daemon,
    env::missing_kvm,
    guest::{Guest, GuestOptions},
    require,
    threads::{Worker, spin},
    wait::wait_for,
};

const WAIT: Duration = Duration::from_secs(20);

/// (RSS KiB, open fds, series lines in /metrics)
fn footprint(d: &Daemon) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    let series = d
        .scrape()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    (rss, fds, series)
}

/// One round: a guest discovered, pinned and killed; a batch of short-lived
/// threads intruding on the guarded CPU.
fn round(d: &Daemon, i: usize) {
    let name = format!("pg-soak-{}", i % 3);
    let mut guest = Guest::start(GuestOptions::new(&name));
    let vm = [("vm", name.as_str())];
    d.wait_metric(
        "the soak guest to be pinned",
        "pinguard_vcpu_pinned",
        &vm,
        |v| v == 1.0,
    );
    for _ in 0..10 {
        let w = Worker::spawn_on("pg-soak-thread", &[1]);
        w.run(|| spin(Duration::from_millis(1)));
    }
    guest.kill();
    wait_for("the soak guest's series to go", WAIT, || {
        d.metric("pinguard_vcpu_info", &vm).is_none().then_some(())
    });
}

#[test]
fn churn_soak_keeps_memory_fds_and_series_flat() {
    require!(missing_kvm());
    let secs: u64 = std::env::var("PINGUARD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let daemon = Daemon::start("mode = \"enforce\"\nrescan_interval = \"1s\"\n", &[]);
    // Warm-up: allocator pools, the HTTP thread, the discovery thread.
    for i in 0..3 {
        round(&daemon, i);
    }
    let before = footprint(&daemon);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0;
    while Instant::now() < end {
        round(&daemon, rounds);
        rounds += 1;
    }
    let after = footprint(&daemon);
    eprintln!(
        "soak: {rounds} rounds in {secs} s: RSS {} -> {} KiB, fds {} -> {}, series {} -> {}",
        before.0, after.0, before.1, after.1, before.2, after.2
    );
    assert!(rounds >= 3, "only {rounds} rounds in {secs} s");
    assert!(
        after.0 <= before.0 + 2048,
        "RSS grew by {} KiB over {rounds} rounds",
        after.0 - before.0
    );
    assert!(after.1 <= before.1 + 2, "fds {} -> {}", before.1, after.1);
    // Per-VM series leave with their guests; per-CPU and per-program ones are fixed.
    assert!(
        after.2 <= before.2 + 10,
        "series {} -> {} over {rounds} rounds",
        before.2,
        after.2
    );
}
