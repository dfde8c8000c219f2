//! `pinguard isolate` on the real host: the cgroup v1 cpuset shield and the
//! thread-affinity fallback keep a thread started afterwards off the guarded
//! CPU, a second run changes nothing, `--dry-run` changes nothing, and
//! `--undo` restores a full snapshot (every IRQ's affinity, the default IRQ
//! affinity, workqueue masks, sysctls, every task's cpuset and every thread's
//! affinity). Each test holds an [`Isolation`] guard that undoes and compares
//! even when the test fails half-way. Run them one at a time
//! (`--test-threads=1`): they change the whole host.
use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::{Command, Output},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use testkit::{
    cpus,
    daemon::{Daemon, DaemonOptions},
    env::{missing_kvm_guests, pinguard_bin},
    guest::{Guest, GuestOptions},
    require,
    threads::{gettid, schedstat_run_ns},
    wait::poll,
};

const STATE_FILE: &str = "/run/pinguard/isolation.json";
const V1_CPUSET: &str = "/sys/fs/cgroup/cpuset";

/// The tests change the whole host: one at a time even without --test-threads=1.
static HOST: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    HOST.lock().unwrap_or_else(|e| e.into_inner())
}

fn pinguard(args: &[&str]) -> Output {
    let bin = pinguard_bin();
    Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs pinguard expecting exit 0 and JSON on stdout.
fn pinguard_json(args: &[&str]) -> Value {
    let out = pinguard(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "pinguard {args:?}: expected exit 0\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pinguard {args:?}: stdout is not JSON ({e}): {}",
            text(&out.stdout)
        )
    })
}

/// The guarded CPU: the last online one, CPU 0 and the rest housekeeping.
fn guard_cpu() -> usize {
    *cpus::online().1.last().unwrap()
}

fn missing_root_and_cpus() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if cpus::online().1.len() < 2 {
        return Some("needs 2 online CPUs (one guarded, one housekeeping)".into());
    }
    if Path::new(STATE_FILE).exists() {
        panic!("{STATE_FILE} exists: an isolation is active; run `pinguard isolate --undo` first");
    }
    None
}

fn missing_v1_cpuset() -> Option<String> {
    missing_root_and_cpus().or_else(|| {
        (!Path::new(V1_CPUSET).join("tasks").exists())
            .then(|| format!("no cgroup v1 cpuset hierarchy at {V1_CPUSET}"))
    })
}

fn read(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Everything `isolate` may change, keyed by what it is. Masks are
/// normalised to CPU lists; threads are keyed by tid and start time, so a
/// reused tid is a different key.
fn snapshot() -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let mask = |t: &str| {
        format!(
            "{:?}",
            cpus::parse_mask(t).unwrap_or_else(|e| panic!("{e}"))
        )
    };
    for e in fs::read_dir("/proc/irq").unwrap().flatten() {
        if let Some(a) = read(&e.path().join("smp_affinity")) {
            s.insert(format!("irq {:?} smp_affinity", e.file_name()), mask(&a));
        }
    }
    s.insert(
        "default_smp_affinity".into(),
        mask(&read(Path::new("/proc/irq/default_smp_affinity")).unwrap()),
    );
    let wq = Path::new("/sys/devices/virtual/workqueue");
    if let Some(m) = read(&wq.join("cpumask")) {
        s.insert("workqueue cpumask".into(), mask(&m));
    }
    for e in fs::read_dir(wq).unwrap().flatten() {
        if let Some(m) = read(&e.path().join("cpumask")) {
            s.insert(format!("workqueue {:?} cpumask", e.file_name()), mask(&m));
        }
    }
    for sysctl in ["kernel/timer_migration", "vm/stat_interval"] {
        if let Some(v) = read(&Path::new("/proc/sys").join(sysctl)) {
            s.insert(format!("sysctl {sysctl}"), v);
        }
    }
    if let Some(lb) = read(&Path::new(V1_CPUSET).join("cpuset.sched_load_balance")) {
        s.insert("cpuset root sched_load_balance".into(), lb);
        let mut children: Vec<String> = fs::read_dir(V1_CPUSET)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        children.sort();
        s.insert("cpuset root children".into(), children.join(","));
    }
    for p in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(tasks) = fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let (Some(stat), Some(status), Some(cgroup)) = (
                read(&t.path().join("stat")),
                read(&t.path().join("status")),
                read(&t.path().join("cgroup")),
            ) else {
                continue;
            };
            // Fields after the command name (which may hold spaces): state is 3, starttime 22.
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let start = after.split_whitespace().nth(19).unwrap();
            let key = format!("thread {:?}@{start}", t.file_name());
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("?")
                .trim()
                .to_string();
            let cpuset = cgroup
                .lines()
                .find(|l| {
                    l.split(':')
                        .nth(1)
                        .is_some_and(|c| c.split(',').any(|c| c == "cpuset"))
                })
                .map(|l| l.splitn(3, ':').nth(2).unwrap_or("").to_string())
                .unwrap_or_default();
            s.insert(key, format!("affinity {allowed} cpuset {cpuset}"));
        }
    }
    s
}

