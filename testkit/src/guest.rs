//! Real QEMU/KVM guests.
//!
//! [`Guest::try_start`] runs `qemu-system-x86_64 -accel kvm ... -daemonize`
//! in a fresh temporary directory (pidfile, log, QMP socket); dropping the
//! `Guest` kills the VM (SIGKILL), waits until the process and all its threads
//! are gone, and removes the directory, even when the caller panics.
//!
//! The kit asks QEMU for its vCPU threads itself (QMP, or the thread names
//! QEMU gives them) rather than through pinguard, so that callers check
//! pinguard against an independent view.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nix::sys::signal::{self, Signal};
use serde_json::Value;

use crate::{
    error::{Error, OrPanic as _, Result},
    host, threads, wait,
};

/// Bound on QEMU starting up (pidfile and QMP socket present).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on a killed QEMU and its threads disappearing.
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
    /// `-qmp unix:...`: a monitor socket (pinguard then asks QEMU for its
    /// vCPUs over QMP; without one it goes by thread names).
    pub qmp: bool,
    /// `-bios` with a firmware whose reset vector is `jmp $`: each vCPU
    /// (with `paused` off) spins in KVM_RUN, always runnable, so an intruder
    /// on its CPU preempts it. The default firmware soon halts: its vCPU
    /// sleeps and wakes on timer ticks.
    pub busy: bool,
    /// `-m`: guest memory in MiB (a paused guest touches almost none of it).
    pub memory_mib: u32,
}

impl GuestOptions {
    /// A paused single-vCPU guest with named threads and a QMP socket.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            smp: 1,
            debug_threads: true,
            paused: true,
            qmp: true,
            busy: false,
            memory_mib: 128,
        }
    }
}

/// A running QEMU/KVM guest, killed on drop.
pub struct Guest {
    name: String,
    pid: u32,
    pidfile: PathBuf,
    qmp: Option<PathBuf>,
    debug_threads: bool,
    // Dropped after Drop::drop has killed QEMU.
    dir: tempfile::TempDir,
}

