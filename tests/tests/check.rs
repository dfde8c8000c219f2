//! `pinguard check` against the real host: the JSON report must agree with
//! what /proc and /sys say, and bad --guard values must exit 2 with a message
//! naming the online CPUs. Needs nothing beyond reading /proc and /sys (as
//! non-root, irqbalance's environment is unreadable and the check says so).
use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use serde_json::Value;
use testkit::{
    cpus::{self, Cpus},
    env::pinguard_bin,
    require,
    wait::wait_for,
    which,
};

/// A CPU list the kernel or pinguard wrote ("0-3,8").
fn cpu_list(s: &str) -> Cpus {
    cpus::parse_list(s).unwrap_or_else(|e| panic!("{e}"))
}

fn pinguard_check(args: &[&str]) -> Output {
    let bin = pinguard_bin();
    Command::new(&bin)
        .arg("check")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

/// Tests that compare whole reports must not see another test's fake irqbalance.
static HOST_STATE: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    HOST_STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The IRQs that can fire on `cpu`, by the rule `pinguard check` documents:
/// every /proc/irq/N except 0 and 2 with a handler in /proc/interrupts whose
/// smp_affinity_list or effective_affinity_list contains the CPU.
fn irqs_reaching(cpu: usize) -> BTreeSet<u32> {
    let interrupts = fs::read_to_string("/proc/interrupts").unwrap();
    let handled: BTreeSet<u32> = interrupts
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':')?.0.trim().parse().ok())
        .collect();
    let mut out = BTreeSet::new();
    for entry in fs::read_dir("/proc/irq").unwrap() {
        let entry = entry.unwrap();
        let Some(irq) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if irq == 0 || irq == 2 || !handled.contains(&irq) {
            continue;
        }
        let read = |f: &str| fs::read_to_string(entry.path().join(f)).ok();
        let Some(affinity) = read("smp_affinity_list") else {
            continue;
        };
        let effective = read("effective_affinity_list").unwrap_or_default();
        if cpu_list(&affinity).contains(&cpu) || cpu_list(&effective).contains(&cpu) {
            out.insert(irq);
        }
    }
    out
}

fn item<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["items"]
        .as_array()
        .expect("items is an array")
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("no item {id:?} in {report:#}"))
}