/// Differences between two snapshots; threads only when in both.
fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            Some(w) if w != v => d.push(format!("{k}: was {v}, now {w}")),
            None if !k.starts_with("thread ") => d.push(format!("{k}: was {v}, now gone")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) && !k.starts_with("thread ") {
            d.push(format!("{k}: new ({})", b[k]));
        }
    }
    d
}

/// Undoes the isolation and compares with the snapshot taken before it,
/// also when the test panicked half-way (then it reports, not panics).
struct Isolation {
    before: BTreeMap<String, String>,
    checked: bool,
}

impl Isolation {
    fn new() -> Self {
        Self {
            before: snapshot(),
            checked: false,
        }
    }

    /// Runs `--undo`, returns its report and what differs from the snapshot.
    fn undo(&mut self) -> (Option<Value>, Vec<String>) {
        self.checked = true;
        let report = Path::new(STATE_FILE).exists().then(|| {
            let out = pinguard(&["isolate", "--undo", "--json"]);
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| {
                serde_json::json!({"error": format!("{e}: {} {}", text(&out.stdout), text(&out.stderr))})
            })
        });
        (report, differences(&self.before, &snapshot()))
    }

    /// Undo restored every value and the host is as it was.
    fn undo_and_compare(mut self) {
        let (report, diff) = self.undo();
        let report = report.expect("an isolation to undo");
        assert_eq!(
            report["report"]["errors"],
            serde_json::json!([]),
            "undo could not restore everything: {report:#}"
        );
        assert!(
            report["report"]["restored"].as_u64().unwrap() > 0,
            "{report:#}"
        );
        assert!(
            !Path::new(STATE_FILE).exists(),
            "undo must remove {STATE_FILE}"
        );
        assert!(
            diff.is_empty(),
            "after --undo the host differs from before isolate:\n{}",
            diff.join("\n")
        );
    }

    /// Something else undid the isolation (a daemon at exit): no state file
    /// is left, and the host is as it was.
    fn compare_undone(mut self) {
        let (report, diff) = self.undo();
        assert!(
            report.is_none(),
            "{STATE_FILE} was left behind; `pinguard isolate --undo` said: {report:#?}"
        );
        assert!(
            diff.is_empty(),
            "after the undo the host differs from before the isolation:\n{}",
            diff.join("\n")
        );
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        if self.checked {
            return;
        }
        let (report, diff) = self.undo();
        let msg = format!("undo after a failure: {report:?}; differences: {diff:#?}");
        if std::thread::panicking() {
            eprintln!("{msg}");
        } else if report.is_some() || !diff.is_empty() {
            panic!("{msg}");
        }
    }
}

/// The CPU a thread last ran on (`stat` field 39).
fn last_cpu(tid: u32) -> Option<usize> {
    let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(36)?
        .parse()
        .ok()
}

/// A busy thread started now must get CPU time without running on `guarded`:
/// awaits 100 ms of its run time, sampling where it runs.
fn busy_thread_stays_off(guarded: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        let mut x = 0u64;
        while !flag.load(Ordering::Relaxed) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    });
    let tid = rx.recv().unwrap();
    let allowed =
        cpus::parse_list(&testkit::threads::cpus_allowed(std::process::id(), tid)).unwrap();
    let mut seen: Vec<usize> = Vec::new();
    let ran = poll(
        "the busy thread to run 100 ms",
        Duration::from_secs(10),
        Duration::from_millis(5),
        || {
            if let Some(c) = last_cpu(tid) {
                seen.push(c);
            }
            (schedstat_run_ns(tid) >= 100_000_000).then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    ran.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !allowed.contains(&guarded),
        "a thread started after isolate may run on guarded CPU {guarded}: affinity {allowed:?}"
    );
    assert!(
        !seen.contains(&guarded),
        "a thread started after isolate ran on guarded CPU {guarded} (CPUs seen: {seen:?})"
    );
}

