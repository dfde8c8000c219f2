//! A guest in a container, the shape KubeVirt's virt-launcher has: QEMU in
//! a PID and mount namespace of its own (`unshare`), its QMP socket on a
//! tmpfs only that namespace sees, in a cgroup of its own whose cpuset
//! holds only the housekeeping CPU. CPU 1 is guarded.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use testkit::{
    env::missing_kvm,
    guest::wait_for_only_qemu,
    process::{Process, run_subcommand},
    require,
    threads::cpus_allowed,
    wait::wait_for,
};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const CPUSET: &str = "/sys/fs/cgroup/cpuset";

/// A cgroup v1 cpuset of the test's own; on drop its tasks go back to the
/// root cpuset and it is removed.
struct Cgroup(PathBuf);

impl Cgroup {
    fn create(name: &str, cpus: &str) -> Self {
        let dir = Path::new(CPUSET).join(name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let cg = Self(dir);
        let mems = fs::read_to_string(Path::new(CPUSET).join("cpuset.mems")).unwrap();
        fs::write(cg.0.join("cpuset.mems"), mems.trim()).unwrap();
        fs::write(cg.0.join("cpuset.cpus"), cpus).unwrap();
        cg
    }

    fn cpus(&self) -> String {
        fs::read_to_string(self.0.join("cpuset.cpus"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let procs = fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = fs::write(Path::new(CPUSET).join("cgroup.procs"), pid);
        }
        let _ = wait_for_removal(&self.0);
    }
}

fn wait_for_removal(dir: &Path) -> Option<()> {
    for _ in 0..200 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn a_guest_in_its_own_namespaces_and_cgroup_is_found_and_pinned() {
    require!(missing_kvm());
    if !Path::new(CPUSET).join("cpuset.cpus").exists() {
        assert!(
            !testkit::env::require_privileged(),
            "no cgroup v1 cpuset hierarchy at {CPUSET}"
        );
        return;
    }
    let name = format!("pg-ctr-{}", std::process::id());
    let cg = Cgroup::create(&name, "0");
    // The socket's directory exists on the host, but inside the container
    // a tmpfs covers it: only /proc/PID/root reaches the socket.
    let run = tempfile::Builder::new()
        .prefix("pg-ctr-")
        .tempdir_in("/run")
        .unwrap();
    let dir = run.path().display().to_string();
    let script = format!(
        "echo $$ > {cg}/cgroup.procs && mount -t tmpfs tmpfs {dir} && \
         exec qemu-system-x86_64 -accel kvm -smp 1 -m 128 -display none -nodefaults -S \
         -name pg-ctr -qmp unix:{dir}/qmp.sock,server=on,wait=off",
        cg = cg.0.display()
    );
    let container = Process::try_spawn_group(
        Command::new("unshare")
            .args([
                "--pid",
                "--kill-child",
                "--mount",
                "--mount-proc",
                "sh",
                "-c",
            ])
            .arg(&script),
    )
    .unwrap();
    let qemu = wait_for("the container's QEMU", Duration::from_secs(20), || {
        let procs = fs::read_to_string(cg.0.join("cgroup.procs")).ok()?;
        let pid: u32 = procs.lines().next()?.parse().ok()?;
        let sock = format!("/proc/{pid}/root{dir}/qmp.sock");
        let ours = testkit::host::comm(pid, pid).is_some_and(|c| c.starts_with("qemu"));
        (ours && Path::new(&sock).exists() && testkit::host::tids(pid).len() >= 3).then_some(pid)
    });
    assert!(
        !Path::new(&format!("{dir}/qmp.sock")).exists(),
        "the socket should only be visible inside the container"
    );
    wait_for_only_qemu(&[qemu]);

    let r = run_subcommand("pin", &["--guard", "1", "--json"], RUN_TIMEOUT);
    r.expect_code(0);
    let v: Value = r.json();
    let g = &v["guests"][0];
    assert_eq!(g["name"], "pg-ctr", "{v:#}");
    assert_eq!(g["source"], "qmp", "found through its QMP socket: {v:#}");
    let vcpu = g["vcpus"][0]["tid"].as_u64().unwrap() as u32;
    assert!(
        testkit::host::tids(qemu).contains(&vcpu),
        "vCPU thread {vcpu} is not a host thread id of QEMU {qemu}"
    );
    assert!(
        vcpu > 10,
        "{vcpu} looks like an id of the container's namespace"
    );
    assert_eq!(cpus_allowed(qemu, vcpu), "1");
    // Its own cgroup held CPU 0 only: pinguard widened that cgroup (it
    // holds this guest only) and says so.
    assert_eq!(cg.cpus(), "0-1");
    assert!(r.stderr.contains("widened the cpuset"), "{}", r.stderr);
    for tid in testkit::host::tids(qemu) {
        if tid != vcpu {
            assert_eq!(cpus_allowed(qemu, tid), "0", "emulator thread {tid}");
        }
    }
    container.stop(Duration::from_secs(20));
}
