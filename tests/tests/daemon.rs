//! The daemon (`pinguard run`) with real guests, real threads and real scrapes.
//! CPU 1 is guarded, CPU 0 is housekeeping.
use std::{process::Command, time::Duration};

use serde_json::Value;
use testkit::{
    daemon::Daemon,
    env::{missing_bpf, missing_kvm},
    guest::{Guest, GuestOptions},
    require,
    threads::{AffinitySnapshot, Worker, cpus_allowed, schedstat_run_ns, set_affinity, spin},
    wait::wait_for,
};

const WAIT: Duration = Duration::from_secs(20);

fn violations(d: &Daemon) -> Vec<Value> {
    let (status, body) = d.get("/violations");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn observe_mode_reports_guests_and_intruders_and_changes_no_affinity() {
    require!(missing_kvm());
    let mut daemon = Daemon::start("mode = \"observe\"\n", &[]);
    let guest = Guest::start(GuestOptions::new("pg-observe"));
    let vm = [("vm", "pg-observe")];
    daemon.wait_metric(
        "the guest to be discovered",
        "pinguard_vcpu_info",
        &vm,
        |v| v == 1.0,
    );
    assert_eq!(
        daemon.metric("pinguard_vcpu_pinned", &vm),
        Some(0.0),
        "an unpinned vCPU must read 0"
    );
    let before = AffinitySnapshot::take();

    let intruder_seconds = |d: &Daemon| {
        d.metric(
            "pinguard_intruder_run_seconds_total",
            &[("cpu", "1"), ("source", "user")],
        )
        .unwrap_or(0.0)
    };
    let start = intruder_seconds(&daemon);
    let intruder = Worker::spawn_on("pg-intruder", &[1]);
    intruder.run(|| {
        for _ in 0..100 {
            spin(Duration::from_micros(500));
            std::thread::sleep(Duration::from_micros(500));
        }
    });
    let ran_ns = schedstat_run_ns(intruder.tid());
    let ran = ran_ns as f64 / 1e9;
    // The CPU's intruder time grew by at least what the intruder ran (others may intrude too)...
    daemon.wait_metric(
        "intruder time to be accounted",
        "pinguard_intruder_run_seconds_total",
        &[("cpu", "1"), ("source", "user")],
        |v| v - start >= ran * 0.95,
    );
    // ...and the daemon's per-thread accounting of this intruder is what the kernel says it ran.
    let tid = intruder.tid();
    // `/intruders` is refreshed at every tick: await the snapshot taken after
    // the intruder stopped (a stale one shows part of its run).
    let entry = wait_for("the intruder's whole run in /intruders", WAIT, || {
        let (_, body) = daemon.get("/intruders");
        let list: Value = serde_json::from_str(&body).ok()?;
        list.as_array()?
            .iter()
            .find(|i| {
                i["tid"] == tid
                    && i["cpu"] == 1
                    && i["run_ns"].as_u64().unwrap_or(0) as f64 >= ran_ns as f64 * 0.95
            })
            .cloned()
    });
    let accounted = entry["run_ns"].as_u64().unwrap();
    let diff = (accounted as f64 - ran_ns as f64).abs() / ran_ns as f64;
    assert!(
        diff <= 0.05,
        "daemon accounted {accounted} ns for tid {tid}, schedstat says {ran_ns} ns: {entry}"
    );
    assert_eq!(entry["comm"], "pg-intruder", "{entry}");
    // One CPU, newest first, a few: what finds a short intruder on a busy host.
    let (code, body) = daemon.get("/intruders?cpu=1&sort=recent&limit=3");
    assert_eq!(code, 200, "{body}");
    let recent: Value = serde_json::from_str(&body).unwrap();
    let recent = recent.as_array().unwrap();
    assert!(
        !recent.is_empty() && recent.len() <= 3 && recent.iter().all(|i| i["cpu"] == 1),
        "{body}"
    );
    let (code, body) = daemon.get("/intruders?sort=newest");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("sort: expected run or recent"), "{body}");
    daemon.wait_metric(
        "the intrusion violation",
        "pinguard_violations_total",
        &[("cpu", "1"), ("kind", "intruder")],
        |v| v >= 1.0,
    );
    wait_for("the intruder in /violations", WAIT, || {
        violations(&daemon)
            .into_iter()
            .find(|v| v["kind"] == "intruder" && v["tid"] == tid)
    });

    // Observe mode: no thread's affinity changed except by this test's own doing.
    let changed = before.changed();
    assert!(
        changed.is_empty(),
        "observe mode changed affinities: {changed:?}"
    );
    assert_eq!(cpus_allowed(guest.pid(), guest.vcpu_tids()[0]), "0-1");
    // The counters exist at 0 from the start (dashboards show 0, not "No data").
    assert_eq!(
        daemon.metric("pinguard_repins_total", &[]),
        Some(0.0),
        "no repins in observe mode"
    );
    assert_eq!(
        daemon.metric("pinguard_evictions_total", &[]),
        Some(0.0),
        "no evictions in observe mode"
    );
    daemon.stop();
}

