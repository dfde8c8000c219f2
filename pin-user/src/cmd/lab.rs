//! `pinguard lab`: the whole latency experiment in one command. cyclictest on
//! a guarded CPU of the host with a general-purpose (SCHED_OTHER) and a
//! real-time (SCHED_FIFO) thread, then the same inside a guest booted on the
//! general-purpose kernel and on the PREEMPT_RT kernel of the lab guest
//! (`cargo xtask lab-guest`); each run is an ordinary `pinguard latency`
//! (this binary, run again), its report kept as JSON, and at the end the
//! table and the overlaid histograms of `latency --compare`.
use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    cli::{Accel, LabArgs},
    exit,
    latency::{SchedPolicy, compare, plot},
};

/// One run of the experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// File name stem of its report: "host-other", "guest-rt-fifo95".
    pub name: String,
    /// `None`: the host; else the lab guest's flavour ("gp", "rt").
    pub guest: Option<&'static str>,
    pub policy: SchedPolicy,
    pub priority: u32,
}

/// The experiment: host, then each guest flavour, each with the normal and
/// the real-time policy, in that order (the table's columns).
pub fn steps(guests: &[&'static str], rt_priority: u32) -> Vec<Step> {
    let policies = [(SchedPolicy::Other, 0), (SchedPolicy::Fifo, rt_priority)];
    let places: Vec<Option<&'static str>> = std::iter::once(None)
        .chain(guests.iter().map(|g| Some(*g)))
        .collect();
    let mut out = Vec::new();
    for guest in places {
        for (policy, priority) in policies {
            let place = match guest {
                None => "host".to_string(),
                Some(g) => format!("guest-{g}"),
            };
            out.push(Step {
                name: format!("{place}-{}", compare::policy_short(policy, priority)),
                guest,
                policy,
                priority,
            });
        }
    }
    out
}

/// The `pinguard latency` arguments of a host step.
pub fn latency_args(step: &Step, args: &LabArgs) -> Vec<String> {
    let mut a = vec![
        "latency".to_string(),
        "--guard".into(),
        args.guard.to_string(),
        "--cpu".into(),
        args.cpu().to_string(),
        "--duration".into(),
        format!("{}ms", args.duration.as_millis()),
        "--interval".into(),
        format!("{}us", args.interval.as_micros()),
        "--policy".into(),
        step.policy.cyclictest_name().into(),
        "--priority".into(),
        step.priority.to_string(),
        "--json".into(),
    ];
    if let Some(c) = &args.config {
        a.push("--config".into());
        a.push(c.display().to_string());
    }
    a
}

pub fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    let guests: Vec<&'static str> = if args.host_only {
        Vec::new()
    } else {
        check_images(&args.kernels)?;
        vec!["gp", "rt"]
    };
    plot::ensure_font()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    let me = std::env::current_exe().context("finding the pinguard binary")?;
    let steps = steps(&guests, args.priority);
    eprintln!(
        "pinguard lab: {} runs of {:?} on CPU {} (guarded {}), reports into {}",
        steps.len(),
        args.duration,
        args.cpu(),
        args.guard,
        args.out.display()
    );
    let mut files = Vec::new();
    let mut vm: Option<guest::Vm> = None;
    for (i, step) in steps.iter().enumerate() {
        let path = args.out.join(format!("{}.json", step.name));
        eprintln!(
            "pinguard lab: [{}/{}] {} -> {}",
            i + 1,
            steps.len(),
            step.name,
            path.display()
        );
        match step.guest {
            None => run_latency(&me, &latency_args(step, &args), &path)?,
            Some(flavour) => {
                let name = format!("pinguard-lab-{flavour}");
                if vm.as_ref().is_none_or(|v| v.name != name) {
                    // One guest at a time: the last one goes first.
                    drop(vm.take());
                    let booted = guest::boot(&args.kernels, flavour, args.accel)?;
                    eprintln!(
                        "pinguard lab: guest {} booted under {}",
                        booted.name, booted.accel
                    );
                    vm = Some(booted);
                }
                let booted = vm.as_ref().expect("booted above");
                guest::run_step(&me, step, booted, &args, &path)?;
            }
        }
        files.push(path);
    }
    drop(vm);
    write_comparison(&files, &args.out)?;
    Ok(ExitCode::from(exit::OK))
}

