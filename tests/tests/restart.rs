//! Crash-safe restarts: `pinguard run` pins its programs, links and maps in
//! bpffs (/sys/fs/bpf/pinguard), a killed daemon's observer keeps counting,
//! the next daemon adopts it, SIGTERM detaches, `keep_sensors_on_exit` and
//! `pinguard cleanup`, and an incompatible layout is replaced.
//! CPU 1 is guarded, CPU 0 is housekeeping.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::sys::signal::Signal;
use serde_json::Value;
use testkit::{
    daemon::Daemon,
    env::missing_bpf,
    process::{run_subcommand, succeeds},
    require,
    threads::{Worker, schedstat_run_ns, spin},
    wait::wait_for,
};

const ROOT: &str = "/sys/fs/bpf/pinguard";
const OBSERVE: &str = "mode = \"observe\"\n";
const TIMEOUT: Duration = Duration::from_secs(30);
/// The sched_switch program the daemon attaches (tp_btf, the default hook).
const SWITCH: &str = "switch_tp_btf";

/// Removes whatever pinguard pinned, at the start (a previous run that was
/// killed) and on drop, even when the test fails: an unlinked pin detaches
/// its link once no process holds it.
struct CleanPins;

impl CleanPins {
    fn new() -> Self {
        remove_pins();
        Self
    }
}

impl Drop for CleanPins {
    fn drop(&mut self) {
        remove_pins();
    }
}

fn remove_pins() {
    if Path::new(ROOT).exists()
        && let Err(e) = std::fs::remove_dir_all(ROOT)
    {
        eprintln!("restart test: could not remove {ROOT}: {e}");
    }
}

fn bpftool(args: &[&str]) -> Value {
    let (ok, out) = succeeds(Command::new("bpftool").arg("-j").args(args));
    assert!(ok, "bpftool {args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool {args:?} ({e}): {out}"))
}

