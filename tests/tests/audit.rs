//! `pinguard audit` against the real host: real threads, a real QEMU/KVM
//! guest, the real eBPF observer. CPU 1 is guarded, CPU 0 is housekeeping.
//!
//! Other tests (and other people) may run guests and threads on this host at
//! the same time: every check filters by our own thread ids and guest.
use std::{
    collections::BTreeMap,
    fs,
    os::unix::process::CommandExt as _,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use testkit::{
    cpus,
    env::{missing_bpf, missing_kvm, pinguard_bin},
    guest::{Guest, GuestOptions, wait_for_no_other_guests},
    process::{self, Process, Run, run_subcommand},
    require,
    threads::{Worker, cpus_allowed, spin},
};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

fn audit(args: &[&str]) -> Run {
    run_subcommand("audit", args, RUN_TIMEOUT)
}

/// Skips unless CPU 1 (the guarded CPU of these tests) is online.
fn missing_cpu1() -> Option<String> {
    (!cpus::online().1.contains(&1))
        .then(|| "needs CPU 1 online (it is the guarded CPU of these tests)".to_string())
}

fn cpu(report: &Value, cpu: u64) -> &Value {
    report["cpus"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["cpu"] == cpu))
        .unwrap_or_else(|| panic!("the report has no CPU {cpu}: {report}"))
}

fn list<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} array in {v}"))
}

fn row(cpu_report: &Value, tid: u32) -> Option<&Value> {
    list(cpu_report, "threads").iter().find(|t| t["tid"] == tid)
}

/// Every violation in the report, on any CPU.
fn violations(report: &Value) -> Vec<&Value> {
    list(report, "cpus")
        .iter()
        .flat_map(|c| list(c, "violations"))
        .collect()
}

/// `ps -eLo lwp,psr,stat`: tid -> (last CPU, state).
fn ps() -> BTreeMap<u32, (u32, String)> {
    let out = Command::new("ps")
        .args(["-eLo", "lwp=,psr=,stat="])
        .output()
        .expect("running ps");
    assert!(out.status.success(), "ps failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                (f.next()?.parse().ok()?, f.next()?.to_string()),
            ))
        })
        .collect()
}

#[test]
fn snapshot_agrees_with_ps() {
    require!(missing_cpu1());
    // A thread of ours that is certainly on CPU 1, so the comparison is never empty.
    let on_cpu1 = Worker::spawn_on("pg-audit-ps", &[1]);
    // Threads wake up and move while we look: compare only threads that
    // slept on the same CPU in a ps taken before and one taken after the
    // audit. A thread may still have run elsewhere in between, so a
    // mismatch is retried; a real disagreement persists.
    let mut last_mismatch = Vec::new();
    for _attempt in 0..3 {
        let before = ps();
        let r = audit(&["--guard", "1", "--json"]);
        let after = ps();
        assert!(
            matches!(r.code(), Some(0 | 1)),
            "audit failed: {:?}\n{}",
            r.status,
            r.stderr
        );
        let report = r.json();
        assert_eq!(report["mode"], "snapshot");
        assert_eq!(report["guarded"], "1");
        let cpu1 = cpu(&report, 1);
        let stable: Vec<u32> = before
            .iter()
            .filter(|(tid, (psr, stat))| {
                *psr == 1
                    && !stat.starts_with('R')
                    && after
                        .get(tid)
                        .is_some_and(|(p, s)| *p == 1 && !s.starts_with('R'))
            })
            .map(|(tid, _)| *tid)
            .collect();
        assert!(
            stable.contains(&on_cpu1.tid()),
            "our thread {} pinned to CPU 1 is not on CPU 1 in ps",
            on_cpu1.tid()
        );
        // Listed under CPU 1, and saying it last ran there, as ps does.
        last_mismatch = stable
            .iter()
            .filter(|tid| row(cpu1, **tid).is_none_or(|t| t["last_cpu"] != 1))
            .copied()
            .collect();
        if last_mismatch.is_empty() {
            let mine = row(cpu1, on_cpu1.tid()).unwrap();
            assert_eq!(mine["last_cpu"], 1, "{mine}");
            assert_eq!(mine["affinity"], "1", "{mine}");
            assert_eq!(mine["comm"], "pg-audit-ps", "{mine}");
            return;
        }
    }
    panic!(
        "threads ps shows on CPU 1 (before and after the audit) are missing from the audit of CPU 1 \
         or listed with another last CPU: {last_mismatch:?}"
    );
}

