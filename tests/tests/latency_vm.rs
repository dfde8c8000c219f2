//! `pinguard latency --vm NAME`: cyclictest inside the lab guest (both
//! kernels, both policies), its vCPU thread on guarded CPU 1, while a host
//! thread bursts on CPU 1: the samples come from the guest's kernel, and
//! the guest's worst wake-ups are blamed on that host thread.
//!
//! KVM first, TCG where KVM cannot boot a Linux kernel (this lab's nested
//! kvm-pvm): under TCG the vCPU thread is `CPU 0/TCG`-like, runs guest code
//! in user space, and is watched the same way.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use testkit::{
    env::{missing_bpf, missing_kvm_guests},
    guest::qmp_query,
    lab::{Vm, boot, images, lab_dir},
    process::Process,
    require,
    threads::{become_fifo, become_normal, pin_current_thread, set_affinity, spin},
};

/// Probe load, clock alignment, `--secaligned`'s wait, the run, and a TCG
/// guest's slow agent, with a wide margin.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn missing() -> Option<String> {
    missing_bpf().or_else(missing_kvm_guests)
}

/// A host thread on CPU 1 at SCHED_FIFO 90 that spins 50 ms every 300 ms
/// until dropped: the vCPU thread (SCHED_OTHER) cannot run meanwhile. 50 ms
/// stands well above what a busy host's own threads do to a TCG guest on an
/// unisolated CPU (a compiler there made 43 ms once, with 30 ms bursts).
struct Intruder {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    tid: u32,
}

impl Intruder {
    fn start(name: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                pin_current_thread(1).expect("binding the intruder to CPU 1");
                tx.send(testkit::threads::gettid()).unwrap();
                become_fifo(90);
                while !flag.load(Ordering::Relaxed) {
                    spin(Duration::from_millis(50));
                    std::thread::sleep(Duration::from_millis(300));
                }
                become_normal();
            })
            .expect("spawning the intruder");
        let tid = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the intruder started");
        Self {
            stop,
            handle: Some(handle),
            tid,
        }
    }
}

impl Drop for Intruder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The guest's vCPU 0 thread (QMP `query-cpus-fast`).
fn vcpu0_tid(vm: &Vm) -> u32 {
    let cpus = qmp_query(vm.qmp_path(), "query-cpus-fast").expect("query-cpus-fast");
    cpus.as_array()
        .and_then(|a| a.iter().find(|c| c["cpu-index"] == 0))
        .and_then(|c| c["thread-id"].as_u64())
        .unwrap_or_else(|| panic!("no vCPU 0 in {cpus}")) as u32
}

fn run_latency(name: &str, policy: &str, priority: &str) -> (Value, u32) {
    let mut pg = Process::pinguard(&[
        "latency",
        "--guard",
        "1",
        "--vm",
        name,
        "--json",
        "--duration",
        "4s",
        "--policy",
        policy,
        "--priority",
        priority,
        "--worst",
        "3",
    ]);
    pg.wait_stderr("measuring inside guest", RUN_TIMEOUT);
    // Bursts from before cyclictest's first aligned wake-up to its end.
    let intruder = Intruder::start("pg-vm-spiker");
    let tid = intruder.tid;
    let out = pg.finish(RUN_TIMEOUT);
    drop(intruder);
    assert!(
        out.status.success(),
        "pinguard latency --vm {name} failed: {:?}\nstderr:\n{}",
        out.status,
        out.stderr.join("\n")
    );
    let stdout = out.stdout.join("\n");
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{stdout}"));
    (report, tid)
}

