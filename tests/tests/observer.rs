//! The eBPF observer (`pinguard watch`) against real threads on the real kernel.
//! CPU 1 is guarded; CPU 0 is housekeeping.
use std::time::Duration;

use serde_json::Value;
use testkit::{
    env::missing_bpf,
    process::{Process, run},
    require,
    threads::{Worker, cpus_allowed, schedstat_run_ns, set_affinity, spin},
};

const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn start_watch(extra: &[&str]) -> Process {
    let mut args = vec![
        "watch",
        "--guard",
        "1",
        "--json",
        "--event-interval",
        "0",
        "--top",
        "1000",
    ];
    args.extend_from_slice(extra);
    let mut p = Process::pinguard(&args);
    p.wait_stderr("watching CPUs", ATTACH_TIMEOUT);
    p
}

fn parse(lines: &[String]) -> (Vec<Value>, Value) {
    let mut events = Vec::new();
    let mut summary = None;
    for l in lines {
        let v: Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"));
        if v["event"] == "summary" {
            summary = Some(v);
        } else {
            events.push(v);
        }
    }
    (
        events,
        summary.unwrap_or_else(|| panic!("no summary line in output:\n{}", lines.join("\n"))),
    )
}

/// Stops `watch` (SIGINT), which must exit cleanly: its events and summary.
fn stop_watch(watch: Process) -> (Vec<Value>, Value) {
    let testkit::process::Output {
        status,
        stdout: out,
        stderr: err,
    } = watch.stop(EXIT_TIMEOUT);
    assert!(
        status.success(),
        "watch failed: {status:?}\n{}",
        err.join("\n")
    );
    parse(&out)
}

fn cpu_summary(summary: &Value, cpu: u64) -> &Value {
    summary["cpus"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["cpu"] == cpu))
        .unwrap_or_else(|| panic!("summary has no CPU {cpu}: {summary}"))
}

