//! `pinguard pin` against real QEMU/KVM guests. CPU 1 is guarded, CPU 0 is
//! housekeeping. Guests are started paused (-S) and killed on drop, so no
//! affinity needs restoring. These tests share CPUs and every guest on the
//! host is managed by `pin`: run them serially (--test-threads=1).
use std::time::Duration;

use serde_json::Value;
use testkit::{
    env::missing_kvm,
    guest::{Guest, GuestOptions, wait_for_no_other_guests},
    process::{Run, run_subcommand},
    require,
    threads::cpus_allowed,
};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn pin(args: &[&str]) -> Run {
    run_subcommand("pin", args, RUN_TIMEOUT)
}

fn start(name: &str) -> Guest {
    Guest::start(GuestOptions::new(name))
}

fn entries(v: &Value) -> &Vec<Value> {
    v["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries in {v}"))
}

#[test]
fn pins_vcpu_to_guarded_cpu_and_emulators_to_housekeeping_then_is_stable() {
    require!(missing_kvm());
    let g = start("pin-g1");
    wait_for_no_other_guests(&[&g]);
    let vcpus = g.vcpu_tids();
    assert_eq!(vcpus.len(), 1);
    let emulators = g.emulator_tids();
    assert!(!emulators.is_empty());

    let r = pin(&["--guard", "1", "--json"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    assert_eq!(cpus_allowed(g.pid(), vcpus[0]), "1");
    for t in &emulators {
        assert_eq!(cpus_allowed(g.pid(), *t), "0", "emulator thread {t}");
    }
    let v = r.json();
    let vcpu_entry = entries(&v)
        .iter()
        .find(|e| e["tid"] == vcpus[0])
        .unwrap_or_else(|| panic!("vCPU thread {} not in the plan: {v}", vcpus[0]));
    assert_eq!(vcpu_entry["role"], "vcpu");
    assert_eq!(vcpu_entry["vcpu"], 0);
    assert_eq!(vcpu_entry["vm"], "pin-g1");
    assert_eq!(vcpu_entry["to"], "1");
    assert_eq!(vcpu_entry["change"], true);
    // The guest's kernel thread (the in-kernel PIT's worker) goes with the
    // emulator threads.
    let kthreads = g.kernel_threads();
    assert!(!kthreads.is_empty(), "no kvm-pit/{} thread", g.pid());
    for k in &kthreads {
        assert_eq!(cpus_allowed(*k, *k), "0", "kvm-pit/{}", g.pid());
    }
    assert_eq!(
        entries(&v).len(),
        1 + emulators.len() + kthreads.len(),
        "{v}"
    );

    // A second run finds everything in place.
    let before = g.affinities();
    let r = pin(&["--guard", "1", "--json"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    let v = r.json();
    assert!(
        entries(&v).iter().all(|e| e["change"] == false),
        "second run changed something: {v:#}"
    );
    assert_eq!(g.affinities(), before);
}

#[test]
fn guest_without_debug_threads_is_found_through_qmp() {
    require!(missing_kvm());
    let g = Guest::start(GuestOptions {
        debug_threads: false,
        ..GuestOptions::new("pin-nonames")
    });
    wait_for_no_other_guests(&[&g]);
    let vcpu = g.vcpu_tids()[0];
    let comm = std::fs::read_to_string(format!("/proc/{}/task/{vcpu}/comm", g.pid())).unwrap();
    assert!(
        !comm.starts_with("CPU "),
        "the vCPU thread is named {comm:?}: this test needs it unnamed"
    );

    let r = pin(&["--guard", "1", "--json"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    let v = r.json();
    assert_eq!(v["guests"][0]["source"], "qmp", "{v:#}");
    assert_eq!(v["guests"][0]["name"], "pin-nonames");
    assert_eq!(cpus_allowed(g.pid(), vcpu), "1");
    for t in g.emulator_tids() {
        assert_eq!(cpus_allowed(g.pid(), t), "0", "emulator thread {t}");
    }

    // The same socket given explicitly: found, and nothing left to change.
    let qmp = g.qmp_path().to_str().unwrap().to_string();
    let r = pin(&["--guard", "1", "--qmp", &qmp, "--json"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    let v = r.json();
    assert_eq!(v["guests"][0]["source"], "qmp", "{v:#}");
    assert!(entries(&v).iter().all(|e| e["change"] == false), "{v:#}");
}

#[test]
fn busy_qmp_socket_on_command_line_falls_back_to_thread_names() {
    require!(missing_kvm());
    let g = start("pin-busy");
    wait_for_no_other_guests(&[&g]);
    let vcpu = g.vcpu_tids()[0];
    // Another client holds the monitor: pinguard gets no answer.
    let held = g.hold_qmp();
    let r = pin(&["--guard", "1", "--json"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    assert!(
        r.stderr.contains("falling back to thread names") && r.stderr.contains("no answer"),
        "expected a warning about the busy socket:\n{}",
        r.stderr
    );
    let v = r.json();
    assert_eq!(v["guests"][0]["source"], "thread-names", "{v:#}");
    assert_eq!(cpus_allowed(g.pid(), vcpu), "1");

    // Given explicitly, the same busy socket is an error, and nothing changes.
    let qmp = g.qmp_path().to_str().unwrap().to_string();
    rejected(&[&g], &["--guard", "1", "--qmp", &qmp], "no answer within");
    drop(held);
}

#[test]
fn dry_run_changes_nothing() {
    require!(missing_kvm());
    let g = start("pin-dry");
    wait_for_no_other_guests(&[&g]);
    let before = g.affinities();
    let r = pin(&["--guard", "1", "--dry-run", "--json"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    let v = r.json();
    assert_eq!(v["dry_run"], true);
    let vcpu = g.vcpu_tids()[0];
    let e = entries(&v)
        .iter()
        .find(|e| e["tid"] == vcpu)
        .expect("vCPU entry");
    assert_eq!(
        (e["to"].as_str(), e["change"].as_bool()),
        (Some("1"), Some(true)),
        "entry {e}; affinities before: {before:?} (did something else pin this guest?)"
    );
    assert_eq!(e["status"], "planned");
    assert_eq!(g.affinities(), before);

    let r = pin(&["--guard", "1", "--dry-run"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    assert!(r.stdout.contains("nothing was changed"), "{}", r.stdout);
    assert_eq!(g.affinities(), before);
}

/// Runs pin expecting exit 2, an error naming `needle`, and no change.
fn rejected(guests: &[&Guest], args: &[&str], needle: &str) {
    let before: Vec<_> = guests.iter().map(|g| g.affinities()).collect();
    let r = pin(args);
    assert_eq!(
        r.code(),
        Some(2),
        "pin {args:?} should fail with exit 2; stdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stderr.contains(needle),
        "pin {args:?}: stderr should name {needle:?}:\n{}",
        r.stderr
    );
    let after: Vec<_> = guests.iter().map(|g| g.affinities()).collect();
    assert_eq!(before, after, "pin {args:?} changed affinities");
}

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    require!(missing_kvm());
    let g1 = start("g1");
    wait_for_no_other_guests(&[&g1]);
    rejected(
        &[&g1],
        &["--guard", "1", "--vm", "nope=1"],
        "no running guest is named \"nope\" (running guests: g1)",
    );
    rejected(
        &[&g1],
        &["--guard", "1", "--vm", "g1=7"],
        "--vm g1=7: CPU 7 is not online",
    );
    rejected(
        &[&g1],
        &["--guard", "1", "--qmp", "/nonexistent.sock"],
        "--qmp /nonexistent.sock: cannot connect: No such file or directory",
    );
    rejected(&[&g1], &["--guard", "7"], "--guard");

    let g2 = start("g2");
    wait_for_no_other_guests(&[&g1, &g2]);
    rejected(
        &[&g1, &g2],
        &["--guard", "1", "--vm", "g1=1", "--vm", "g2=1"],
        "--vm g1=1 and --vm g2=1 both claim CPU 1",
    );
}

#[test]
fn two_guests_on_one_cpu_need_allow_shared() {
    require!(missing_kvm());
    let g1 = start("share-a");
    let g2 = start("share-b");
    wait_for_no_other_guests(&[&g1, &g2]);
    rejected(&[&g1, &g2], &["--guard", "1"], "--allow-shared");

    let r = pin(&["--guard", "1", "--allow-shared", "--json"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    assert_eq!(r.json()["shared_cpus"], "1");
    for g in [&g1, &g2] {
        let vcpu = g.vcpu_tids()[0];
        assert_eq!(cpus_allowed(g.pid(), vcpu), "1", "{}", g.name());
    }
}

#[test]
fn exited_guest_is_not_pinned() {
    require!(missing_kvm());
    let g1 = start("alive");
    let mut g2 = start("killed");
    g2.kill();
    assert!(!g2.is_running());
    wait_for_no_other_guests(&[&g1]);
    // One guarded CPU is enough: the killed guest is gone.
    let r = pin(&["--guard", "1", "--json"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    let v = r.json();
    let names: Vec<&str> = v["guests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(names, vec!["alive"]);
}

/// A guest without QMP and without thread names: found by the kernel's own
/// account while its vCPU runs (KVM's debugfs names the vCPU's thread; a
/// halted vCPU also shows `ioctl(KVM_RUN)` on its vCPU fd);
/// while it is paused nothing tells its threads apart, so `pin` names it and
/// exits 1, and `audit` calls its threads an unidentified guest's.
#[test]
fn a_guest_without_qmp_or_names_is_found_in_kvm_run_or_named_as_unidentified() {
    require!(missing_kvm());
    let anonymous = |name: &str, paused: bool| GuestOptions {
        debug_threads: false,
        qmp: false,
        paused,
        ..GuestOptions::new(name)
    };
    {
        let g = Guest::start(anonymous("pin-kvmrun", false));
        wait_for_no_other_guests(&[&g]);
        let r = pin(&["--guard", "1", "--json"]);
        assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
        let v = r.json();
        assert_eq!(v["guests"][0]["source"], "kvm", "{v:#}");
        let vcpu = v["guests"][0]["vcpus"][0]["tid"].as_u64().unwrap() as u32;
        assert_eq!(cpus_allowed(g.pid(), vcpu), "1");
        assert_eq!(
            testkit::host::comm(g.pid(), vcpu).as_deref(),
            Some("qemu-system-x86"),
            "the vCPU thread has no name of its own"
        );
    }
    let g = Guest::start(anonymous("pin-hidden", true));
    wait_for_no_other_guests(&[&g]);
    let r = pin(&["--guard", "1"]);
    r.expect_code(1);
    assert!(
        r.stdout.contains("NOT PINNED: guest pin-hidden"),
        "{}",
        r.stdout
    );
    // Confined to the guarded CPU, so audit lists every one of them there.
    for tid in testkit::host::tids(g.pid()) {
        testkit::threads::set_affinity(tid, &[1]);
    }
    let r = run_subcommand("audit", &["--guard", "1", "--json"], RUN_TIMEOUT);
    let v = r.json();
    let rows: Vec<&Value> = v["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["threads"].as_array().unwrap())
        .filter(|t| t["pid"] == g.pid())
        .collect();
    assert!(
        !rows.is_empty(),
        "the guest's threads are not listed: {v:#}"
    );
    for t in rows {
        assert_eq!(t["class"], "unidentified_guest", "{t}");
    }
}

/// Puts a sysctl back on drop.
struct Sysctl {
    path: &'static str,
    was: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Self {
        let was = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        Self { path, was }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.was.trim());
    }
}

/// `--vcpu-sched fifo:1` (libvirt's `<vcpusched>`): the vCPU runs SCHED_FIFO
/// 1, `audit` shows each thread's class and priority as `ps` does, and
/// `check` warns that with RT throttling off the real-time vCPU can starve
/// the per-CPU kernel threads of its CPU.
#[test]
fn real_time_vcpus_are_set_shown_and_checked() {
    require!(missing_kvm());
    let g = start("pin-rt");
    wait_for_no_other_guests(&[&g]);
    let vcpu = g.vcpu_tids()[0];
    let r = pin(&["--guard", "1", "--vcpu-sched", "fifo:1"]);
    assert_eq!(r.code(), Some(0), "stderr:\n{}", r.stderr);
    assert!(
        r.stdout.contains("scheduling policy fifo:1"),
        "{}",
        r.stdout
    );
    let stat = std::fs::read_to_string(format!("/proc/{}/task/{vcpu}/stat", g.pid())).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // Fields 40 (rt_priority) and 41 (policy), counted from 3 after the comm.
    assert_eq!((fields[37], fields[38]), ("1", "1"), "{stat}");

    let r = run_subcommand("audit", &["--guard", "1", "--json"], RUN_TIMEOUT);
    let v = r.json();
    let row = v["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["threads"].as_array().unwrap())
        .find(|t| t["tid"] == vcpu)
        .unwrap_or_else(|| panic!("vCPU {vcpu} not listed: {v:#}"));
    assert_eq!(row["sched"]["class"], "FF", "{row}");
    assert_eq!(row["sched"]["rtprio"], 1, "{row}");

    let _throttling = Sysctl::set("/proc/sys/kernel/sched_rt_runtime_us", "-1");
    let r = run_subcommand("check", &["--guard", "1", "--json"], RUN_TIMEOUT);
    let v = r.json();
    let item = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "sched_rt_runtime")
        .unwrap_or_else(|| panic!("no sched_rt_runtime item: {v:#}"));
    assert_eq!(item["status"], "warn", "{item}");
    let detail = item.to_string();
    assert!(
        detail.contains(&format!("tid {vcpu}")) && detail.contains("starves"),
        "{detail}"
    );
    // Bad input is refused before anything changes.
    let r = pin(&["--guard", "1", "--vcpu-sched", "fifo:100"]);
    assert_eq!(r.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("--vcpu-sched"), "{}", r.stderr);
}
