//! IRQ/softirq noise and vCPU wait ("CPU ready") accounting on a real kernel.
//! CPU 1 is guarded.
use std::{
    collections::BTreeMap,
    net::UdpSocket,
    process::Command,
    time::{Duration, Instant},
};

use testkit::{
    daemon::{Daemon, DaemonOptions},
    env::{missing_bpf, missing_kvm, require_privileged},
    guest::{Guest, GuestOptions},
    metrics::sum_metric,
    require,
    threads::{Worker, become_fifo, set_affinity, spin},
    wait::wait_for,
};

/// Per-IRQ interrupt counts on `cpu` from /proc/interrupts (the kernel's own tally).
fn proc_interrupts(cpu: usize) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let mut parts = line.split_whitespace();
        let Some(irq) = parts.next().and_then(|s| s.strip_suffix(':')) else {
            continue;
        };
        if irq.parse::<u32>().is_err() {
            continue;
        }
        if let Some(n) = parts.nth(cpu).and_then(|n| n.parse().ok()) {
            out.insert(irq.to_string(), n);
        }
    }
    out
}

/// Direct, synchronous writes to a file under /var/tmp: each one completes
/// with a device interrupt.
fn disk_io(dir: &std::path::Path, blocks: u32) {
    let file = dir.join("io");
    let st = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", file.display()),
            "bs=4k",
            &format!("count={blocks}"),
            "oflag=direct,sync",
        ])
        .output()
        .expect("dd");
    assert!(st.status.success(), "{st:?}");
}