/// Runs `pinguard ARGS` with its report (stdout) into `out`; its progress
/// (stderr) goes to ours.
pub fn run_latency(me: &Path, args: &[String], out: &Path) -> anyhow::Result<()> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let status = Command::new(me)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("running {}", me.display()))?;
    if !status.success() {
        let _ = std::fs::remove_file(out);
        bail!(
            "`pinguard {}` failed ({status}); the runs before it are in {}",
            args.join(" "),
            out.parent().unwrap_or(Path::new(".")).display()
        );
    }
    Ok(())
}

/// The table (text and JSON) and the overlaid histograms, into `dir`.
pub fn write_comparison(files: &[PathBuf], dir: &Path) -> anyhow::Result<()> {
    let thresholds = compare::DEFAULT_THRESHOLDS_US;
    let mut runs = Vec::new();
    for f in files {
        runs.push(compare::load(f, thresholds)?);
    }
    compare::label_runs(&mut runs, &[])?;
    let mut table = compare::Comparison::new(runs, thresholds);
    let pictures = plot::write_overlay(&table.runs, Some(dir), Some(dir))?;
    table.pictures = pictures.iter().map(|p| p.display().to_string()).collect();
    let text = compare::render(&table, false);
    let write = |name: &str, body: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        File::create(&p)
            .and_then(|mut f| f.write_all(body.as_bytes()))
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    write("table.txt", &text)?;
    write("table.json", &serde_json::to_string_pretty(&table)?)?;
    print!("{text}");
    Ok(())
}

fn check_images(dir: &Path) -> anyhow::Result<()> {
    for flavour in ["gp", "rt"] {
        for file in ["vmlinuz", "initrd.img"] {
            let p = dir.join(flavour).join(file);
            if !p.is_file() {
                bail!(
                    "--kernels {}: no {} (build the lab guest with `cargo xtask lab-guest`, \
                     or measure the host only with --host-only)",
                    dir.display(),
                    p.display()
                );
            }
        }
    }
    Ok(())
}