#[test]
fn pinned_intruder_is_a_violation_named_by_tid_and_comm() {
    require!(missing_cpu1());
    let intruder = Worker::spawn_on("pg-audit-intr", &[1]);
    let tid = intruder.tid();
    let me = std::process::id();

    let r = audit(&["--guard", "1", "--json"]);
    assert_eq!(r.code(), Some(1), "stderr:\n{}", r.stderr);
    let report = r.json();
    let v = violations(&report)
        .into_iter()
        .find(|v| v["tid"] == tid)
        .unwrap_or_else(|| {
            panic!(
                "intruder {tid} (affinity now {}) is not a violation: {:#}",
                cpus_allowed(me, tid),
                cpu(&report, 1)["violations"]
            )
        });
    assert_eq!(v["kind"], "intruder", "{v}");
    assert_eq!(v["cpu"], 1, "{v}");
    assert_eq!(v["comm"], "pg-audit-intr", "{v}");
    assert_eq!(v["pid"], me, "{v}");
    let t = row(cpu(&report, 1), tid).expect("the intruder's row");
    assert_eq!(t["class"], "user", "{t}");
    assert_eq!(t["status"], "violation", "{t}");
    assert_eq!(t["affinity"], "1", "{t}");
    assert!(report["summary"]["violations"].as_u64().unwrap() >= 1);

    // The table names it too, as a violation.
    let r = audit(&["--guard", "1"]);
    assert_eq!(r.code(), Some(1), "stderr:\n{}", r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("pg-audit-intr"))
        .unwrap_or_else(|| panic!("pg-audit-intr missing from the table:\n{}", r.stdout));
    assert!(
        line.contains(&tid.to_string()) && line.contains("VIOLATION intruder"),
        "{line}"
    );
    assert!(r.stdout.contains("Summary: "), "{}", r.stdout);
}

/// `pinguard pin` manages every guest on the host: it fails when a guest
/// someone else started appears between our check and the pin. Retry then.
fn pin_alone(g: &Guest) {
    for _ in 0..3 {
        wait_for_no_other_guests(&[g]);
        let r = process::run(&["pin", "--guard", "1"], RUN_TIMEOUT);
        if r.code() == Some(0) {
            return;
        }
        assert!(
            r.stderr.contains("need a guarded CPU each"),
            "pinguard pin failed ({}):\n{}\n{}",
            r.status,
            r.stdout,
            r.stderr
        );
    }
    panic!(
        "other guests kept appearing; could not pin {} alone",
        g.name()
    );
}

#[test]
fn pinned_guest_owns_its_cpu_and_its_emulator_threads_are_not_violations() {
    require!(missing_kvm());
    let g = Guest::start(GuestOptions::new("audit-g1"));
    let vcpu = g.vcpu_tids()[0];
    let emulators = g.emulator_tids();
    assert!(!emulators.is_empty());
    let ours = |v: &&Value| v["pid"] == g.pid() || v["tid"] == vcpu;

    // Unpinned (QEMU's default affinity includes CPU 1): the audit says so.
    if cpus_allowed(g.pid(), vcpu) != "1" {
        let r = audit(&["--guard", "1", "--json"]);
        assert_eq!(r.code(), Some(1), "stderr:\n{}", r.stderr);
        let report = r.json();
        let mine: Vec<&Value> = violations(&report).into_iter().filter(ours).collect();
        assert!(
            mine.iter().any(|v| v["kind"] == "vcpu_not_pinned"
                && v["tid"] == vcpu
                && v["vm"] == "audit-g1"),
            "unpinned vCPU {vcpu} not reported: {mine:#?}"
        );
        assert!(
            mine.iter().any(|v| v["kind"] == "emulator_on_guarded"),
            "emulator threads allowed on CPU 1 not reported: {mine:#?}"
        );
    }

    pin_alone(&g);
    assert_eq!(cpus_allowed(g.pid(), vcpu), "1");
    let qmp = g.qmp_path().to_str().unwrap().to_string();
    for args in [
        vec!["--guard", "1", "--json"],
        vec!["--guard", "1", "--json", "--qmp", &qmp],
    ] {
        let r = audit(&args);
        assert!(
            matches!(r.code(), Some(0 | 1)),
            "audit {args:?} failed: {:?}\n{}",
            r.status,
            r.stderr
        );
        let report = r.json();
        let cpu1 = cpu(&report, 1);
        assert!(
            list(cpu1, "owners")
                .iter()
                .any(|o| o["tid"] == vcpu && o["vm"] == "audit-g1" && o["vcpu"] == 0),
            "audit {args:?}: vCPU {vcpu} is not CPU 1's owner: {:#}",
            cpu1["owners"]
        );
        let t = row(cpu1, vcpu).unwrap_or_else(|| panic!("vCPU {vcpu} not listed under CPU 1"));
        assert_eq!(t["class"], "owner", "{t}");
        assert_eq!(t["vm"], "audit-g1", "{t}");
        assert_eq!(t["vcpu"], 0, "{t}");
        assert_eq!(t["status"], "ok", "{t}");
        let mine: Vec<&Value> = violations(&report).into_iter().filter(ours).collect();
        assert!(
            mine.is_empty(),
            "audit {args:?}: violations of our pinned guest: {mine:#?}"
        );
        // Emulator threads that last ran on CPU 1 before the pin are listed as such.
        for e in &emulators {
            if let Some(t) = row(cpu1, *e) {
                assert_eq!(t["class"], "emulator", "{t}");
                assert_eq!(t["vm"], "audit-g1", "{t}");
                assert_eq!(t["status"], "ok", "{t}");
            }
        }
    }
}