/// Results with status "applied".
fn applied(v: &Value) -> Vec<&Value> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "applied")
        .collect()
}

/// Every IRQ reaching the guarded CPU is one the kernel refused to move.
fn irqs_off(guarded: usize, result: &Value) {
    let refused: Vec<String> = result["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["what"] == "irq" && r["status"] == "refused")
        .map(|r| r["action"]["path"].as_str().unwrap().to_string())
        .collect();
    let managed: Vec<&Value> = result["unchanged"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["what"] == "irq")
        .collect();
    for e in fs::read_dir("/proc/irq").unwrap().flatten() {
        let path = e.path().join("smp_affinity");
        let Some(m) = read(&path) else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "0" || name == "2" {
            continue;
        }
        if cpus::parse_mask(&m).unwrap().contains(&guarded) {
            let listed = refused.contains(&path.display().to_string())
                || managed.iter().any(|u| {
                    u["target"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("IRQ {name} "))
                });
            assert!(
                listed,
                "IRQ {name} still reaches CPU {guarded} (mask {m}) and is not listed as refused or kernel-managed: {result:#}"
            );
        }
    }
    let wq = read(Path::new("/sys/devices/virtual/workqueue/cpumask")).unwrap();
    assert!(
        !cpus::parse_mask(&wq).unwrap().contains(&guarded),
        "workqueue cpumask {wq}"
    );
    let d = read(Path::new("/proc/irq/default_smp_affinity")).unwrap();
    assert!(
        !cpus::parse_mask(&d).unwrap().contains(&guarded),
        "default_smp_affinity {d}"
    );
}

fn my_cpuset() -> String {
    let cg = fs::read_to_string("/proc/thread-self/cgroup").unwrap();
    cg.lines()
        .find(|l| l.split(':').nth(1) == Some("cpuset"))
        .map(|l| l.splitn(3, ':').nth(2).unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn v1_shield_isolates_is_idempotent_and_undo_restores_a_full_snapshot() {
    let _host = exclusive();
    require!(missing_v1_cpuset());
    let g = guard_cpu();
    let gs = g.to_string();
    let iso = Isolation::new();
    let first = pinguard_json(&["isolate", "--guard", &gs, "--mechanism", "shield", "--json"]);
    assert_eq!(first["mechanism"], "shield", "{first:#}");
    assert!(!applied(&first).is_empty(), "{first:#}");
    assert!(Path::new(STATE_FILE).exists());
    irqs_off(g, &first);
    assert_eq!(
        read(Path::new("/proc/sys/kernel/timer_migration")).as_deref(),
        Some("0")
    );
    // This test's own process was in the root cpuset: it is on the housekeeping side now.
    assert_eq!(my_cpuset(), "/pinguard-housekeeping");
    assert_eq!(
        read(&Path::new(V1_CPUSET).join("pinguard-guarded/cpuset.cpus")).as_deref(),
        Some(gs.as_str())
    );
    busy_thread_stays_off(g);

    // A second run changes nothing (a task that appeared since may be moved).
    let first_tids: Vec<&Value> = first["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["action"].get("thread"))
        .collect();
    let second = pinguard_json(&["isolate", "--guard", &gs, "--json"]);
    for r in applied(&second) {
        assert!(
            r["action"]["kind"] == "move_task" && !first_tids.contains(&&r["action"]["thread"]),
            "the second run changed something the first had done: {r:#}"
        );
    }

    // Another CPU set while this one is active: refused, nothing changed.
    let other = pinguard(&["isolate", "--guard", "0"]);
    assert_eq!(other.status.code(), Some(2), "{}", text(&other.stdout));
    let err = text(&other.stderr);
    assert!(
        err.contains("already active") && err.contains("--undo"),
        "{err}"
    );

    iso.undo_and_compare();
}

#[test]
fn affinity_fallback_isolates_and_undo_restores_a_full_snapshot() {
    let _host = exclusive();
    require!(missing_root_and_cpus());
    let g = guard_cpu();
    let gs = g.to_string();
    let iso = Isolation::new();
    let res = pinguard_json(&[
        "isolate",
        "--guard",
        &gs,
        "--mechanism",
        "affinity",
        "--json",
    ]);
    assert_eq!(res["mechanism"], "affinity", "{res:#}");
    assert!(
        applied(&res).iter().any(|r| r["what"] == "thread"),
        "no thread affinity changed: {res:#}"
    );
    irqs_off(g, &res);
    let mine = testkit::threads::affinity(gettid()).unwrap();
    assert!(
        !mine.contains(&g),
        "this test's thread may still run on CPU {g}: {mine:?}"
    );
    busy_thread_stays_off(g);
    iso.undo_and_compare();
}

#[test]
fn dry_run_changes_nothing() {
    let _host = exclusive();
    require!(missing_root_and_cpus());
    let gs = guard_cpu().to_string();
    let before = snapshot();
    let v = pinguard_json(&["isolate", "--guard", &gs, "--dry-run", "--json"]);
    assert_eq!(v["dry_run"], true);
    assert!(
        !v["plan"]["changes"].as_array().unwrap().is_empty(),
        "a host without isolation has something to change: {v:#}"
    );
    for c in v["plan"]["changes"].as_array().unwrap() {
        assert!(
            !c["why"].as_str().unwrap().is_empty(),
            "every change says why: {c:#}"
        );
    }
    let human = pinguard(&["isolate", "--guard", &gs, "--dry-run"]);
    assert!(
        text(&human.stdout).contains("nothing was changed"),
        "{}",
        text(&human.stdout)
    );
    assert!(
        !Path::new(STATE_FILE).exists(),
        "a dry run wrote {STATE_FILE}"
    );
    let diff = differences(&before, &snapshot());
    assert!(
        diff.is_empty(),
        "--dry-run changed the host:\n{}",
        diff.join("\n")
    );
}

#[test]
fn bad_guards_are_refused_before_anything_changes() {
    let _host = exclusive();
    let online = cpus::online().0;
    let before = snapshot();
    let n = cpus::online().1.len();
    let cases = [
        (online.clone(), "housekeeping"),
        ("4095".to_string(), "not online"),
        ("1-".to_string(), "--guard"),
    ];
    for (guard, needle) in cases {
        let out = pinguard(&["isolate", "--guard", &guard]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "--guard {guard} ({n} CPUs online): {}",
            text(&out.stdout)
        );
        let err = text(&out.stderr);
        assert!(
            err.contains(needle),
            "--guard {guard}: expected {needle:?} in {err}"
        );
    }
    let out = pinguard(&["isolate", "--undo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no isolation to undo"),
        "{}",
        text(&out.stderr)
    );
    assert!(!Path::new(STATE_FILE).exists());
    let diff = differences(&before, &snapshot());
    assert!(
        diff.is_empty(),
        "a refused isolate changed the host:\n{}",
        diff.join("\n")
    );
}

/// A guest started after isolate inherits the housekeeping cpuset; a second
/// run moves its vCPU to the guarded cpuset, and `pinguard pin` places it.
#[test]
fn guest_started_after_isolate_can_be_pinned() {
    let _host = exclusive();
    require!(missing_v1_cpuset().or_else(missing_kvm_guests));
    let g = guard_cpu();
    let gs = g.to_string();
    let iso = Isolation::new();
    pinguard_json(&["isolate", "--guard", &gs, "--mechanism", "shield", "--json"]);
    {
        let guest = Guest::start(GuestOptions::new("iso-g1"));
        let vcpu = guest.vcpu_tids()[0];
        let again = pinguard_json(&["isolate", "--guard", &gs, "--json"]);
        let moved: Vec<&Value> = applied(&again)
            .into_iter()
            .filter(|r| r["action"]["thread"]["tid"] == vcpu)
            .collect();
        assert_eq!(moved.len(), 1, "the vCPU was not moved: {again:#}");
        assert_eq!(moved[0]["action"]["to"], "/pinguard-guarded", "{again:#}");
        let out = pinguard(&["pin", "--guard", &gs]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "pin after isolate: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let pid = guest.pid();
        assert_eq!(
            testkit::threads::cpus_allowed(pid, vcpu),
            gs,
            "vCPU {vcpu} is not pinned to CPU {g}"
        );
        for tid in guest.emulator_tids() {
            let a = cpus::parse_list(&testkit::threads::cpus_allowed(pid, tid)).unwrap();
            assert!(
                !a.contains(&g),
                "emulator thread {tid} may run on CPU {g}: {a:?}"
            );
        }
        // The guest is killed here, before the undo.
    }
    iso.undo_and_compare();
}

/// `pinguard run` with `isolation = "runtime"` applies the isolation at
/// start, puts back a sysctl and an IRQ affinity changed behind its back
/// (counting each in `pinguard_isolation_repairs_total`), and with
/// `isolation_undo_on_exit = true` restores the full snapshot when it stops.
#[test]
fn daemon_keeps_the_runtime_isolation_and_undoes_it_at_exit() {
    let _host = exclusive();
    require!(missing_root_and_cpus());
    let g = guard_cpu();
    let gs = g.to_string();
    let timer = Path::new("/proc/sys/kernel/timer_migration");
    // Declared before the daemon: dropped after it, so a failure still
    // stops the daemon first and then undoes whatever is left.
    let iso = Isolation::new();
    let mut opts = DaemonOptions::new(
        "isolation = \"runtime\"\nisolation_undo_on_exit = true\nisolation_interval = \"200ms\"\n",
    );
    opts.guard = g;
    let mut daemon = Daemon::start_with(&opts);
    let active = daemon.wait_metric(
        "the runtime isolation",
        "pinguard_isolation_active",
        &[("cpu", &gs)],
        |v| v == 1.0,
    );
    assert_eq!(active, 1.0);
    assert!(Path::new(STATE_FILE).exists(), "no {STATE_FILE}");
    assert_eq!(read(timer).as_deref(), Some("0"));

    let repairs = |d: &Daemon, what: &str| {
        d.metric("pinguard_isolation_repairs_total", &[("what", what)])
            .unwrap_or_else(|| panic!("no pinguard_isolation_repairs_total{{what={what:?}}}"))
    };
    // A sysctl set back behind the daemon's back.
    let before = repairs(&daemon, "sysctl");
    fs::write(timer, "1").unwrap();
    daemon.wait_metric(
        "the sysctl repair to be counted",
        "pinguard_isolation_repairs_total",
        &[("what", "sysctl")],
        |v| v > before,
    );
    assert_eq!(
        read(timer).as_deref(),
        Some("0"),
        "kernel.timer_migration not put back"
    );

    // A movable IRQ given its old affinity (which includes the guarded CPU) back.
    let state: Value = serde_json::from_str(&fs::read_to_string(STATE_FILE).unwrap()).unwrap();
    let irq = state["changes"].as_array().unwrap().iter().find(|c| {
        c["what"] == "irq"
            && c["action"]["kind"] == "write"
            && c["action"]["before"]
                .as_str()
                .is_some_and(|b| cpus::parse_mask(b).unwrap().contains(&g))
    });
    let irq = irq.unwrap_or_else(|| panic!("the isolation moved no IRQ off CPU {g}: {state:#}"));
    let path = Path::new(irq["action"]["path"].as_str().unwrap());
    let before = repairs(&daemon, "irq");
    fs::write(path, irq["action"]["before"].as_str().unwrap()).unwrap();
    daemon.wait_metric(
        "the IRQ repair to be counted",
        "pinguard_isolation_repairs_total",
        &[("what", "irq")],
        |v| v > before,
    );
    let now = read(path).unwrap();
    assert!(
        !cpus::parse_mask(&now).unwrap().contains(&g),
        "{} is {now} after the repair: still reaches CPU {g}",
        path.display()
    );

    // On cgroup v1, a task that escaped the shield (written back to the root cpuset).
    if state["mechanism"] == "shield" {
        struct Child(std::process::Child);
        impl Drop for Child {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Child(Command::new("sleep").arg("600").spawn().unwrap());
        let pid = child.0.id().to_string();
        let cpuset_of = |pid: &str| {
            let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            cg.lines()
                .find(|l| l.split(':').nth(1) == Some("cpuset"))
                .map(|l| l.splitn(3, ':').nth(2).unwrap().to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            cpuset_of(&pid),
            "/pinguard-housekeeping",
            "a child of a shielded task"
        );
        let before = repairs(&daemon, "task");
        fs::write(Path::new(V1_CPUSET).join("tasks"), &pid).unwrap();
        poll(
            "the escaped task back in the shield",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || (cpuset_of(&pid) == "/pinguard-housekeeping").then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}; it is in {}", cpuset_of(&pid)));
        daemon.wait_metric(
            "the task repair to be counted",
            "pinguard_isolation_repairs_total",
            &[("what", "task")],
            |v| v > before,
        );
    }

    let log = daemon.stop().join("\n");
    assert!(log.contains("runtime isolation undone"), "{log}");
    iso.compare_undone();
}