/// The IRQ with the largest growth between two tallies, and its growth.
fn busiest(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> (String, u64) {
    after
        .iter()
        .map(|(irq, n)| (irq.clone(), n - before.get(irq).copied().unwrap_or(0)))
        .max_by_key(|(_, d)| *d)
        .unwrap_or_default()
}

/// The daemons here export the kernel's counters every 100 ms.
/// `bpf_stats`: the sched_switch program's run count is the export clock of
/// [`current`].
const CONFIG: &str = "verify_interval = \"100ms\"\nbpf_stats = true\n";

/// The metric's value once everything up to now has been exported: waits for
/// the daemon's next export (its count of sched_switch program runs, which
/// grows at every export since this machine always switches), then reads.
fn current(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    next_export(d);
    d.metric(name, labels).unwrap_or(0.0)
}

/// Waits until the daemon has exported once more (see [`current`]).
fn next_export(d: &Daemon) {
    let runs = [("program", "switch_tp_btf")];
    let before = d
        .metric("pinguard_bpf_program_runs_total", &runs)
        .unwrap_or(0.0);
    d.wait_metric(
        "the next export",
        "pinguard_bpf_program_runs_total",
        &runs,
        |v| v > before,
    );
}

fn irq_counts(d: &Daemon, cpu: usize) -> BTreeMap<String, f64> {
    let on_cpu = format!("cpu=\"{cpu}\"");
    let text = d.scrape();
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("pinguard_irqs_total{"))
    {
        let irq = line
            .split("irq=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("");
        if line.contains(&on_cpu) {
            let v: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            out.insert(irq.to_string(), v);
        }
    }
    out
}

#[test]
fn softirqs_on_the_guarded_cpu_are_counted_like_the_kernel_does() {
    require!(missing_bpf());
    let daemon = Daemon::start(CONFIG, &[]);
    let net_rx = [("cpu", "1"), ("vector", "net_rx")];

    // Quiet window: loopback traffic is what makes NET_RX softirqs, and there is none.
    let quiet_start = current(&daemon, "pinguard_softirqs_total", &net_rx);
    std::thread::sleep(Duration::from_secs(1));
    let quiet = current(&daemon, "pinguard_softirqs_total", &net_rx) - quiet_start;

    // Loopback UDP sent from CPU 1 raises NET_RX softirqs on CPU 1.
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = rx.local_addr().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let sender = Worker::spawn_on("pg-udp", &[1]);
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut n = 0u64;
        while rx.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    sender.run(move || {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..5000 {
            let _ = tx.send_to(b"noise", addr);
        }
    });
    let received = drain.join().unwrap();
    let loaded = current(&daemon, "pinguard_softirqs_total", &net_rx) - quiet_start - quiet;
    assert!(
        received > 1000,
        "the UDP load did not get through ({received} datagrams)"
    );
    assert!(
        loaded >= 1000.0,
        "expected >= 1000 NET_RX softirqs on CPU 1 under load, counted {loaded}"
    );
    assert!(
        quiet < loaded / 20.0,
        "an idle window counted {quiet} NET_RX softirqs vs {loaded} under load"
    );
    assert!(
        daemon
            .metric("pinguard_softirq_seconds_total", &net_rx)
            .unwrap_or(0.0)
            > 0.0
    );
}

#[test]
fn device_irqs_on_the_guarded_cpu_are_counted_like_the_kernel_does() {
    require!(missing_bpf());
    // Which CPU the disk's completion IRQ lands on is the kernel's choice
    // (virtio-blk's queue IRQ is kernel-managed: its affinity cannot be
    // written, and the CPU differs from boot to boot). So find it with a
    // probe burst of I/O, then guard that CPU: the daemon only observes.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let cpus = std::fs::read_to_string("/proc/interrupts")
        .unwrap()
        .lines()
        .next()
        .map_or(0, |header| header.split_whitespace().count());
    let before: Vec<_> = (0..cpus).map(proc_interrupts).collect();
    disk_io(dir.path(), 500);
    let (cpu, (irq, probe)) = (0..cpus)
        .map(|c| (c, busiest(&before[c], &proc_interrupts(c))))
        .max_by_key(|(_, (_, d))| *d)
        .unwrap();
    if probe < 100 {
        let why =
            format!("no device IRQ fired for 500 direct writes (busiest: IRQ {irq} +{probe})");
        assert!(
            !require_privileged(),
            "{why}: cannot cross-check IRQ counts"
        );
        eprintln!("{why}; skipped");
        return;
    }
    let mut opts = DaemonOptions::new(CONFIG);
    opts.guard = cpu;
    let daemon = Daemon::start_with(&opts);

    // The kernel's baseline first, pinguard's after its next export: its
    // window then lies inside the kernel's, so it can only count fewer.
    let before_proc = proc_interrupts(cpu);
    next_export(&daemon);
    let before_metrics = irq_counts(&daemon, cpu);
    disk_io(dir.path(), 3000);
    let kernel_delta = proc_interrupts(cpu).get(&irq).copied().unwrap_or(0)
        - before_proc.get(&irq).copied().unwrap_or(0);
    assert!(
        kernel_delta >= 1000,
        "IRQ {irq} took {probe} interrupts on CPU {cpu} for 500 writes but only {kernel_delta} for 3000"
    );
    let delta = |m: &BTreeMap<String, f64>| {
        m.get(&irq).copied().unwrap_or(0.0) - before_metrics.get(&irq).copied().unwrap_or(0.0)
    };
    // Lower bound: everything the kernel counted before the I/O ended gets exported...
    wait_for(
        &format!("IRQ {irq} on CPU {cpu} (+{kernel_delta} in /proc/interrupts) to be counted"),
        Duration::from_secs(10),
        || (delta(&irq_counts(&daemon, cpu)) >= kernel_delta as f64 * 0.95).then_some(()),
    );
    // ...upper bound: pinguard cannot have counted more than the kernel by now.
    let counted = delta(&irq_counts(&daemon, cpu));
    let kernel_now = proc_interrupts(cpu).get(&irq).copied().unwrap_or(0)
        - before_proc.get(&irq).copied().unwrap_or(0);
    assert!(
        counted <= kernel_now as f64,
        "IRQ {irq} on CPU {cpu}: /proc/interrupts says +{kernel_now}, pinguard counted more: +{counted}"
    );
}

#[test]
fn vcpu_wait_grows_when_a_thread_competes_for_its_cpu() {
    require!(missing_kvm());
    // A running guest (no -S): its idle vCPU wakes on guest timer ticks.
    let mut opts = GuestOptions::new("pg-wait");
    opts.paused = false;
    let guest = Guest::start(opts);
    let vcpu = guest.vcpu_tids()[0];
    set_affinity(vcpu, &[1]);
    let daemon = Daemon::start(CONFIG, &[]);
    let labels = [("vm", "pg-wait"), ("vcpu", "0")];
    daemon.wait_metric(
        "the vCPU's wait histogram",
        "pinguard_vcpu_wait_seconds_count",
        &labels,
        |v| v > 0.0,
    );

    let window = Duration::from_secs(3);
    let measure = |d: &Daemon| {
        let sum = current(d, "pinguard_vcpu_wait_seconds_sum", &labels);
        (
            sum,
            d.metric("pinguard_vcpu_wait_seconds_count", &labels)
                .unwrap_or(0.0),
        )
    };
    let (s0, c0) = measure(&daemon);
    std::thread::sleep(window);
    let (s1, c1) = measure(&daemon);
    let clean = s1 - s0;

    let hog = Worker::spawn_on("pg-hog", &[1]);
    let (s2, c2) = measure(&daemon);
    let end = Instant::now() + window;
    hog.run(move || {
        // A real-time competitor: the vCPU cannot preempt it, so each of its
        // wake-ups waits until the hog pauses.
        become_fifo(10);
        while Instant::now() < end {
            spin(Duration::from_millis(20));
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let (s3, c3) = measure(&daemon);
    let contended = s3 - s2;
    assert!(
        c1 > c0 && c3 > c2,
        "the vCPU did not wake up during the windows ({c0} -> {c1} -> {c3})"
    );
    // Per wake-up: on a loaded host (CI, other jobs) the "clean" CPU is
    // not idle, so its total wait varies with the load, while a wake-up
    // behind a FIFO hog waits for most of a 20 ms spin.
    let (clean_n, contended_n) = (c1 - c0, c3 - c2);
    let (clean_mean, contended_mean) = (clean / clean_n, contended / contended_n);
    assert!(
        contended_mean > clean_mean * 5.0 && contended > 0.001,
        "vCPU wait per wake-up with a competing thread ({contended:.6}s in {contended_n} wake-ups) should be far above the clean CPU's ({clean:.6}s in {clean_n} wake-ups)"
    );
    eprintln!(
        "vCPU wait: clean {clean:.6}s in {clean_n} wake-ups, contended {contended:.6}s in {contended_n} wake-ups"
    );
    let text = daemon.scrape();
    let inf = sum_metric(
        &text,
        "pinguard_vcpu_wait_seconds_bucket",
        &[("vm", "pg-wait"), ("le", "+Inf")],
    )
    .unwrap();
    let count = sum_metric(&text, "pinguard_vcpu_wait_seconds_count", &labels).unwrap();
    assert_eq!(inf, count, "the +Inf bucket must equal the count");
}

/// `run_delay` of a thread (the second field of /proc/PID/task/TID/schedstat):
/// the kernel's own total of its waits on a runqueue, in ns.
fn run_delay_ns(pid: u32, tid: u32) -> u64 {
    let path = format!("/proc/{pid}/task/{tid}/schedstat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no run_delay in {text:?}"))
}

#[test]
fn a_busy_vcpu_preempted_by_an_intruder_waits_as_the_kernel_counts_it_without_a_wakeup_program() {
    require!(missing_kvm());
    // A running guest whose firmware spins: its vCPU stays in KVM_RUN, busy.
    let mut opts = GuestOptions::new("pg-busy");
    opts.paused = false;
    opts.busy = true;
    let guest = Guest::start(opts);
    let vcpu = guest.vcpu_tids()[0];
    set_affinity(vcpu, &[1]);
    let daemon = Daemon::start(CONFIG, &[]);
    let labels = [("vm", "pg-busy"), ("vcpu", "0")];
    daemon.wait_metric(
        "the vCPU to be watched",
        "pinguard_vcpu_info",
        &[("vm", "pg-busy")],
        |v| v == 1.0,
    );
    // The default daemon runs no program on wake-ups: the waits come from
    // the kernel's sched_info at sched_switch.
    let text = daemon.scrape();
    for p in ["wakeup", "wakeup_new"] {
        assert!(
            sum_metric(&text, "pinguard_bpf_program_runs_total", &[("program", p)]).is_none(),
            "the daemon attached {p} by default"
        );
    }
    assert!(
        sum_metric(
            &text,
            "pinguard_bpf_program_runs_total",
            &[("program", "switch_tp_btf")]
        )
        .is_some(),
        "switch_tp_btf is not among the daemon's programs"
    );

    let measure = |d: &Daemon| {
        (
            current(d, "pinguard_vcpu_wait_seconds_sum", &labels),
            d.metric("pinguard_vcpu_wait_seconds_count", &labels)
                .unwrap_or(0.0),
            run_delay_ns(guest.pid(), vcpu),
        )
    };
    // An intruder of the same class competes for CPU 1 for 2 s: the
    // scheduler alternates them, so the vCPU is preempted, still runnable,
    // and waits each time; it is counted when its next slice ends.
    let hog = Worker::spawn_on("pg-preempt", &[1]);
    let (s0, c0, d0) = measure(&daemon);
    hog.run(|| spin(Duration::from_secs(2)));
    // The vCPU's last wait is counted at the end of the slice it ended:
    // let the vCPU be switched out once more (the tick preempts nothing on
    // an otherwise idle CPU, so a short competitor ends its slice).
    let nudge = Worker::spawn_on("pg-nudge", &[1]);
    nudge.run(|| spin(Duration::from_millis(20)));
    let (s1, c1, d1) = measure(&daemon);
    let (ours, kernel) = (s1 - s0, (d1 - d0) as f64 / 1e9);
    eprintln!(
        "busy vCPU preempted: {:.0} waits, {ours:.6}s by pinguard, run_delay +{kernel:.6}s",
        c1 - c0
    );
    assert!(
        c1 - c0 >= 10.0 && ours > 0.2,
        "a busy vCPU sharing CPU 1 with a spinning intruder for 2 s should wait about half the \
         time in many waits: {} waits, {ours:.6}s (run_delay +{kernel:.6}s)",
        c1 - c0
    );
    // The same kernel stamps: pinguard's total agrees with the kernel's,
    // but for the waits in progress at the edges of the window.
    assert!(
        (ours - kernel).abs() <= 0.05 + 0.05 * kernel,
        "pinguard counted {ours:.6}s of waits, the kernel's run_delay grew {kernel:.6}s"
    );
}