#[test]
fn intruder_bursts_are_reported_and_accounted_like_schedstat() {
    require!(missing_bpf());
    let watch = start_watch(&[]);
    let intruder = Worker::spawn_on("pg-intruder", &[1]);
    let tid = intruder.tid();
    intruder.run(|| {
        for _ in 0..50 {
            spin(Duration::from_micros(200));
            // Blocking ends the run slice: one burst, one slice.
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    // The worker is now blocked (off the CPU), so its schedstat is final for this window.
    let kernel_ns = schedstat_run_ns(tid);
    let (events, summary) = stop_watch(watch);

    let mine: Vec<&Value> = events.iter().filter(|e| e["tid"] == tid).collect();
    let pid = std::process::id();
    assert!(
        mine.len() >= 50,
        "expected an intrusion event for each of the 50 bursts of tid {tid}, got {}",
        mine.len()
    );
    for e in &mine {
        assert_eq!(e["event"], "intrusion", "{e}");
        assert_eq!(e["cpu"], 1, "{e}");
        assert_eq!(e["tgid"], pid, "{e}");
        assert_eq!(e["comm"], "pg-intruder", "{e}");
        assert_eq!(e["class"], "intruder_user", "{e}");
    }
    let cpu1 = cpu_summary(&summary, 1);
    let entry = cpu1["top_intruders"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["tid"] == tid))
        .unwrap_or_else(|| panic!("tid {tid} missing from the summary: {cpu1}"));
    let accounted = entry["run_ns"].as_u64().unwrap();
    let diff = (accounted as f64 - kernel_ns as f64).abs() / kernel_ns as f64;
    // Seen once in ~40 runs: 19.6% more than schedstat, cause not found. The
    // slices say whether one long slice (a wall-clock one) or many carry it.
    let mut slices: Vec<u64> = mine.iter().filter_map(|e| e["run_ns"].as_u64()).collect();
    slices.sort_unstable_by(|a, b| b.cmp(a));
    assert!(
        diff <= 0.05,
        "pinguard accounted {accounted} ns for tid {tid}, /proc schedstat says {kernel_ns} ns ({:.1}% apart, limit 5%); \
         its summary entry: {entry}; its {} slices, longest first: {:?}",
        diff * 100.0,
        slices.len(),
        &slices[..slices.len().min(12)]
    );
    assert_eq!(summary["events_lost"], 0, "{summary}");
    // With --event-interval 0 every slice is an event: together they are the whole run time
    // (bursts may be split into several slices when something preempts them).
    let reported: u64 = mine.iter().map(|e| e["run_ns"].as_u64().unwrap_or(0)).sum();
    assert_eq!(
        reported, accounted,
        "events of tid {tid} do not add up to its accounted time"
    );
    // Bursts are timed by the wall clock; IRQs inside them are not the thread's CPU time.
    assert!(
        accounted >= 50 * 150_000,
        "50 bursts of 200 µs should add up to about 10 ms, got {accounted} ns"
    );
}

#[test]
fn migration_onto_guarded_cpu_is_reported_owner_and_kernel_threads_are_not() {
    require!(missing_bpf());
    // The owner exists before the observer starts so it can be named with --owner.
    let owner = Worker::spawn_on("pg-owner", &[1]);
    let owner_arg = format!("1={}", owner.tid());
    let watch = start_watch(&["--owner", &owner_arg]);

    // The owner works on its CPU: no intrusion.
    owner.run(|| {
        for _ in 0..20 {
            spin(Duration::from_micros(300));
            std::thread::sleep(Duration::from_micros(500));
        }
    });

    // A thread on CPU 0 is moved onto CPU 1 with sched_setaffinity, works, and
    // is moved back while running there, which runs the per-CPU stopper thread
    // migration/1 on CPU 1: an allowed kernel thread that must not be reported.
    let mover = Worker::spawn_on("pg-mover", &[0]);
    let mover_tid = mover.tid();
    mover.run(move || {
        set_affinity(mover_tid, &[1]);
        spin(Duration::from_millis(2));
        set_affinity(mover_tid, &[0]);
        spin(Duration::from_millis(1));
    });

    let (events, summary) = stop_watch(watch);

    let migrated = events
        .iter()
        .find(|e| e["event"] == "migrate_in" && e["tid"] == mover_tid)
        .unwrap_or_else(|| panic!("no migrate_in event for tid {mover_tid}; events: {events:?}"));
    assert_eq!(migrated["cpu"], 1, "{migrated}");
    assert_eq!(migrated["other_cpu"], 0, "{migrated}");
    assert_eq!(migrated["comm"], "pg-mover", "{migrated}");
    assert_eq!(migrated["tgid"], std::process::id(), "{migrated}");

    let owner_events: Vec<&Value> = events.iter().filter(|e| e["tid"] == owner.tid()).collect();
    assert!(
        owner_events.is_empty(),
        "the owner produced events: {owner_events:?}"
    );

    let cpu1 = cpu_summary(&summary, 1);
    assert!(
        cpu1["run_ns"]["vcpu"].as_u64().unwrap() >= 5_000_000,
        "owner time not counted as vcpu: {cpu1}"
    );
    assert!(
        cpu1["run_ns"]["kernel"].as_u64().unwrap() > 0,
        "no per-CPU kernel thread time seen: {cpu1}"
    );
    let percpu_kthread = |comm: &str| {
        [
            "migration/",
            "ksoftirqd/",
            "cpuhp/",
            "kworker/1:",
            "idle_inject/",
        ]
        .iter()
        .any(|p| comm.starts_with(p))
    };
    let bad: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "intrusion" && percpu_kthread(e["comm"].as_str().unwrap_or("")))
        .collect();
    assert!(
        bad.is_empty(),
        "per-CPU kernel threads reported as intruders: {bad:?}"
    );
}

#[test]
fn a_containers_pid_is_not_taken_for_the_hosts_thread_of_that_id() {
    require!(missing_bpf());
    // The host's init (tid 1) stands in for a vCPU: in a fresh PID namespace,
    // id 1 is the namespace's own first process.
    let watch = start_watch(&["--owner", "1=1"]);
    let init_cpus = cpus_allowed(1, 1);
    assert!(!init_cpus.is_empty(), "no Cpus_allowed_list for pid 1");
    // In a container, `taskset -p ... 1` changes the container's process 1
    // (here: that very taskset), not the host's init.
    let out = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "taskset", "-pc", &init_cpus, "1"])
        .output()
        .expect("run unshare");
    assert!(out.status.success(), "unshare ... taskset failed: {out:?}");
    // On the host it is init, set to the affinity it already has (nothing changes).
    let host = std::process::Command::new("taskset")
        .args(["-pc", &init_cpus, "1"])
        .spawn()
        .expect("run taskset");
    let host_pid = host.id();
    let status = host.wait_with_output().expect("taskset").status;
    assert!(status.success(), "taskset -pc {init_cpus} 1 failed");

    let (events, _) = stop_watch(watch);
    let changes: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "affinity_change" && e["target_tid"] == 1)
        .collect();
    assert!(
        changes
            .iter()
            .any(|e| e["tgid"] == host_pid && e["comm"] == "taskset"),
        "the host's taskset on tid 1 was not reported: {changes:?}"
    );
    assert!(
        changes.iter().all(|e| e["tgid"] == host_pid),
        "a change made inside a PID namespace was reported as one of host tid 1: {changes:?}"
    );
}