#[test]
fn window_catches_a_short_intruder_that_a_snapshot_misses() {
    require!(missing_bpf());
    require!(missing_cpu1());
    let mut p = Process::pinguard(&["audit", "--guard", "1", "--window", "2s", "--json"]);
    p.wait_stderr("auditing CPUs 1", ATTACH_TIMEOUT);
    let attached = Instant::now();
    let worker = Worker::spawn_on("pg-audit-short", &[1]);
    let tid = worker.tid();
    worker.run(|| spin(Duration::from_micros(300)));
    drop(worker);
    let ran_within = attached.elapsed();
    let r: Run = p.finish(RUN_TIMEOUT).into();
    assert!(
        ran_within < Duration::from_secs(2),
        "precondition: the intruder should run inside the 2 s window, but it was done only after {ran_within:?}"
    );
    assert_eq!(r.code(), Some(1), "stderr:\n{}", r.stderr);
    let report = r.json();
    assert_eq!(report["mode"], "window");
    assert!(
        report["summary"]["events_lost"].is_u64(),
        "{}",
        report["summary"]
    );
    let cpu1 = cpu(&report, 1);
    let t = row(cpu1, tid).unwrap_or_else(|| {
        panic!("short intruder {tid} missing from the window report of CPU 1: {cpu1:#}")
    });
    assert_eq!(t["comm"], "pg-audit-short", "{t}");
    assert_eq!(t["class"], "user", "{t}");
    let run_ns = t["run_ns"].as_u64().unwrap_or(0);
    assert!(
        run_ns >= 250_000,
        "spun 300 µs but accounted {run_ns} ns: {t}"
    );
    assert!(t["slices"].as_u64().unwrap_or(0) >= 1, "{t}");
    assert!(
        list(cpu1, "violations")
            .iter()
            .any(|v| v["tid"] == tid && v["kind"] == "intruder"),
        "{:#}",
        cpu1["violations"]
    );
    // Time by class covers the window.
    let time = &cpu1["time"];
    for class in [
        "vcpu",
        "kernel",
        "allowed",
        "intruder_user",
        "intruder_kthread",
        "idle",
    ] {
        assert!(time[class]["ns"].is_u64(), "no {class} in {time}");
    }
    assert!(
        time["intruder_user"]["ns"].as_u64().unwrap() >= run_ns,
        "{time}"
    );

    // The thread is gone: a snapshot cannot see it.
    assert!(
        !fs::exists(format!("/proc/self/task/{tid}")).unwrap_or(true),
        "worker {tid} still exists"
    );
    let r = audit(&["--guard", "1", "--json"]);
    assert!(matches!(r.code(), Some(0 | 1)), "stderr:\n{}", r.stderr);
    let report = r.json();
    assert!(
        list(&report, "cpus").iter().all(|c| row(c, tid).is_none()),
        "the snapshot lists exited thread {tid}"
    );
}

