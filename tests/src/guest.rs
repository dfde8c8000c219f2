//! Real QEMU/KVM guests for integration tests.
//!
//! `Guest::start` runs `qemu-system-x86_64 -accel kvm ... -daemonize` with
//! a QMP socket in a fresh temporary directory; dropping the `Guest` kills
//! the VM (SIGKILL, then waits until the process is gone) and removes the
//! directory, even when the test panics.
//!
//! The harness asks QEMU for its vCPU threads over QMP itself rather than
//! through pinguard, so that tests check pinguard against an independent view.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::Value;

use crate::util::wait_for;

/// Bound on QEMU starting up (pidfile and QMP socket present).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on a killed QEMU disappearing.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// `-name` (commas are escaped for QEMU).
    pub name: String,
    /// `-smp`: number of vCPUs.
    pub smp: u32,
    /// `-name ...,debug-threads=on`: vCPU threads named `CPU n/KVM`.
    pub debug_threads: bool,
    /// `-S`: vCPUs created but not running (idle, cheap, deterministic).
    pub paused: bool,
}

impl GuestOptions {
    /// A paused single-vCPU guest with named threads.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            smp: 1,
            debug_threads: true,
            paused: true,
        }
    }
}

/// A running QEMU/KVM guest, killed on drop.
pub struct Guest {
    name: String,
    pid: u32,
    dir: PathBuf,
    qmp: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty directory of our own under the system temp dir.
fn fresh_dir(name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(24)
        .collect();
    let dir = std::env::temp_dir().join(format!(
        "pinguard-guest-{}-{}-{safe}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    // Left over from a crashed run with a recycled pid: ours now.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

impl Guest {
    /// Starts a guest and waits (bounded) until its QMP socket exists.
    pub fn start(opts: GuestOptions) -> Self {
        let dir = fresh_dir(&opts.name);
        let qmp = dir.join("qmp.sock");
        let pidfile = dir.join("qemu.pid");
        let log = dir.join("qemu.log");
        let mut name_arg = opts.name.replace(',', ",,");
        if opts.debug_threads {
            name_arg.push_str(",debug-threads=on");
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-smp"])
            .arg(opts.smp.to_string())
            .args(["-m", "128", "-display", "none", "-nodefaults", "-name"])
            .arg(&name_arg)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(["-daemonize", "-pidfile"])
            .arg(&pidfile);
        if opts.paused {
            cmd.arg("-S");
        }
        let log_file = fs::File::create(&log).expect("creating the QEMU log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut launcher = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting qemu-system-x86_64: {e}"));
        // With -daemonize the launcher exits once the VM is set up.
        let status = wait_for("the QEMU launcher to daemonize", START_TIMEOUT, || {
            launcher.try_wait().expect("waiting for QEMU")
        });
        if !status.success() {
            let msg = fs::read_to_string(&log).unwrap_or_default();
            let _ = fs::remove_dir_all(&dir);
            panic!("qemu-system-x86_64 failed ({status}):\n{msg}");
        }
        let pid: u32 = wait_for("the QEMU pidfile", START_TIMEOUT, || {
            fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        // From here on Drop cleans up.
        let guest = Self {
            name: opts.name,
            pid,
            dir,
            qmp,
        };
        wait_for("the QMP socket", START_TIMEOUT, || {
            guest.qmp.exists().then_some(())
        });
        guest
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The QEMU process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// The guest's temporary directory (QMP socket, pidfile, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// vCPU thread ids in cpu-index order, from QMP `query-cpus-fast`.
    pub fn vcpu_tids(&self) -> Vec<u32> {
        let ret = qmp_query(&self.qmp, "query-cpus-fast");
        let mut cpus: Vec<(u64, u32)> = ret
            .as_array()
            .unwrap_or_else(|| panic!("query-cpus-fast returned {ret}"))
            .iter()
            .map(|c| {
                (
                    c["cpu-index"].as_u64().expect("cpu-index"),
                    c["thread-id"].as_u64().expect("thread-id") as u32,
                )
            })
            .collect();
        cpus.sort_unstable();
        cpus.into_iter().map(|(_, tid)| tid).collect()
    }

    /// All thread ids of the QEMU process.
    pub fn tids(&self) -> Vec<u32> {
        let mut tids: Vec<u32> = fs::read_dir(format!("/proc/{}/task", self.pid))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        tids.sort_unstable();
        tids
    }

    /// Every thread that is not a vCPU thread.
    pub fn emulator_tids(&self) -> Vec<u32> {
        let vcpus = self.vcpu_tids();
        self.tids()
            .into_iter()
            .filter(|t| !vcpus.contains(t))
            .collect()
    }

    /// Connects to the QMP socket and keeps the connection: QEMU serves one
    /// client at a time, so other clients get no answer until it is dropped.
    pub fn hold_qmp(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.qmp)
            .unwrap_or_else(|e| panic!("connecting to QMP {}: {e}", self.qmp.display()));
        stream.set_read_timeout(Some(QMP_TIMEOUT)).unwrap();
        // Once the greeting arrived, QEMU is serving this connection.
        let mut greeting = String::new();
        BufReader::new(&stream)
            .read_line(&mut greeting)
            .unwrap_or_else(|e| panic!("reading the QMP greeting: {e}"));
        assert!(greeting.contains("\"QMP\""), "no QMP greeting: {greeting}");
        stream
    }

    /// Whether the QEMU process still runs (a zombie does not).
    pub fn is_running(&self) -> bool {
        is_alive(self.pid)
    }

    /// Kills the VM now (SIGKILL) and waits until the process is gone.
    pub fn kill(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        if is_alive(self.pid) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let what = format!("QEMU pid {} and all its threads to exit", self.pid);
        wait_for(&what, EXIT_TIMEOUT, || {
            (!is_alive(self.pid) && other_threads(self.pid) == 0).then_some(())
        });
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Never panic in drop (it may run while unwinding): best effort.
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
        while is_alive(self.pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if is_alive(self.pid) {
            eprintln!("warning: QEMU pid {} survived SIGKILL", self.pid);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Alive = exists and is not a zombie. A daemonized QEMU is reaped by
/// init, possibly late. The leader can already be a zombie while its other
/// threads are still exiting (a group exit tears them down concurrently, a
/// vCPU thread's KVM teardown last): see [`other_threads`].
fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Threads of `pid` other than the leader that still exist (their ids are
/// not free yet). 0 once the process is gone.
fn other_threads(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.file_name().to_str() != Some(&pid.to_string()))
                .count()
        })
        .unwrap_or(0)
}

/// Runs one QMP command on a fresh connection (QEMU 7.2 serves one client
/// at a time, so the connection is not kept) and returns its `return`.
pub fn qmp_query(socket: &Path, command: &str) -> Value {
    let stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to QMP {}: {e}", socket.display()));
    stream.set_read_timeout(Some(QMP_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(QMP_TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut next = || -> Value {
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("reading QMP {}: {e}", socket.display()));
            assert!(n > 0, "QMP {} closed the connection", socket.display());
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("QMP sent invalid JSON ({e}): {line}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    };
    let greeting = next();
    assert!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
    let mut exec = |cmd: &str| -> Value {
        writeln!(writer, "{}", serde_json::json!({"execute": cmd, "id": cmd})).unwrap();
        let reply = next();
        reply
            .get("return")
            .cloned()
            .unwrap_or_else(|| panic!("QMP {cmd} failed: {reply}"))
    };
    exec("qmp_capabilities");
    exec(command)
}

/// Pids of QEMU processes on the host (alive, by program name).
pub fn qemu_pids() -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.retain(|pid| {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let base = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
        base.starts_with(b"qemu-system-") && is_alive(*pid)
    });
    pids.sort_unstable();
    pids
}

/// Waits (bounded) until no QEMU but `mine` runs: tests that pin every
/// guest on the host cannot share it with guests they did not start.
pub fn wait_for_no_other_guests(mine: &[&Guest]) {
    wait_for(
        "QEMU guests started by something else to exit (pinguard pin manages every guest on the host)",
        Duration::from_secs(120),
        || {
            qemu_pids()
                .iter()
                .all(|p| mine.iter().any(|g| g.pid() == *p))
                .then_some(())
        },
    );
}

/// A thread's `Cpus_allowed_list` from /proc (empty if it exited).
pub fn cpus_allowed(pid: u32, tid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Every thread of a guest with its `Cpus_allowed_list`.
pub fn affinities(guest: &Guest) -> Vec<(u32, String)> {
    guest
        .tids()
        .into_iter()
        .map(|t| (t, cpus_allowed(guest.pid(), t)))
        .collect()
}