#[test]
fn guest_samples_come_from_the_guest_and_a_host_intruder_is_their_cause() {
    require!(missing());
    let Some(dir) = images() else {
        require!(Some(format!(
            "no lab guest in {} (run `cargo xtask lab-guest`)",
            lab_dir().display()
        )));
        return;
    };
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let host_release = host_release.trim();
    for flavour in ["gp", "rt"] {
        let name = format!("latvm-{flavour}");
        let (vm, agent, accel) = boot(&dir.join(flavour), &name, 1);
        // pinguard talks to the agent itself: QEMU serves one client.
        drop(agent);
        // vCPU 0 on guarded CPU 1, QEMU's other threads on CPU 0.
        let vcpu = vcpu0_tid(&vm);
        for t in std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap() {
            let tid: u32 = t.unwrap().file_name().to_string_lossy().parse().unwrap();
            set_affinity(tid, if tid == vcpu { &[1] } else { &[0] });
        }
        for (policy, priority) in [("other", "0"), ("fifo", "80")] {
            let t0 = Instant::now();
            let (r, spiker) = run_latency(&name, policy, priority);
            let g = &r["guest"];
            let ctx = format!("{flavour} ({accel}) --policy {policy}");
            // Inside the guest: its kernel, not the host's.
            assert_eq!(g["vm"], name.as_str(), "{ctx}");
            assert_eq!(g["accelerator"], accel, "{ctx}");
            assert_eq!(g["vcpu_tid"], vcpu, "{ctx}");
            assert_eq!(
                g["pinned_for_run"], false,
                "{ctx}: it was pinned to CPU 1 already"
            );
            let release = g["kernel_release"].as_str().unwrap();
            assert!(
                !release.is_empty() && release != host_release,
                "{ctx}: guest kernel {release:?} vs host {host_release:?}"
            );
            assert_eq!(
                g["preemption"]["model"] == "PREEMPT_RT",
                flavour == "rt",
                "{ctx}: {}",
                g["preemption"]
            );
            assert_eq!(r["run"]["policy"], policy, "{ctx}");
            assert_eq!(r["run"]["cpu"], 1, "{ctx}");
            let class = r["run"]["thread_sched"].as_str().unwrap_or("");
            let want = match policy {
                "other" => "TS 0".to_string(),
                "rr" => format!("RR {priority}"),
                _ => format!("FF {priority}"),
            };
            assert_eq!(
                class, want,
                "{ctx}: the guest thread's class as its /proc showed it"
            );
            let err = g["clock"]["error_ns"].as_u64().unwrap();
            assert!(
                err > 0 && err < 50_000_000,
                "{ctx}: clock error bound {err} ns"
            );
            // 50 ms bursts of a SCHED_FIFO host thread: the guest's worst
            // wake-ups, and the host's view of them.
            let worst = g["worst"].as_array().unwrap();
            assert_eq!(worst.len(), 3, "{ctx}: {worst:?}");
            assert!(
                worst[0]["latency_us"].as_u64().unwrap() >= 10_000,
                "{ctx}: a 50 ms burst should show in the guest's max: {}",
                r["latency"]
            );
            let blamed = worst
                .iter()
                .filter(|w| {
                    w["cause"]["kind"] == "preempted"
                        && w["cause"]["comm"] == "pg-vm-spiker"
                        && w["cause"]["tid"] == spiker
                })
                .count();
            assert!(
                blamed >= 2,
                "{ctx}: the host intruder (tid {spiker}) should be the cause of most of the \
                 guest's 3 worst wake-ups: {}",
                serde_json::to_string_pretty(worst).unwrap()
            );
            eprintln!(
                "latency_vm: {ctx}: {} {}, max {} µs, worst blamed on the intruder {blamed}/3, \
                 clock ±{} µs, {:.1} s",
                release,
                g["preemption"]["model"],
                r["latency"]["max_us"],
                err / 1000,
                t0.elapsed().as_secs_f64()
            );
            for w in worst {
                eprintln!(
                    "  cycle {} {} µs: {}",
                    w["cycle"], w["latency_us"], w["explanation"]
                );
            }
        }
        drop(vm);
    }
}

#[test]
fn a_guest_without_an_agent_is_named_with_the_fix() {
    require!(missing());
    let Some(dir) = images() else {
        require!(Some(format!("no lab guest in {}", lab_dir().display())));
        return;
    };
    // Not a running guest at all.
    let out =
        Process::pinguard(&["latency", "--guard", "1", "--vm", "latvm-nobody"]).finish(RUN_TIMEOUT);
    assert!(!out.status.success());
    let err = out.stderr.join("\n");
    assert!(
        err.contains("no running QEMU guest is named \"latvm-nobody\""),
        "{err}"
    );
    // A guest whose command line has no agent port (paused: nothing to boot).
    let _ = dir;
    let qemu = Process::try_spawn(std::process::Command::new("qemu-system-x86_64").args([
        "-name",
        "latvm-noagent,debug-threads=on",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-S",
        "-display",
        "none",
        "-nodefaults",
    ]))
    .expect("starting qemu-system-x86_64");
    let end = Instant::now() + Duration::from_secs(20);
    let err = loop {
        let out = Process::pinguard(&["latency", "--guard", "1", "--vm", "latvm-noagent"])
            .finish(RUN_TIMEOUT);
        let err = out.stderr.join("\n");
        // Until QEMU has started its vCPU thread, the guest is not ready.
        let starting =
            err.contains("no running QEMU guest") || err.contains("cannot tell its vCPU threads");
        if !starting || Instant::now() > end {
            assert!(!out.status.success(), "{err}");
            break err;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(qemu.stop(Duration::from_secs(5)));
    assert!(
        err.contains("cannot be measured inside") && err.contains("name=org.qemu.guest_agent.0"),
        "{err}"
    );
}