#[test]
fn bad_input_exits_2_with_a_clear_error() {
    require!(missing_cpu1());
    let (online, cpus) = cpus::online();
    // 7 on the 2-CPU lab machine; past the last online CPU on bigger hosts.
    let offline = if cpus.contains(&7) {
        cpus.iter().max().unwrap() + 1
    } else {
        7
    };
    let r = audit(&["--guard", &offline.to_string()]);
    assert_eq!(
        r.code(),
        Some(2),
        "stdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.is_empty(), "no report on error: {}", r.stdout);
    assert!(
        r.stderr.contains(&format!("CPU {offline} is not online"))
            && r.stderr.contains(&format!("online CPUs: {online}")),
        "{}",
        r.stderr
    );

    let r = audit(&["--guard", "1", "--qmp", "/nonexistent.sock"]);
    assert_eq!(
        r.code(),
        Some(2),
        "stdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert!(r.stdout.is_empty(), "no report on error: {}", r.stdout);
    assert!(
        r.stderr.contains("--qmp /nonexistent.sock") && r.stderr.contains("cannot connect"),
        "{}",
        r.stderr
    );

    let r = audit(&["--guard", "1", "--window", "0"]);
    assert_eq!(r.code(), Some(2), "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("--window 0"), "{}", r.stderr);
}

#[test]
fn window_without_privileges_exits_2() {
    // Needs root to drop to an unprivileged user (std also drops the supplementary groups).
    require!(missing_bpf());
    require!(missing_cpu1());
    let out = Command::new(pinguard_bin())
        .args(["audit", "--guard", "1", "--window", "1s"])
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .output()
        .expect("running pinguard as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("permission denied loading eBPF programs") && stderr.contains("--window"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("tracefs"),
        "misleading tracefs warning: {stderr}"
    );
}

/// `emulator = "with-vcpu0"` in the config file is one policy: `pin` puts
/// the emulator threads with vCPU 0 on the guarded CPU, `audit` reads the
/// same file and calls that placement intended, and `watch` names the vCPU
/// as a vCPU, not an intruder. Without the file, audit calls the same
/// placement a violation.
#[test]
fn one_config_file_is_the_policy_of_pin_audit_and_watch() {
    require!(missing_kvm());
    let g = Guest::start(GuestOptions {
        // Running, so its vCPU shows up on the guarded CPU for watch.
        paused: false,
        ..GuestOptions::new("audit-policy")
    });
    wait_for_no_other_guests(&[&g]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pinguard.toml");
    fs::write(
        &config,
        "guard = \"1\"\n[placement]\nemulator = \"with-vcpu0\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let r = run_subcommand("pin", &["--config", config], RUN_TIMEOUT);
    assert_eq!(r.code(), Some(0), "{}\n{}", r.stdout, r.stderr);
    let vcpu = g.vcpu_tids()[0];
    assert_eq!(cpus_allowed(g.pid(), vcpu), "1");
    let emulators = g.emulator_tids();
    for t in &emulators {
        assert_eq!(cpus_allowed(g.pid(), *t), "1", "emulator thread {t}");
    }

    let guest_violations = |report: &Value| -> Vec<String> {
        violations(report)
            .into_iter()
            .filter(|v| v["pid"] == g.pid() || v["tgid"] == g.pid())
            .map(|v| v.to_string())
            .collect()
    };
    let r = audit(&["--config", config, "--json"]);
    assert!(matches!(r.code(), Some(0 | 1)), "{}", r.stderr);
    let report = r.json();
    assert_eq!(
        guest_violations(&report),
        Vec::<String>::new(),
        "{report:#}"
    );
    let emu = row(cpu(&report, 1), emulators[0]);
    assert!(
        emu.is_some_and(|e| e["status"] == "ok"),
        "emulator thread {} on CPU 1: {emu:?}",
        emulators[0]
    );
    // The default policy (housekeeping) says the same placement is wrong.
    let r = audit(&["--guard", "1", "--config", "/dev/null", "--json"]);
    let kinds: Vec<String> = guest_violations(&r.json());
    assert!(
        kinds.iter().any(|v| v.contains("emulator_on_guarded")),
        "{kinds:?}"
    );

    // watch without --owner: the vCPU is the owner of CPU 1.
    let out = process::run(
        &[
            "watch",
            "--config",
            config,
            "--json",
            "--duration",
            "2s",
            "--event-interval",
            "0",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    for l in out.stdout.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        if v["event"] == "intrusion" {
            assert_ne!(v["tid"], vcpu, "the vCPU reported as an intruder: {l}");
        }
        if v["event"] == "summary" {
            let cpu1 = list(&v, "cpus").iter().find(|c| c["cpu"] == 1).unwrap();
            assert!(
                cpu1["owner_ns"].as_u64() > Some(0),
                "no owner time on CPU 1: {v}"
            );
        }
    }
}