impl Guest {
    /// Starts a guest and waits (bounded) until it runs and its QMP socket exists.
    pub fn try_start(opts: GuestOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pinguard-guest-")
            .tempdir()
            .map_err(|e| Error::io("creating a directory for a guest", e))?;
        let qmp = opts.qmp.then(|| dir.path().join("qmp.sock"));
        let pidfile = dir.path().join("qemu.pid");
        let log = dir.path().join("qemu.log");
        let mut name_arg = opts.name.replace(',', ",,");
        if opts.debug_threads {
            name_arg.push_str(",debug-threads=on");
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-smp"])
            .arg(opts.smp.to_string())
            .arg("-m")
            .arg(opts.memory_mib.to_string())
            .args(["-display", "none", "-nodefaults", "-name"])
            .arg(&name_arg)
            .args(["-daemonize", "-pidfile"])
            .arg(&pidfile);
        if let Some(qmp) = &qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        if opts.paused {
            cmd.arg("-S");
        }
        if opts.busy {
            // 64 KiB of `hlt`, with `jmp $` (EB FE) at the reset vector,
            // 16 bytes before the end (mapped just below 4 GiB).
            let mut firmware = vec![0xf4u8; 64 << 10];
            let reset = firmware.len() - 16;
            firmware[reset..reset + 2].copy_from_slice(&[0xeb, 0xfe]);
            let bios = dir.path().join("spin.bin");
            fs::write(&bios, firmware)
                .map_err(|e| Error::io("writing the spinning firmware", e))?;
            cmd.arg("-bios").arg(&bios);
        }
        let log_file = fs::File::create(&log).map_err(|e| Error::io("creating the QEMU log", e))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut launcher = cmd
            .spawn()
            .map_err(|e| Error::io("starting qemu-system-x86_64", e))?;
        // With -daemonize the launcher exits once the VM is set up.
        let waited = wait::poll(
            "the QEMU launcher to daemonize",
            START_TIMEOUT,
            Duration::from_millis(20),
            || launcher.try_wait().ok().flatten(),
        );
        let status = match waited {
            Ok(status) => status,
            Err(e) => {
                let _ = launcher.kill();
                let _ = launcher.wait();
                return Err(e);
            }
        };
        if !status.success() {
            return Err(Error::Exited {
                command: "qemu-system-x86_64".into(),
                status,
                when: "while starting".into(),
                detail: format!(": {}", fs::read_to_string(&log).unwrap_or_default().trim()),
            });
        }
        let pid: u32 = wait::poll(
            "the QEMU pidfile",
            START_TIMEOUT,
            Duration::from_millis(20),
            || {
                fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            },
        )?;
        // From here on Drop cleans up.
        let guest = Self {
            name: opts.name,
            pid,
            pidfile,
            qmp,
            debug_threads: opts.debug_threads,
            dir,
        };
        if let Some(qmp) = &guest.qmp {
            wait::poll(
                "the QMP socket",
                START_TIMEOUT,
                Duration::from_millis(20),
                || qmp.exists().then_some(()),
            )?;
        }
        Ok(guest)
    }

    /// [`Guest::try_start`], panicking on failure.
    #[track_caller]
    pub fn start(opts: GuestOptions) -> Self {
        Self::try_start(opts).or_panic()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The QEMU process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The QMP socket; panics for a guest started without one.
    pub fn qmp_path(&self) -> &Path {
        self.qmp
            .as_deref()
            .expect("the guest was started with a QMP socket")
    }

    /// The guest's temporary directory (QMP socket, pidfile, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// vCPU thread ids in cpu-index order: from QMP `query-cpus-fast`, or,
    /// without a QMP socket, from the `CPU n/KVM` thread names.
    pub fn try_vcpu_tids(&self) -> Result<Vec<u32>> {
        let mut cpus: Vec<(u64, u32)> = match &self.qmp {
            Some(qmp) => {
                let ret = qmp_query(qmp, "query-cpus-fast")?;
                let bad = || Error::Qmp {
                    socket: qmp.display().to_string(),
                    detail: format!("query-cpus-fast returned {ret}"),
                };
                ret.as_array()
                    .ok_or_else(bad)?
                    .iter()
                    .map(|c| {
                        Some((
                            c["cpu-index"].as_u64()?,
                            u32::try_from(c["thread-id"].as_u64()?).ok()?,
                        ))
                    })
                    .collect::<Option<_>>()
                    .ok_or_else(bad)?
            }
            None => {
                assert!(
                    self.debug_threads,
                    "a guest without QMP needs debug-threads to tell its vCPUs"
                );
                self.tids()
                    .into_iter()
                    .filter_map(|tid| {
                        let comm = host::comm(self.pid, tid)?;
                        let index = comm.strip_prefix("CPU ")?.strip_suffix("/KVM")?;
                        Some((index.parse().ok()?, tid))
                    })
                    .collect()
            }
        };
        cpus.sort_unstable();
        Ok(cpus.into_iter().map(|(_, tid)| tid).collect())
    }

    /// [`Guest::try_vcpu_tids`], panicking on failure.
    #[track_caller]
    pub fn vcpu_tids(&self) -> Vec<u32> {
        self.try_vcpu_tids().or_panic()
    }

    /// All thread ids of the QEMU process.
    pub fn tids(&self) -> Vec<u32> {
        host::tids(self.pid)
    }

    /// Every thread that is not a vCPU thread.
    pub fn emulator_tids(&self) -> Vec<u32> {
        let vcpus = self.vcpu_tids();
        self.tids()
            .into_iter()
            .filter(|t| !vcpus.contains(t))
            .collect()
    }

    /// The kernel threads KVM runs for this guest (`kvm-pit/PID`, the
    /// in-kernel PIT's worker): pinguard places them with the emulator.
    pub fn kernel_threads(&self) -> Vec<u32> {
        let name = format!("kvm-pit/{}", self.pid);
        host::processes(|comm| comm == name)
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Every thread with its `Cpus_allowed_list`.
    pub fn affinities(&self) -> Vec<(u32, String)> {
        self.tids()
            .into_iter()
            .map(|t| (t, threads::cpus_allowed(self.pid, t)))
            .collect()
    }

    /// Connects to the QMP socket and keeps the connection: QEMU serves one
    /// client at a time, so other clients get no answer until it is dropped.
    pub fn hold_qmp(&self) -> UnixStream {
        let qmp = self.qmp_path();
        let stream = UnixStream::connect(qmp)
            .unwrap_or_else(|e| panic!("connecting to QMP {}: {e}", qmp.display()));
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
        host::is_alive(self.pid)
    }

    /// Still our QEMU, not a recycled pid: its command line names our pidfile.
    fn is_ours(&self) -> bool {
        fs::read(format!("/proc/{}/cmdline", self.pid)).is_ok_and(|c| {
            let pidfile = self.pidfile.as_os_str().as_encoded_bytes();
            c.split(|b| *b == 0).any(|arg| arg == pidfile)
        })
    }

    /// SIGKILL, then wait until the process and all its threads are gone
    /// (their thread ids free: a vCPU thread's KVM teardown comes last).
    fn try_kill(&self) -> Result<()> {
        let alive = host::is_alive(self.pid);
        if alive && !self.is_ours() {
            // The pid was recycled: ours is long gone.
            return Ok(());
        }
        if alive {
            let _ = signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        wait::poll(
            &format!("QEMU pid {} and all its threads to exit", self.pid),
            EXIT_TIMEOUT,
            Duration::from_millis(10),
            || (!host::is_alive(self.pid) && host::other_threads(self.pid) == 0).then_some(()),
        )
    }

    /// Kills the VM now and waits until it is gone; panics if it survives.
    #[track_caller]
    pub fn kill(&mut self) {
        self.try_kill().or_panic()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Never panic in drop (it may run while unwinding).
        if let Err(e) = self.try_kill() {
            eprintln!("warning: {e}");
        }
    }
}

/// Runs one QMP command on a fresh connection (QEMU 7.2 serves one client
/// at a time, so the connection is not kept) and returns its `return`.
pub fn qmp_query(socket: &Path, command: &str) -> Result<Value> {
    let fail = |detail: String| Error::Qmp {
        socket: socket.display().to_string(),
        detail,
    };
    let stream = UnixStream::connect(socket).map_err(|e| fail(format!("connecting: {e}")))?;
    stream
        .set_read_timeout(Some(QMP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(QMP_TIMEOUT)))
        .map_err(|e| fail(e.to_string()))?;
    let mut writer = stream.try_clone().map_err(|e| fail(e.to_string()))?;
    let mut reader = BufReader::new(stream);
    let mut next = || -> Result<Value> {
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| fail(format!("reading: {e}")))?;
            if n == 0 {
                return Err(fail("closed the connection".into()));
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| fail(format!("invalid JSON ({e}): {line}")))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    let greeting = next()?;
    if greeting.get("QMP").is_none() {
        return Err(fail(format!("no QMP greeting: {greeting}")));
    }
    let mut exec = |cmd: &str| -> Result<Value> {
        writeln!(writer, "{}", serde_json::json!({"execute": cmd, "id": cmd}))
            .map_err(|e| fail(format!("writing: {e}")))?;
        let reply = next()?;
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| fail(format!("{cmd} failed: {reply}")))
    };
    exec("qmp_capabilities")?;
    exec(command)
}

/// Pids of QEMU processes on the host (alive; `comm` is the program name
/// cut to 15 characters: "qemu-system-x86").
pub fn qemu_pids() -> Vec<u32> {
    host::processes(|comm| comm.starts_with("qemu-system-"))
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits (bounded) until the only QEMU processes are `pids` (guests not
/// started through [`Guest`]: libvirt domains, containers).
pub fn wait_for_only_qemu(pids: &[u32]) {
    wait::wait_for(
        "QEMU guests started by something else to exit (pinguard pin manages every guest on the host)",
        Duration::from_secs(120),
        || qemu_pids().iter().all(|p| pids.contains(p)).then_some(()),
    );
}

/// Waits (bounded) until no QEMU but `mine` runs: tests that pin every
/// guest on the host cannot share it with guests they did not start.
pub fn wait_for_no_other_guests(mine: &[&Guest]) {
    wait::wait_for(
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