/// Ids of the loaded programs named `name`.
fn programs_named(name: &str) -> Vec<u64> {
    bpftool(&["prog", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == name)
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Program ids of the links of programs named `name`: how many times that
/// program is attached, and which instance.
fn attached(name: &str) -> Vec<u64> {
    let ids = programs_named(name);
    bpftool(&["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["prog_id"].as_u64())
        .filter(|id| ids.contains(id))
        .collect()
}

/// The one layout directory the daemon pinned in.
fn layout_dir() -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(ROOT)
        .unwrap_or_else(|e| panic!("{ROOT}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "one layout directory expected: {dirs:?}");
    dirs.into_iter().next().unwrap()
}

/// The id of the pinned program `name`.
fn pinned_program(name: &str) -> u64 {
    let path = layout_dir().join("progs").join(name);
    bpftool(&["prog", "show", "pinned", path.to_str().unwrap()])["id"]
        .as_u64()
        .unwrap()
}

fn intruder_seconds(d: &Daemon) -> f64 {
    d.metric(
        "pinguard_intruder_run_seconds_total",
        &[("cpu", "1"), ("source", "user")],
    )
    .unwrap_or(0.0)
}

/// SIGKILL: nothing of the daemon's own exit path runs.
fn kill(mut d: Daemon) {
    d.process().signal(Signal::SIGKILL);
    // Reaps it and puts back affinities; the exit status is the kill's.
    assert!(
        d.try_stop().is_err(),
        "a SIGKILLed daemon cannot exit cleanly"
    );
}

/// The kernel frees a detached program after an RCU grace period, not at once.
fn wait_until_unloaded(name: &str) {
    wait_for(&format!("program {name} to be unloaded"), TIMEOUT, || {
        programs_named(name).is_empty().then_some(())
    });
}

/// `pinguard_violations_total` summed over kinds on CPU 1.
fn violations(d: &Daemon) -> f64 {
    ["intruder", "migration_in"]
        .iter()
        .filter_map(|k| d.metric("pinguard_violations_total", &[("cpu", "1"), ("kind", k)]))
        .sum()
}

/// The same, as the daemon last saved it for its successor.
fn saved_violations() -> Option<f64> {
    let text = std::fs::read_to_string("/run/pinguard/counters.json").ok()?;
    let saved: Vec<Value> = serde_json::from_str(&text).ok()?;
    Some(
        saved
            .iter()
            .filter(|c| c["name"] == "pinguard_violations_total" && c["labels"]["cpu"] == "1")
            .filter_map(|c| c["value"].as_f64())
            .sum(),
    )
}

fn log_has(lines: &[String], needle: &str) -> bool {
    lines.iter().any(|l| l.contains(needle))
}

#[test]
fn a_killed_daemons_observer_keeps_counting_and_the_next_daemon_adopts_it() {
    require!(missing_bpf());
    let _clean = CleanPins::new();
    assert!(attached(SWITCH).is_empty(), "another observer is attached");

    let first = Daemon::start(OBSERVE, &[]);
    let dir = layout_dir();
    for sub in ["maps", "progs", "links"] {
        assert!(dir.join(sub).read_dir().unwrap().next().is_some(), "{sub}");
    }
    let mode = std::fs::metadata(ROOT).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o700,
        "{ROOT} must be root-only"
    );
    let program = pinned_program(SWITCH);
    assert_eq!(attached(SWITCH), [program]);
    let before_kill = intruder_seconds(&first);
    // The daemon's own counters: some violation on CPU 1 (this host's own
    // threads run there), saved at a tick for whoever adopts the pins.
    let counted = first.wait_metric(
        "a violation on CPU 1",
        "pinguard_violations_total",
        &[("cpu", "1"), ("kind", "intruder")],
        |v| v > 0.0,
    );
    let counted = counted.max(violations(&first));
    wait_for("the counters saved at a tick", TIMEOUT, || {
        saved_violations().filter(|v| *v >= counted)
    });
    kill(first);

    // Down: the pinned link keeps the program attached and counting.
    assert_eq!(attached(SWITCH), [program], "the link went with the daemon");
    let intruder = Worker::spawn_on("pg-while-down", &[1]);
    let ran_before = schedstat_run_ns(intruder.tid());
    intruder.run(|| spin(Duration::from_millis(400)));
    let ran = (schedstat_run_ns(intruder.tid()) - ran_before) as f64 / 1e9;
    // Spun for 400 ms of wall time; what it got of CPU 1 depends on the load.
    assert!(ran > 0.05, "the intruder ran only {ran} s");

    // Commands that load their own programs work beside the pinned ones.
    run_subcommand("audit", &["--guard", "1", "--window", "1s"], TIMEOUT);
    let audit = run_subcommand(
        "audit",
        &["--guard", "1", "--window", "1s", "--json"],
        TIMEOUT,
    );
    assert!(matches!(audit.code(), Some(0 | 1)), "{}", audit.stderr);

    let mut second = Daemon::start(OBSERVE, &[]);
    let log = second.process().stderr_lines().to_vec();
    assert!(
        log_has(&log, "adopted the eBPF programs pinned in"),
        "{log:#?}"
    );
    assert_eq!(layout_dir(), dir);
    assert_eq!(
        attached(SWITCH),
        [program],
        "adopting must keep the one attachment, not add a second"
    );
    // Its own counters went on from where the killed daemon's were.
    assert!(log_has(&log, "carried"), "{log:#?}");
    let carried = violations(&second);
    assert!(
        carried >= counted,
        "violations on CPU 1 went {counted} -> {carried} across the restart"
    );
    // The kernel counted the intruder while no daemon ran.
    let after = intruder_seconds(&second);
    assert!(
        after - before_kill >= ran * 0.9,
        "intruder seconds went {before_kill} -> {after}, the intruder ran {ran} s meanwhile"
    );

    // SIGTERM detaches and removes everything.
    let log = second.stop();
    assert!(log_has(&log, "detaching the eBPF programs"), "{log:#?}");
    assert!(!Path::new(ROOT).exists(), "{ROOT} left behind");
    assert!(attached(SWITCH).is_empty(), "still attached after SIGTERM");
    wait_until_unloaded(SWITCH);
}

#[test]
fn keep_sensors_on_exit_leaves_them_for_the_next_start_and_cleanup_removes_them() {
    require!(missing_bpf());
    let _clean = CleanPins::new();
    let keep = format!("{OBSERVE}keep_sensors_on_exit = true\n");
    let mut first = Daemon::start(&keep, &[]);
    let program = pinned_program(SWITCH);

    // Refused while a daemon runs: it would pull the programs from under it.
    let refused = run_subcommand("cleanup", &[], TIMEOUT);
    refused.expect_code(2);
    assert!(
        refused.stderr.contains("another `pinguard run` is running"),
        "{}",
        refused.stderr
    );
    assert_eq!(attached(SWITCH), [program]);

    let log = first.stop();
    assert!(log_has(&log, "stay attached"), "{log:#?}");
    assert_eq!(attached(SWITCH), [program], "keep_sensors_on_exit detached");

    let cleanup = run_subcommand("cleanup", &["--json"], TIMEOUT);
    cleanup.expect_code(0);
    let removed = cleanup.json()["removed"].as_array().cloned().unwrap();
    let link = removed
        .iter()
        .find(|r| r["kind"] == "link" && r["name"] == SWITCH)
        .unwrap_or_else(|| panic!("no {SWITCH} link in {removed:#?}"));
    assert_eq!(link["id"].as_u64(), Some(program));
    assert!(
        removed
            .iter()
            .any(|r| r["kind"] == "map" && r["name"] == "EVENTS")
    );
    assert!(!Path::new(ROOT).exists(), "{ROOT} left behind");
    assert!(attached(SWITCH).is_empty(), "still attached after cleanup");
    wait_until_unloaded(SWITCH);

    let again = run_subcommand("cleanup", &[], TIMEOUT);
    again.expect_code(0);
    assert!(again.stdout.contains("nothing pinned"), "{}", again.stdout);
}

#[test]
fn an_incompatible_older_layout_is_replaced() {
    require!(missing_bpf());
    let _clean = CleanPins::new();
    // What an older pinguard with another map layout would have left.
    let old = format!("{ROOT}/v0000000000000000/maps");
    std::fs::create_dir_all(&old).unwrap();
    let map = format!("{old}/OLD_STATS");
    let (ok, out) = succeeds(Command::new("bpftool").args([
        "map",
        "create",
        &map,
        "type",
        "array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "4",
        "name",
        "OLD_STATS",
    ]));
    assert!(ok, "bpftool map create: {out}");
    let old_id = bpftool(&["map", "show", "pinned", &map])["id"]
        .as_u64()
        .unwrap();

    let mut d = Daemon::start(OBSERVE, &[]);
    let log = d.process().stderr_lines().to_vec();
    assert!(
        log_has(
            &log,
            "replaced the eBPF programs pinned in /sys/fs/bpf/pinguard/v0000000000000000"
        ),
        "{log:#?}"
    );
    assert!(
        log_has(&log, "loaded the eBPF programs and pinned them"),
        "{log:#?}"
    );
    assert_ne!(layout_dir(), Path::new(ROOT).join("v0000000000000000"));
    wait_for(
        &format!("the old map {old_id} to be freed"),
        TIMEOUT,
        || {
            let maps = bpftool(&["map", "show"]);
            (!maps
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["id"].as_u64() == Some(old_id)))
            .then_some(())
        },
    );
    assert_eq!(attached(SWITCH).len(), 1);
    d.stop();
}

#[test]
fn a_pinned_set_of_this_layout_that_cannot_be_adopted_is_replaced_not_a_crash_loop() {
    require!(missing_bpf());
    let _clean = CleanPins::new();
    // This binary's layout name and program set, from a real run.
    let mut first = Daemon::start(&format!("{OBSERVE}keep_sensors_on_exit = true\n"), &[]);
    let dir = layout_dir();
    let names = |sub: &str| -> Vec<String> {
        std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let (programs, maps) = (names("progs"), names("maps"));
    first.stop();
    run_subcommand("cleanup", &[], TIMEOUT).expect_code(0);
    // The same names, but directories where bpffs pins would be files: the
    // plan says adopt, opening them fails.
    for p in &programs {
        std::fs::create_dir_all(dir.join("progs").join(p)).unwrap();
        std::fs::create_dir_all(dir.join("links").join(p)).unwrap();
    }
    for m in &maps {
        std::fs::create_dir_all(dir.join("maps").join(m)).unwrap();
    }

    let mut d = Daemon::start(OBSERVE, &[]);
    let log = d.process().stderr_lines().to_vec();
    assert!(
        log_has(&log, "could not adopt the eBPF programs pinned in"),
        "{log:#?}"
    );
    assert!(
        log_has(&log, "loaded the eBPF programs and pinned them"),
        "{log:#?}"
    );
    assert_eq!(layout_dir(), dir);
    assert_eq!(attached(SWITCH), [pinned_program(SWITCH)]);
    d.stop();
}
