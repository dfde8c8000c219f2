//! The latency lab's guest (`cargo xtask lab-guest`): booting its kernel +
//! initramfs images under QEMU (KVM first, TCG where KVM cannot boot a Linux
//! kernel) and talking to its qemu-guest-agent, for the tests that measure
//! inside it.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::env::require_privileged;

/// Booting and the agent's first answer, under KVM.
pub const KVM_BOOT: Duration = Duration::from_secs(20);
/// The same under TCG (emulation).
pub const TCG_BOOT: Duration = Duration::from_secs(90);

/// Where `cargo xtask lab-guest` writes the images (`CARGO_TARGET_DIR/lab-guest`).
pub fn lab_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("lab-guest")
}

/// The images, built with `cargo xtask lab-guest` when missing and
/// PINGUARD_REQUIRE_PRIVILEGED=1 (CI); else None (skip).
pub fn images() -> Option<PathBuf> {
    let dir = lab_dir();
    let present = || {
        ["gp", "rt"]
            .iter()
            .all(|f| dir.join(f).join("initrd.img").is_file())
    };
    if !present() && require_privileged() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["run", "-q", "-p", "xtask", "--", "lab-guest"])
            .current_dir(&root)
            .status()
            .expect("running cargo xtask lab-guest");
        assert!(status.success(), "cargo xtask lab-guest failed: {status}");
    }
    present().then_some(dir)
}

/// A running guest, killed on drop (also when an assertion fails).
pub struct Vm {
    child: Child,
    _dir: tempfile::TempDir,
    sock: PathBuf,
    qmp: PathBuf,
    serial: PathBuf,
}

/// How to start a lab guest.
#[derive(Debug, Clone)]
pub struct VmOptions<'a> {
    /// `-name` (pinguard finds the guest by it).
    pub name: &'a str,
    /// `kvm` or `tcg`.
    pub accel: &'a str,
    pub smp: u32,
}

impl Vm {
    pub fn boot(flavour: &Path, opts: &VmOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let qmp = dir.path().join("qmp.sock");
        let serial = dir.path().join("serial.log");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-name", opts.name, "-accel", opts.accel, "-m", "256", "-smp",
            ])
            .arg(opts.smp.to_string())
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(flavour.join("vmlinuz"))
            .arg("-initrd")
            .arg(flavour.join("initrd.img"))
            .args([
                "-append",
                "console=ttyS0 quiet",
                "-display",
                "none",
                "-nodefaults",
                "-serial",
            ])
            .arg(format!("file:{}", serial.display()))
            .args(["-device", "virtio-serial", "-chardev"])
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                sock.display()
            ))
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64");
        Self {
            child,
            _dir: dir,
            sock,
            qmp,
            serial,
        }
    }

    /// The QEMU process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its QMP socket.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// The guest agent's socket.
    pub fn agent_path(&self) -> &Path {
        &self.sock
    }

    pub fn serial_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// The agent, once it answered guest-sync; None after `timeout`.
    pub fn agent(&self, timeout: Duration) -> Option<Agent> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(stream) = UnixStream::connect(&self.sock) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let mut agent = Agent {
                    reader: BufReader::new(stream.try_clone().unwrap()),
                    stream,
                };
                // Until the guest's agent runs, nothing answers; the 0xff
                // byte makes a half-read earlier command fail cleanly.
                let mut id = 0u64;
                while Instant::now() < end {
                    id += 1;
                    let _ = agent.stream.write_all(&[0xff]);
                    if agent.call("guest-sync", json!({ "id": id })).ok() == Some(json!(id)) {
                        agent
                            .stream
                            .set_read_timeout(Some(Duration::from_secs(30)))
                            .unwrap();
                        return Some(agent);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A guest agent connection (the test's own; close it before pinguard connects:
/// QEMU serves one client at a time).
pub struct Agent {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Agent {
    pub fn call(&mut self, command: &str, args: Value) -> Result<Value, String> {
        let msg = json!({ "execute": command, "arguments": args });
        self.stream
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let mut buf = Vec::new();
            self.reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| e.to_string())?;
            if buf.is_empty() {
                return Err("the agent closed the connection".into());
            }
            // A 0xff sent before guest-sync may echo back as a lone byte.
            let text = String::from_utf8_lossy(&buf).replace('\u{fffd}', "");
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))?;
            return match (v.get("return"), v.get("error")) {
                (Some(r), _) => Ok(r.clone()),
                (_, Some(e)) => Err(e.to_string()),
                _ => Err(format!("unexpected answer {v}")),
            };
        }
    }

    /// Runs `argv` in the guest: (exit code, stdout, stderr).
    pub fn exec(&mut self, argv: &[&str]) -> (i64, String, String) {
        let pid = self
            .call(
                "guest-exec",
                json!({ "path": argv[0], "arg": &argv[1..], "capture-output": true }),
            )
            .unwrap_or_else(|e| panic!("guest-exec {argv:?}: {e}"))["pid"]
            .clone();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self
                .call("guest-exec-status", json!({ "pid": pid }))
                .unwrap_or_else(|e| panic!("guest-exec-status {argv:?}: {e}"));
            if st["exited"] == true {
                let text = |k: &str| {
                    String::from_utf8_lossy(&base64(st[k].as_str().unwrap_or(""))).into_owned()
                };
                return (
                    st["exitcode"].as_i64().unwrap_or(-1),
                    text("out-data"),
                    text("err-data"),
                );
            }
            assert!(Instant::now() < end, "{argv:?} still running in the guest");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=' && *c != b'\n').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        out.extend(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Boots `flavour` under KVM, or under TCG if KVM cannot boot it here: the
/// guest, its agent (answering) and the accelerator used.
pub fn boot(flavour: &Path, name: &str, smp: u32) -> (Vm, Agent, &'static str) {
    let opts = |accel| VmOptions { name, accel, smp };
    let vm = Vm::boot(flavour, &opts("kvm"));
    if let Some(agent) = vm.agent(KVM_BOOT) {
        return (vm, agent, "kvm");
    }
    let serial = vm.serial_tail();
    drop(vm);
    eprintln!(
        "lab guest: KVM did not boot {} within {KVM_BOOT:?} (serial: {serial:?}); booting it under TCG",
        flavour.display()
    );
    let vm = Vm::boot(flavour, &opts("tcg"));
    let agent = vm.agent(TCG_BOOT).unwrap_or_else(|| {
        panic!(
            "{}: no guest agent within {TCG_BOOT:?} under TCG either; serial console:\n{}",
            flavour.display(),
            vm.serial_tail()
        )
    });
    (vm, agent, "tcg")
}