#[test]
fn bad_guard_and_owner_are_clear_errors() {
    require!(missing_bpf());
    let r = run(&["watch", "--guard", "7", "--duration", "1"], EXIT_TIMEOUT);
    let err = &r.stderr;
    assert_eq!(r.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains("CPU 7 is not online") && err.contains("0-1"),
        "stderr: {err}"
    );
    let r = run(
        &["watch", "--guard", "1", "--owner", "0=1", "--duration", "1"],
        EXIT_TIMEOUT,
    );
    let err = &r.stderr;
    assert_eq!(r.code(), Some(2), "stderr: {err}");
    assert!(err.contains("CPU 0 is not guarded"), "stderr: {err}");
    let r = run(&["watch", "--guard", "1-x"], EXIT_TIMEOUT);
    let err = &r.stderr;
    assert_eq!(r.code(), Some(2), "stderr: {err}");
    assert!(err.contains("--guard"), "stderr: {err}");
}

/// A thread id reused by a new thread on the guarded CPU (the kernel hands
/// out ids again once they wrap; `ns_last_pid` makes it happen now) is a
/// new entry, not the old thread's run time and slices continued.
#[test]
fn a_reused_thread_id_is_counted_as_a_new_thread() {
    require!(missing_bpf());
    const LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";
    let watch = start_watch(&[]);
    let old = Worker::spawn_on("pg-reuse-old", &[1]);
    let tid = old.tid();
    old.run(|| {
        for _ in 0..20 {
            spin(Duration::from_micros(200));
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    drop(old);
    // The next id the kernel gives out is `tid` again, unless something
    // else on the host forks first: then try again.
    let mut reused = None;
    for _ in 0..50 {
        std::fs::write(LAST_PID, (tid - 1).to_string()).expect("writing ns_last_pid");
        let new = Worker::spawn_on("pg-reuse-new", &[1]);
        if new.tid() == tid {
            reused = Some(new);
            break;
        }
    }
    let new = reused.unwrap_or_else(|| panic!("thread id {tid} was never handed out again"));
    new.run(|| spin(Duration::from_micros(300)));
    drop(new);
    let (events, _) = stop_watch(watch);
    let of_tid: Vec<&Value> = events.iter().filter(|e| e["tid"] == tid).collect();
    let old_slices = of_tid
        .iter()
        .filter(|e| e["comm"] == "pg-reuse-old")
        .filter_map(|e| e["slices"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(old_slices >= 20, "the old thread's events: {of_tid:#?}");
    // The new thread's first event starts a count of its own.
    let first_new = of_tid
        .iter()
        .find(|e| e["comm"] != "pg-reuse-old")
        .unwrap_or_else(|| panic!("no event of the new thread {tid}: {of_tid:#?}"));
    assert_eq!(first_new["slices"], 1, "old slices continued: {first_new}");
}