/// The guest half: boots the lab guest (KVM first, TCG where KVM cannot
/// boot it) and measures inside it with `pinguard latency --vm`.
mod guest {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        os::unix::{fs::DirBuilderExt as _, net::UnixStream, process::CommandExt as _},
        process::Child,
        time::{Duration, Instant},
    };

    use super::*;

    /// Booting to the agent's first answer under KVM (the lab guest takes a
    /// few seconds); under TCG (emulation) it takes longer.
    const KVM_BOOT: Duration = Duration::from_secs(20);
    const TCG_BOOT: Duration = Duration::from_secs(120);

    /// A booted lab guest, killed on drop.
    pub struct Vm {
        child: Child,
        pub name: String,
        pub accel: &'static str,
        serial: PathBuf,
        /// Its agent socket and serial log, removed with it.
        dir: PathBuf,
    }

    impl Drop for Vm {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The QEMU command line of the lab guest `flavour`, named `name`, in
    /// `run` its agent's socket (the standard port) and its QMP monitor,
    /// which `latency --vm` finds on the command line, and its serial log.
    pub fn qemu_args(images: &Path, flavour: &str, name: &str, accel: &str, run: &Path) -> Vec<String> {
        let dir = images.join(flavour);
        let (sock, qmp, serial) = (run.join("qga.sock"), run.join("qmp.sock"), run.join("serial.log"));
        [
            "-name",
            name,
            "-accel",
            accel,
            "-m",
            "256",
            "-smp",
            "1",
            "-kernel",
            &dir.join("vmlinuz").display().to_string(),
            "-initrd",
            &dir.join("initrd.img").display().to_string(),
            "-append",
            "console=ttyS0 quiet",
            "-display",
            "none",
            "-nodefaults",
            "-serial",
            &format!("file:{}", serial.display()),
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
            "-device",
            "virtio-serial",
            "-chardev",
            &format!("socket,path={},server=on,wait=off,id=qga0", sock.display()),
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn boot_with(images: &Path, flavour: &str, accel: &'static str) -> anyhow::Result<Vm> {
        let dir = std::env::temp_dir().join(format!(
            "pinguard-lab-{}-{flavour}-{accel}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let sock = dir.join("qga.sock");
        let serial = dir.join("serial.log");
        let name = format!("pinguard-lab-{flavour}");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(qemu_args(images, flavour, &name, accel, &dir))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                // The guest goes when pinguard goes, however it goes.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .context("starting qemu-system-x86_64 (install qemu-system-x86)")?;
        let vm = Vm {
            child,
            name,
            accel,
            serial,
            dir,
        };
        let timeout = if accel == "kvm" { KVM_BOOT } else { TCG_BOOT };
        if agent_answers(&sock, timeout) {
            Ok(vm)
        } else {
            let tail = std::fs::read_to_string(&vm.serial).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(3).collect();
            bail!(
                "the {flavour} guest's agent did not answer within {timeout:?} under {accel} \
                 (serial console ends: {:?})",
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )
        }
    }

    /// Boots `flavour`: KVM first; where KVM cannot boot a stock kernel (a
    /// nested host whose KVM is PVM, say) under TCG, and says so.
    pub fn boot(images: &Path, flavour: &str, accel: Accel) -> anyhow::Result<Vm> {
        match accel {
            Accel::Kvm => boot_with(images, flavour, "kvm"),
            Accel::Tcg => boot_with(images, flavour, "tcg"),
            Accel::Auto => boot_with(images, flavour, "kvm").or_else(|e| {
                eprintln!("pinguard lab: {e}; booting it under TCG (emulation) instead");
                boot_with(images, flavour, "tcg")
            }),
        }
    }

    /// Whether the agent on `sock` answers `guest-sync` within `timeout`.
    fn agent_answers(sock: &Path, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut id = 0u64;
        while Instant::now() < end {
            if let Ok(stream) = UnixStream::connect(sock) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let Ok(mut writer) = stream.try_clone() else {
                    return false;
                };
                let mut reader = BufReader::new(stream);
                while Instant::now() < end {
                    id += 1;
                    // 0xff first: the agent drops a half-read command.
                    let mut msg = vec![0xff];
                    msg.extend_from_slice(
                        format!(r#"{{"execute":"guest-sync","arguments":{{"id":{id}}}}}"#)
                            .as_bytes(),
                    );
                    msg.push(b'\n');
                    if writer.write_all(&msg).is_err() {
                        break;
                    }
                    // Answers to earlier ids may come first; a read times out
                    // (2 s) while the guest still boots.
                    let mut line = Vec::new();
                    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                        let text = String::from_utf8_lossy(&line).replace(' ', "");
                        if text.contains(&format!("\"return\":{id}}}")) {
                            return true;
                        }
                        line.clear();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    pub fn run_step(
        me: &Path,
        step: &Step,
        vm: &Vm,
        args: &LabArgs,
        out: &Path,
    ) -> anyhow::Result<()> {
        let mut a = latency_args(step, args);
        a.push("--vm".into());
        a.push(vm.name.clone());
        run_latency(me, &a, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_is_named_and_reachable_as_latency_vm_expects() {
        let a = guest::qemu_args(
            Path::new("/k"),
            "rt",
            "pinguard-lab-rt",
            "tcg",
            Path::new("/run/x"),
        )
        .join(" ");
        for part in [
            "-name pinguard-lab-rt -accel tcg",
            "-kernel /k/rt/vmlinuz -initrd /k/rt/initrd.img",
            "-qmp unix:/run/x/qmp.sock,server=on,wait=off",
            "socket,path=/run/x/qga.sock,server=on,wait=off,id=qga0",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-serial file:/run/x/serial.log",
        ] {
            assert!(a.contains(part), "{part:?} not in {a}");
        }
    }

    #[test]
    fn the_experiment_is_host_then_each_kernel_each_policy() {
        let names: Vec<String> = steps(&["gp", "rt"], 95)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "host-other",
                "host-fifo95",
                "guest-gp-other",
                "guest-gp-fifo95",
                "guest-rt-other",
                "guest-rt-fifo95"
            ]
        );
        let host = steps(&[], 80);
        assert_eq!(host.len(), 2);
        assert_eq!((host[1].policy, host[1].priority), (SchedPolicy::Fifo, 80));
    }
}