/// The programs the daemon attached, as its own metrics list them.
fn programs(d: &Daemon) -> Vec<String> {
    let text = d.scrape();
    let mut names: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("pinguard_bpf_program_runs_total{"))
        .filter_map(|l| l.split("program=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    assert!(
        names.iter().any(|n| n == "switch_tp_btf"),
        "no switch_tp_btf among the daemon's programs: {names:?}"
    );
    names
}

/// Names of the BPF programs loaded in the kernel, as bpftool lists them
/// (independent of what the daemon says it attached). Other helpers' tools
/// are kept off the lab by its lock while a test runs.
fn kernel_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["--json", "prog", "show"])
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool prog show: {out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    list.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn by_default_no_syscall_is_traced_and_a_vcpu_moved_by_taskset_is_repinned_at_once() {
    require!(missing_kvm());
    // Verification only every hour: a prompt re-pin can only come from the
    // migration event.
    let daemon = Daemon::start("mode = \"enforce\"\nverify_interval = \"1h\"\n", &[]);
    // A running guest whose firmware spins: its vCPU is busy in KVM_RUN,
    // so moving it away migrates it at once.
    let mut opts = GuestOptions::new("pg-nosys");
    opts.paused = false;
    opts.busy = true;
    let guest = Guest::start(opts);
    let vcpu = guest.vcpu_tids()[0];
    let vm = [("vm", "pg-nosys")];
    daemon.wait_metric("the vCPU to be pinned", "pinguard_vcpu_pinned", &vm, |v| {
        v == 1.0
    });
    let names = programs(&daemon);
    for p in [
        "setaffinity_enter",
        "setaffinity_exit",
        "wakeup",
        "wakeup_new",
    ] {
        assert!(
            !names.iter().any(|n| n == p),
            "{p} attached by default: {names:?}"
        );
    }
    let loaded = kernel_programs();
    assert!(
        loaded.iter().any(|n| n == "switch_tp_btf"),
        "bpftool lists no switch_tp_btf: {loaded:?}"
    );
    assert!(
        !loaded.iter().any(|n| n.starts_with("setaffinity")),
        "a sched_setaffinity syscall program is loaded by default: {loaded:?}"
    );
    let repins = daemon.metric("pinguard_repins_total", &vm).unwrap_or(0.0);

    let out = Command::new("taskset")
        .args(["-p", "0x1", &vcpu.to_string()])
        .output()
        .expect("run taskset");
    assert!(out.status.success(), "taskset failed: {out:?}");
    let moved = std::time::Instant::now();
    daemon.wait_metric(
        "a re-pin to be counted",
        "pinguard_repins_total",
        &vm,
        |v| v > repins,
    );
    let took = moved.elapsed();
    assert_eq!(cpus_allowed(guest.pid(), vcpu), "1");
    assert!(
        took < Duration::from_secs(10),
        "the re-pin took {took:?}: not event-driven (verify_interval is 1h)"
    );
    let v = wait_for("a vcpu_drift violation", WAIT, || {
        violations(&daemon)
            .into_iter()
            .find(|v| v["kind"] == "vcpu_drift" && v["tid"] == vcpu)
    });
    let detail = v["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("changed by: unknown (affinity syscall tracing off"),
        "the drift should say its culprit is unknown: {v}"
    );
    assert!(
        !violations(&daemon)
            .iter()
            .any(|v| v["kind"] == "affinity_changed"),
        "nothing can name the caller without the syscall tracepoints"
    );
    drop(guest);
    drop(daemon);
}

#[test]
fn enforce_mode_pins_repins_after_taskset_and_evicts_user_intruders() {
    require!(missing_kvm());
    // The opt-in syscall tracepoints name who changed the vCPU's affinity.
    let daemon = Daemon::start(
        "mode = \"enforce\"\n[observer]\naffinity_syscalls = true\n",
        &[],
    );
    let guest = Guest::start(GuestOptions::new("pg-enforce"));
    let vcpu = guest.vcpu_tids()[0];
    let vm = [("vm", "pg-enforce")];
    daemon.wait_metric("the vCPU to be pinned", "pinguard_vcpu_pinned", &vm, |v| {
        v == 1.0
    });
    assert_eq!(cpus_allowed(guest.pid(), vcpu), "1");
    for t in guest.emulator_tids() {
        assert_eq!(
            cpus_allowed(guest.pid(), t),
            "0",
            "emulator thread {t} not on housekeeping"
        );
    }
    let names = programs(&daemon);
    assert!(
        names.iter().any(|n| n == "setaffinity_enter")
            && names.iter().any(|n| n == "setaffinity_exit"),
        "affinity_syscalls = true should attach the syscall tracepoints: {names:?}"
    );
    assert!(
        kernel_programs().iter().any(|n| n == "setaffinity_enter"),
        "bpftool lists no setaffinity_enter program"
    );
    let repins = daemon.metric("pinguard_repins_total", &vm).unwrap_or(0.0);

    // Someone moves the vCPU to the housekeeping CPU by hand.
    let out = Command::new("taskset")
        .args(["-p", "0x1", &vcpu.to_string()])
        .output()
        .expect("run taskset");
    assert!(out.status.success(), "taskset failed: {out:?}");
    wait_for("the vCPU to be re-pinned to CPU 1", WAIT, || {
        (cpus_allowed(guest.pid(), vcpu) == "1").then_some(())
    });
    daemon.wait_metric(
        "a re-pin to be counted",
        "pinguard_repins_total",
        &vm,
        |v| v > repins,
    );
    let v = wait_for("an affinity_changed violation naming taskset", WAIT, || {
        violations(&daemon)
            .into_iter()
            .find(|v| v["kind"] == "affinity_changed" && v["comm"] == "taskset")
    });
    assert_eq!(v["vm"], "pg-enforce", "{v}");
    assert!(
        daemon
            .metric("pinguard_violations_total", &[("kind", "affinity_changed")])
            .unwrap_or(0.0)
            >= 1.0
    );

    // A user thread bound to the guarded CPU is moved to housekeeping.
    // Created on CPU 0 and moved by itself: the creating test thread must not
    // visit CPU 1, where the daemon would evict it (and the child would inherit that).
    let intruder = Worker::spawn_on("pg-evictee", &[0]);
    let itid = intruder.tid();
    let me = std::process::id();
    intruder.run(move || {
        set_affinity(itid, &[1]);
        let deadline = std::time::Instant::now() + WAIT;
        while cpus_allowed(me, itid) != "0" && std::time::Instant::now() < deadline {
            spin(Duration::from_millis(1));
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    assert_eq!(
        cpus_allowed(me, itid),
        "0",
        "the intruder was not evicted to the housekeeping CPU"
    );
    daemon.wait_metric(
        "an eviction to be counted",
        "pinguard_evictions_total",
        &[("cpu", "1")],
        |v| v >= 1.0,
    );

    // Kernel threads are never touched: had pinguard tried, the kernel would
    // have refused with EINVAL (PF_NO_SETAFFINITY) and it would be counted.
    assert_eq!(
        daemon.metric("pinguard_enforcement_errors_total", &[("action", "evict")]),
        Some(0.0)
    );
    for comm in ["ksoftirqd/1", "migration/1", "cpuhp/1"] {
        if let Some(pid) = find_kthread(comm) {
            assert_eq!(cpus_allowed(pid, pid), "1", "{comm} was moved");
        }
    }
    drop(guest);
    drop(daemon);
}

fn find_kthread(comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_string_lossy().parse().ok()?;
        (std::fs::read_to_string(p.path().join("comm")).ok()?.trim() == comm).then_some(pid)
    })
}

#[test]
fn survives_guest_kill_bad_reload_and_repeated_scrapes() {
    require!(missing_kvm());
    let mut daemon = Daemon::start("mode = \"observe\"\n", &[]);
    let mut guest = Guest::start(GuestOptions::new("pg-victim"));
    let vm = [("vm", "pg-victim")];
    daemon.wait_metric(
        "the guest to be discovered",
        "pinguard_vcpu_info",
        &vm,
        |v| v == 1.0,
    );
    guest.kill();
    wait_for(
        "the killed guest to disappear from the metrics",
        WAIT,
        || {
            daemon
                .metric("pinguard_vcpu_info", &vm)
                .is_none()
                .then_some(())
        },
    );

    // A new guest after the old one's threads are gone (their ids may be reused).
    let second = Guest::start(GuestOptions::new("pg-second"));
    daemon.wait_metric(
        "the second guest",
        "pinguard_vcpu_info",
        &[("vm", "pg-second")],
        |v| v == 1.0,
    );

    // A broken config on SIGHUP is refused and the daemon keeps running.
    std::fs::write(&daemon.config, "mode = \"sideways\"\n").unwrap();
    daemon.process().signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_metric(
        "the failed reload to be counted",
        "pinguard_config_reloads_total",
        &[("result", "failure")],
        |v| v == 1.0,
    );
    let line = daemon.process().wait_stderr("reload failed", WAIT);
    assert!(
        line.contains("mode") && line.contains("keeping the running configuration"),
        "{line}"
    );
    assert_eq!(
        daemon.metric("pinguard_mode", &[("mode", "observe")]),
        Some(1.0)
    );
    std::fs::write(
        &daemon.config,
        "mode = \"observe\"\nevent_interval = \"2s\"\n",
    )
    .unwrap();
    daemon.process().signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_metric(
        "the good reload",
        "pinguard_config_reloads_total",
        &[("result", "success")],
        |v| v == 1.0,
    );

    // Many scrapes: every one answers, and the daemon stays up.
    for i in 0..200 {
        let (status, body) = daemon.get(if i % 2 == 0 { "/metrics" } else { "/healthz" });
        assert_eq!(status, 200, "request {i}: {body}");
    }
    let (status, _) = daemon.get("/nope");
    assert_eq!(status, 404);
    http_is_keep_alive_and_head_has_the_length_of_get(daemon.addr);
    assert!(daemon.metric("pinguard_vms", &[]).unwrap_or(0.0) >= 1.0);
    drop(second);
    let err = daemon.stop();
    assert!(!err.iter().any(|l| l.contains("panicked")), "{err:?}");
}

#[test]
fn shared_cpu_is_reported_once_not_at_every_rescan() {
    require!(missing_kvm());
    let daemon = Daemon::start("mode = \"observe\"\nrescan_interval = \"200ms\"\n", &[]);
    let _a = Guest::start(GuestOptions::new("pg-share-a"));
    let _b = Guest::start(GuestOptions::new("pg-share-b"));
    // Two vCPUs, one guarded CPU: they must share it.
    daemon.wait_metric(
        "the shared CPU",
        "pinguard_violations_total",
        &[("cpu", "1"), ("kind", "shared_cpu")],
        |v| v >= 1.0,
    );
    let count = daemon
        .metric(
            "pinguard_violations_total",
            &[("cpu", "1"), ("kind", "shared_cpu")],
        )
        .unwrap();
    let scans = daemon
        .metric("pinguard_discovery_scans_total", &[])
        .unwrap();
    daemon.wait_metric(
        "three more rescans",
        "pinguard_discovery_scans_total",
        &[],
        |v| v >= scans + 3.0,
    );
    assert_eq!(
        daemon.metric(
            "pinguard_violations_total",
            &[("cpu", "1"), ("kind", "shared_cpu")]
        ),
        Some(count),
        "the same shared CPU was reported again by a rescan"
    );
    let v = violations(&daemon)
        .into_iter()
        .find(|v| v["kind"] == "shared_cpu")
        .expect("listed in /violations");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("pg-share-a") && detail.contains("pg-share-b"),
        "{detail}"
    );
}

#[test]
fn a_reused_vcpu_thread_id_is_not_taken_for_the_old_vcpu() {
    require!(missing_kvm());
    let daemon = Daemon::start("mode = \"enforce\"\nverify_interval = \"100ms\"\n", &[]);
    let mut guest = Guest::start(GuestOptions::new("pg-reuse"));
    let old_vcpu = guest.vcpu_tids()[0];
    let vm = [("vm", "pg-reuse")];
    daemon.wait_metric("the vCPU to be pinned", "pinguard_vcpu_pinned", &vm, |v| {
        v == 1.0
    });
    // Its first placement counts as a re-pin (QEMU starts it on every CPU).
    assert!(
        daemon
            .metric("pinguard_repins_total", &vm)
            .is_some_and(|v| v >= 1.0),
        "no re-pin counted for the new guest"
    );
    guest.kill();
    wait_for("the killed guest to be forgotten", WAIT, || {
        daemon
            .metric("pinguard_vcpu_info", &vm)
            .is_none()
            .then_some(())
    });
    // A guest that is gone takes its series along (bounded label sets with
    // guests coming and going).
    assert_eq!(
        daemon.metric("pinguard_repins_total", &vm),
        None,
        "the gone guest's re-pin counter is still exported"
    );

    // Make the kernel hand the dead vCPU's thread id to a new, unrelated thread
    // (ns_last_pid: the next id is last + 1 if free; other tasks may race us).
    assert!(
        !std::path::Path::new(&format!("/proc/{old_vcpu}")).exists(),
        "vCPU thread {old_vcpu} still exists after its guest was killed"
    );
    let mut got = Vec::new();
    let worker = (0..50)
        .find_map(|_| {
            if let Err(e) =
                std::fs::write("/proc/sys/kernel/ns_last_pid", (old_vcpu - 1).to_string())
            {
                panic!("writing /proc/sys/kernel/ns_last_pid: {e}");
            }
            // Created on the housekeeping CPU (so the creating test thread never
            // visits CPU 1, where the enforcing daemon could evict it), then it
            // moves itself to CPU 1.
            let w = Worker::spawn_on("pg-newcomer", &[0]);
            got.push(w.tid());
            (w.tid() == old_vcpu).then_some(w)
        })
        .unwrap_or_else(|| {
            panic!(
                "could not get thread id {old_vcpu} reused; other tasks took it first, got {got:?}"
            )
        });
    let tid = worker.tid();
    let me = std::process::id();
    worker.run(move || {
        set_affinity(tid, &[1]);
        let deadline = std::time::Instant::now() + WAIT;
        while cpus_allowed(me, tid) != "0" && std::time::Instant::now() < deadline {
            spin(Duration::from_millis(1));
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    // Had pinguard still taken the id for the old vCPU it would have pinned the
    // thread to CPU 1; as a stranger on a guarded CPU it is evicted instead.
    assert_eq!(
        cpus_allowed(me, tid),
        "0",
        "thread {tid} (a reused vCPU id) was not treated as an intruder"
    );
    // Logged as an intruder (it ran there) or a migration in (it was moved there first),
    // without a VM: the log is used because /violations is a bounded list that a
    // busy non-isolated lab CPU can cycle quickly.
    let mut daemon = daemon;
    // (Matched by tid: its first slice may still carry the creating thread's name.)
    let line = daemon
        .process()
        .wait_stderr(&format!(": tid {tid} pid "), WAIT);
    assert!(
        line.contains("violation intruder") || line.contains("violation migration_in"),
        "{line}"
    );
    assert!(
        !line.contains("(vm "),
        "the newcomer was attributed to a VM: {line}"
    );
}

#[test]
fn emulator_threads_placed_on_guarded_cpus_by_design_are_left_there() {
    require!(missing_kvm());
    let config =
        "mode = \"enforce\"\nrescan_interval = \"200ms\"\n[placement]\nemulator = \"with-vcpu0\"\n";
    let mut daemon = Daemon::start(config, &[]);
    // Running (no -S): its threads are busy on CPU 1 with the vCPU.
    let mut opts = GuestOptions::new("pg-withvcpu0");
    opts.paused = false;
    let guest = Guest::start(opts);
    let vm = [("vm", "pg-withvcpu0")];
    daemon.wait_metric("the vCPU to be pinned", "pinguard_vcpu_pinned", &vm, |v| {
        v == 1.0
    });
    wait_for("emulator threads on the vCPU's CPU", WAIT, || {
        guest
            .emulator_tids()
            .iter()
            .all(|t| cpus_allowed(guest.pid(), *t) == "1")
            .then_some(())
    });
    // Several rescans later they are still there, and none was evicted.
    let scans = daemon
        .metric("pinguard_discovery_scans_total", &[])
        .unwrap();
    daemon.wait_metric("more rescans", "pinguard_discovery_scans_total", &[], |v| {
        v >= scans + 5.0
    });
    for t in guest.emulator_tids() {
        assert_eq!(
            cpus_allowed(guest.pid(), t),
            "1",
            "emulator thread {t} was moved off vCPU 0's CPU"
        );
    }
    let pid = guest.pid();
    drop(guest);
    let err = daemon.stop();
    let evicted: Vec<&String> = err
        .iter()
        .filter(|l| l.contains("evicted tid") && l.contains(&format!("pid {pid})")))
        .collect();
    assert!(
        evicted.is_empty(),
        "the guest's own threads were evicted: {evicted:?}"
    );
}

#[test]
fn allowlisted_threads_are_neither_violations_nor_evicted() {
    require!(missing_kvm());
    let config = "mode = \"enforce\"\n[[allow]]\ncomm = \"pg-allow*\"\n";
    // Threads first (blocked, named): the daemon would otherwise see, and may
    // evict, the test thread that briefly moves to CPU 1 to create them.
    let allowed = Worker::spawn_on("pg-allowed", &[1]);
    let stranger = Worker::spawn_on("pg-stranger", &[1]);
    let mut daemon = Daemon::start(config, &[]);
    let me = std::process::id();
    let work = |w: &Worker| {
        let tid = w.tid();
        w.run(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while cpus_allowed(me, tid) == "1" && std::time::Instant::now() < deadline {
                spin(Duration::from_millis(1));
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    };
    // The stranger is evicted (the daemon works), the allowlisted thread is not.
    work(&stranger);
    assert_eq!(
        cpus_allowed(me, stranger.tid()),
        "0",
        "the stranger was not evicted"
    );
    work(&allowed);
    assert_eq!(
        cpus_allowed(me, allowed.tid()),
        "1",
        "the allowlisted thread was moved"
    );
    let err = daemon.stop();
    let tid = allowed.tid();
    let about: Vec<&String> = err
        .iter()
        .filter(|l| l.contains(&format!("tid {tid} ")))
        .collect();
    assert!(
        about.is_empty(),
        "the allowlisted thread was reported or acted on: {about:?}"
    );
}

#[test]
fn a_thread_calling_itself_a_vcpu_is_still_evicted() {
    require!(missing_bpf());
    // Any thread can name itself "CPU 0/KVM" (prctl); this process holds no
    // KVM vCPU, so it is no guest and its thread is an intruder like any other.
    let impostor = Worker::spawn_on("CPU 0/KVM", &[1]);
    let daemon = Daemon::start("mode = \"enforce\"\n", &[]);
    let (me, tid) = (std::process::id(), impostor.tid());
    impostor.run(move || {
        let deadline = std::time::Instant::now() + WAIT;
        while cpus_allowed(me, tid) == "1" && std::time::Instant::now() < deadline {
            spin(Duration::from_millis(1));
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    assert_eq!(
        cpus_allowed(me, tid),
        "0",
        "a thread named like a vCPU was left on the guarded CPU"
    );
    assert_eq!(
        daemon.metric("pinguard_vms", &[]),
        Some(0.0),
        "adopted as a guest"
    );
}

#[test]
fn a_second_daemon_is_refused_and_names_the_running_one() {
    require!(missing_bpf());
    let daemon = Daemon::start("mode = \"observe\"\n", &[]);
    let port = testkit::http::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let second = testkit::process::Process::pinguard(&["run", "--guard", "1", "--listen", &listen]);
    let out = second.try_finish(WAIT).unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", out.stderr);
    let err = out.stderr.join("\n");
    assert!(
        err.contains("another `pinguard run` is running")
            && err.contains(&format!("pid {}", daemon.pid())),
        "{err}"
    );
    // The first one is unharmed.
    let (status, _) = daemon.get("/healthz");
    assert_eq!(status, 200);
}

#[test]
fn idle_connections_do_not_lock_scrapers_out() {
    require!(missing_bpf());
    let daemon = Daemon::start("mode = \"observe\"\n", &[]);
    // More idle connections than the old server's 64 slots, which held a
    // scraper off for 30 s: `get` fails after the kit's 5 s HTTP timeout.
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(daemon.addr).unwrap())
        .collect();
    let (status, body) = daemon.get("/healthz");
    assert_eq!(status, 200, "{body}");
    drop(idle);
}

/// The capabilities the systemd unit grants (`CapabilityBoundingSet=`), as
/// setpriv names them ("bpf", "sys_nice", ...).
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/pinguard.service"
    ))
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

#[test]
fn runs_and_enforces_with_only_the_units_capabilities() {
    require!(missing_kvm());
    let caps = unit_capabilities();
    let set = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut opts = testkit::daemon::DaemonOptions::new("mode = \"enforce\"\n");
    // Root, as the unit runs it, but bounded to exactly the unit's capabilities.
    opts.wrapper = ["setpriv", "--bounding-set", &set, "--no-new-privs", "--"]
        .map(String::from)
        .to_vec();
    let daemon = Daemon::start_with(&opts);
    let caps_of = |pid: &str, field: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    let eff = caps_of(&daemon.pid().to_string(), "CapEff:");
    // What this lab can grant at all (a container may lack some, e.g.
    // CAP_SYS_RESOURCE, which kernels since 5.11 do not need).
    let lab = caps_of("self", "CapBnd:");
    // CAP_SYS_PTRACE 19, CAP_SYS_NICE 23, CAP_SYS_RESOURCE 24, CAP_PERFMON 38, CAP_BPF 39.
    let bit = |name: &str| match name {
        "sys_ptrace" => 19,
        "sys_nice" => 23,
        "sys_resource" => 24,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("unexpected capability {other} in the unit"),
    };
    let want: u64 = caps.iter().map(|c| 1u64 << bit(c)).sum::<u64>() & lab;
    assert_eq!(
        eff, want,
        "the daemon runs with other capabilities than the unit's"
    );
    // Everything a guest needs: discovery (its KVM fds), ownership, pinning.
    let guest = Guest::start(GuestOptions::new("pg-caps"));
    daemon.wait_metric(
        "the vCPU to be pinned with the unit's capabilities",
        "pinguard_vcpu_pinned",
        &[("vm", "pg-caps")],
        |v| v == 1.0,
    );
    assert_eq!(cpus_allowed(guest.pid(), guest.vcpu_tids()[0]), "1");
    let (status, body) = daemon.get("/healthz");
    assert_eq!(status, 200, "{body}");
}

/// Two requests on one connection (keep-alive), the second a HEAD whose
/// Content-Length is the size GET would send, and no body.
fn http_is_keep_alive_and_head_has_the_length_of_get(addr: std::net::SocketAddr) {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    // Reads one response head: the status line and the Content-Length.
    let head = |r: &mut BufReader<std::net::TcpStream>| -> (String, usize) {
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let mut len = None;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = Some(v.trim().parse().unwrap());
            }
        }
        (status, len.expect("a Content-Length header"))
    };
    w.write_all(b"GET /healthz HTTP/1.1\r\nHost: pinguard\r\n\r\n")
        .unwrap();
    let (status, len) = head(&mut r);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    assert_eq!(body, b"ok\n");
    // Same connection: it was kept open.
    w.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: pinguard\r\n\r\n")
        .unwrap();
    let (status, len) = head(&mut r);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(len, 3, "HEAD announces the length of the GET body");
    // No body follows a HEAD: the next thing on the wire is the next answer.
    w.write_all(b"GET /nope HTTP/1.1\r\nHost: pinguard\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (status, _) = head(&mut r);
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
}