#[test]
fn json_report_matches_the_host() {
    let (_, online) = cpus::online();
    require!((online.len() < 2).then(|| "needs at least two online CPUs".to_string()));
    let _exclusive = exclusive();
    // Guard the last online CPU; everything else is housekeeping.
    let cpu = *online.last().unwrap();
    let cpu_arg = cpu.to_string();

    // IRQ affinities can change under us (a pending move completing): retry
    // until the host reads the same before and after the run.
    let mut attempt = 0;
    let (report, code, expected_irqs) = loop {
        attempt += 1;
        let before = irqs_reaching(cpu);
        let out = pinguard_check(&["--guard", &cpu_arg, "--json"]);
        let after = irqs_reaching(cpu);
        let code = out.status.code();
        assert!(
            matches!(code, Some(0 | 1)),
            "pinguard check exited {code:?}\nstdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", text(&out.stdout)));
        if before == after || attempt == 3 {
            assert_eq!(before, after, "IRQ affinities kept changing during 3 runs");
            break (report, code.unwrap(), after);
        }
    };

    assert_eq!(report["guarded"], cpu_arg);
    let housekeeping: Cpus = online.iter().copied().filter(|c| *c != cpu).collect();
    assert_eq!(
        cpu_list(report["housekeeping"].as_str().unwrap()),
        housekeeping
    );

    let ids: Vec<&str> = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "isolcpus",
            "nohz_full",
            "rcu_nocbs",
            "irqaffinity",
            "irqs",
            "workqueue",
            "preemption",
            "sched_rt_runtime",
            "timer_migration",
            "cpufreq",
            "smt",
            "irqbalance",
            "culprit_naming",
        ]
    );
    // Summary counts and exit code agree with the items.
    let count = |s: &str| {
        report["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["status"] == s)
            .count()
    };
    for s in ["pass", "warn", "fail"] {
        assert_eq!(report["summary"][s], count(s), "summary.{s}");
    }
    assert_eq!(code == 1, count("fail") > 0, "exit {code} vs {report:#}");
    for i in report["items"].as_array().unwrap() {
        assert!(
            !i["message"].as_str().unwrap().is_empty(),
            "empty message: {i}"
        );
        let has_fix = i
            .get("fix")
            .is_some_and(|f| !f.as_str().unwrap().is_empty());
        assert_eq!(i["status"] != "pass", has_fix, "fix iff not passing: {i}");
    }

    // IRQs: exactly the ones /proc says can fire on the guarded CPU, with the
    // affinity the kernel reports and a fix command for each movable one.
    let irqs = item(&report, "irqs");
    let findings = irqs
        .get("irqs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let reported: BTreeSet<u32> = findings
        .iter()
        .map(|f| f["irq"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(reported, expected_irqs, "irqs item: {irqs:#}");
    let fix = irqs.get("fix").and_then(Value::as_str).unwrap_or("");
    for f in &findings {
        let n = f["irq"].as_u64().unwrap();
        let on_disk = fs::read_to_string(format!("/proc/irq/{n}/smp_affinity_list")).unwrap();
        assert_eq!(
            cpu_list(f["affinity"].as_str().unwrap()),
            cpu_list(&on_disk),
            "IRQ {n}"
        );
        assert!(!f["action"].as_str().unwrap().is_empty(), "IRQ {n}: {f}");
        let target = cpu_list(f["target"].as_str().unwrap());
        assert!(
            !target.is_empty() && target.is_subset(&housekeeping),
            "IRQ {n}: {f}"
        );
        if f["movable"] == true && f["pending"] == false {
            assert!(
                fix.split(|c: char| !c.is_ascii_digit())
                    .any(|w| w == n.to_string()),
                "no fix for IRQ {n}: {fix}"
            );
        }
    }
    let movable_now = findings
        .iter()
        .any(|f| f["movable"] == true && f["pending"] == false);
    let expected_status = match (findings.is_empty(), movable_now) {
        (true, _) => "pass",
        (false, true) => "fail",
        (false, false) => "warn",
    };
    assert_eq!(irqs["status"], expected_status, "{irqs:#}");

    // Workqueue: fail exactly when the unbound cpumask includes the guarded CPU.
    let wq = fs::read_to_string("/sys/devices/virtual/workqueue/cpumask").unwrap();
    let wq_expected = if cpus::parse_mask(&wq)
        .unwrap_or_else(|e| panic!("{e}"))
        .contains(&cpu)
    {
        "fail"
    } else {
        "pass"
    };
    assert_eq!(item(&report, "workqueue")["status"], wq_expected);

    // Sysctls, read back directly.
    let sysctl = |name: &str| {
        fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .map(|s| s.trim().to_string())
            .ok()
    };
    if let Some(v) = sysctl("timer_migration") {
        let expected = if v == "0" { "pass" } else { "warn" };
        assert_eq!(item(&report, "timer_migration")["status"], expected);
    }
    if let Some(v) = sysctl("sched_rt_runtime_us") {
        let expected = if v == "-1" { "pass" } else { "warn" };
        let rt = item(&report, "sched_rt_runtime");
        assert_eq!(rt["status"], expected);
        assert!(rt["message"].as_str().unwrap().contains(&v), "{rt}");
    }

    // SMT: warn exactly when a sibling of the guarded CPU does housekeeping.
    let siblings = fs::read_to_string(format!(
        "/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
    ))
    .map(|s| cpu_list(&s))
    .unwrap_or_default();
    let smt_expected = if siblings.iter().any(|s| housekeeping.contains(s)) {
        "warn"
    } else {
        "pass"
    };
    assert_eq!(item(&report, "smt")["status"], smt_expected);

    // The human table reports the same verdict.
    let human = pinguard_check(&["--guard", &cpu_arg]);
    assert_eq!(human.status.code(), Some(code));
    let table = text(&human.stdout);
    assert!(table.contains("STATUS  ITEM"), "{table}");
    assert!(table.contains(&format!("Guarded CPUs: {cpu} ")), "{table}");
}

#[test]
fn offline_guard_is_an_error_naming_online_cpus() {
    let (online_text, online) = cpus::online();
    // 7 on the 2-CPU lab machine; on bigger hosts the first CPU past the online ones.
    let offline = if online.contains(&7) {
        online.last().unwrap() + 1
    } else {
        7
    };
    for json in [false, true] {
        let mut args = vec!["--guard".to_string(), offline.to_string()];
        if json {
            args.push("--json".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = pinguard_check(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "no report on error: {}",
            text(&out.stdout)
        );
        assert!(
            stderr.contains(&format!("CPU {offline} is not online")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("online CPUs: {online_text}")),
            "{stderr}"
        );
        // The cause is stated once, not repeated by the error chain.
        assert_eq!(stderr.matches("is not online").count(), 1, "{stderr}");
    }
}

#[test]
fn no_guard_and_nothing_isolated_explains_isolation() {
    let isolated = fs::read_to_string("/sys/devices/system/cpu/isolated").unwrap_or_default();
    if !isolated.trim().is_empty() {
        // Not a missing privilege: on such a host the default guard is valid.
        eprintln!(
            "SKIP: this host isolates CPUs {}, so check without --guard is valid",
            isolated.trim()
        );
        return;
    }
    let out = pinguard_check(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("--guard CPULIST"), "{stderr}");
    assert!(stderr.contains("GRUB_CMDLINE_LINUX"), "{stderr}");
    assert!(
        stderr.contains("grub2-mkconfig -o /boot/grub2/grub.cfg"),
        "{stderr}"
    );
}

#[test]
fn guard_of_every_cpu_is_an_error() {
    let (online_text, _) = cpus::online();
    let out = pinguard_check(&["--guard", &online_text]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("housekeeping"), "{stderr}");
}

/// A process whose comm is "irqbalance" (a copy of `sleep`), so the check
/// finds it in /proc and reads its environment. Killed and removed on drop.
struct FakeIrqbalance {
    child: Child,
    dir: PathBuf,
}

impl FakeIrqbalance {
    fn start(env: &[(&str, &str)]) -> Self {
        let sleep = which("sleep").expect("sleep is not on PATH");
        let dir = std::env::temp_dir().join(format!(
            "pinguard-check-{}-{}",
            std::process::id(),
            env.len()
        ));
        fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("irqbalance");
        fs::copy(&sleep, &exe).unwrap();
        let child = Command::new(&exe)
            .arg("600")
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let fake = Self { child, dir };
        let pid = fake.pid();
        // comm changes from the test's name to "irqbalance" at exec.
        wait_for(
            "the fake irqbalance to exec",
            Duration::from_secs(10),
            || {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .ok()
                    .filter(|c| c.trim() == "irqbalance")
            },
        );
        fake
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FakeIrqbalance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The line of the irqbalance item about one process.
fn irqbalance_note(report: &Value, pid: u32) -> (String, String) {
    let item = item(report, "irqbalance");
    let line = item["message"]
        .as_str()
        .unwrap()
        .lines()
        .find(|l| l.contains(&format!("(pid {pid})")))
        .unwrap_or_else(|| panic!("pid {pid} not reported: {item:#}"))
        .to_string();
    (item["status"].as_str().unwrap().to_string(), line)
}

#[test]
fn running_irqbalance_is_judged_by_its_environment() {
    let (_, online) = cpus::online();
    require!((online.len() < 2).then(|| "needs at least two online CPUs".to_string()));
    let _exclusive = exclusive();
    let cpu = online.last().unwrap().to_string();
    let isolated = fs::read_to_string("/sys/devices/system/cpu/isolated").unwrap_or_default();
    let nohz = fs::read_to_string("/sys/devices/system/cpu/nohz_full").unwrap_or_default();
    let banned_by_default = cpu_list(&isolated)
        .union(&cpu_list(nohz.trim().trim_start_matches("(null)")))
        .any(|c| c.to_string() == cpu);

    {
        let fake = FakeIrqbalance::start(&[("IRQBALANCE_BANNED_CPULIST", &cpu)]);
        let out = pinguard_check(&["--guard", &cpu, "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (_, note) = irqbalance_note(&report, fake.pid());
        assert!(note.contains("keeps IRQs off guarded CPUs"), "{note}");
        assert!(
            note.contains(&format!("IRQBALANCE_BANNED_CPULIST={cpu}")),
            "{note}"
        );
    }

    let fake = FakeIrqbalance::start(&[]);
    let out = pinguard_check(&["--guard", &cpu, "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (status, note) = irqbalance_note(&report, fake.pid());
    if banned_by_default {
        assert!(note.contains("keeps IRQs off"), "{note}");
    } else {
        assert_eq!(status, "fail", "{note}");
        assert_eq!(out.status.code(), Some(1));
        assert!(
            note.contains(&format!("may move IRQs onto guarded CPUs {cpu}")),
            "{note}"
        );
        let fix = item(&report, "irqbalance")["fix"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            fix.contains(&format!("IRQBALANCE_BANNED_CPULIST={cpu}")),
            "{fix}"
        );
    }
}

#[test]
fn culprit_naming_follows_the_daemons_config() {
    let (_, online) = cpus::online();
    let cpu = online.last().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let naming = |config: &str| {
        let path = dir.path().join("pinguard.toml");
        fs::write(&path, config).unwrap();
        let out = pinguard_check(&[
            "--guard",
            &cpu,
            "--json",
            "--config",
            path.to_str().unwrap(),
        ]);
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)));
        item(&report, "culprit_naming").clone()
    };
    // The default: off, and how to turn it on.
    let off = naming("");
    assert_eq!(off["status"], "pass", "{off}");
    let message = off["message"].as_str().unwrap();
    assert!(
        message.starts_with("off") && message.contains("affinity_syscalls = true"),
        "{off}"
    );
    // Opted in, on a kernel with the syscall tracepoints (this lab).
    let on = naming("[observer]\naffinity_syscalls = true\n");
    let tracepoints =
        std::path::Path::new("/sys/kernel/tracing/events/syscalls/sys_enter_sched_setaffinity")
            .is_dir();
    let expected = if tracepoints { "pass" } else { "warn" };
    assert_eq!(on["status"], expected, "{on}");
    if tracepoints {
        assert!(on["message"].as_str().unwrap().starts_with("on"), "{on}");
    }
}
