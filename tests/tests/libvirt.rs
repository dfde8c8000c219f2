//! pinguard on libvirt domains, with a real libvirtd (started here when none
//! runs) and libvirt's cgroup v1 cpusets. CPU 1 is guarded.
//!
//! libvirt pins through cgroups: `virsh vcpupin D 0 0` narrows the vCPU's
//! cpuset to CPU 0, after which the kernel refuses any `sched_setaffinity`
//! to CPU 1. pinguard pins libvirt's domains through libvirt, so these
//! tests check both what the kernel says (/proc) and what libvirt says
//! (`virsh vcpupin`, `virsh emulatorpin`).
use std::time::Duration;

use testkit::{
    daemon::Daemon,
    guest::wait_for_only_qemu,
    libvirt::{Domain, Libvirtd, missing_libvirt, virsh},
    process::{Run, run_subcommand},
    require,
    threads::cpus_allowed,
    wait::wait_for,
};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn pin(args: &[&str]) -> Run {
    run_subcommand("pin", args, RUN_TIMEOUT)
}

/// `pinguard pin` manages every guest on the host: wait until only `d` runs.
fn only(d: &Domain) {
    wait_for_only_qemu(&[d.pid()]);
}

/// The cpuset of the domain's cgroup `leaf` (`vcpu0`, `emulator`), v1.
fn cgroup_cpus(d: &Domain, leaf: &str) -> String {
    let cgroup = std::fs::read_to_string(format!("/proc/{}/task/{}/cgroup", d.pid(), d.pid()))
        .unwrap_or_default();
    let path = cgroup
        .lines()
        .find_map(|l| l.split_once(":cpuset:").map(|(_, p)| p.to_string()))
        .unwrap_or_else(|| panic!("no cpuset cgroup for the domain: {cgroup}"));
    // The emulator's cgroup is a sibling of the vCPUs'.
    let domain_dir = std::path::Path::new("/sys/fs/cgroup/cpuset")
        .join(path.trim_start_matches('/'))
        .parent()
        .expect("the domain's cgroup")
        .to_path_buf();
    std::fs::read_to_string(domain_dir.join(leaf).join("cpuset.cpus"))
        .unwrap_or_else(|e| panic!("reading the cpuset of {leaf}: {e}"))
        .trim()
        .to_string()
}

#[test]
fn pin_goes_through_libvirt_even_when_its_cpuset_forbids_the_cpu() {
    require!(missing_libvirt());
    let _libvirtd = Libvirtd::ensure();
    let d = Domain::create("pg-lv-pin", 2);
    only(&d);
    let vcpus = d.vcpu_tids();
    // What an operator (or libvirt's own placement) did before: vCPU 0's
    // cgroup now holds CPU 0 only; a direct sched_setaffinity to CPU 1 fails.
    virsh(&["vcpupin", &d.name, "0", "0", "--live"]);
    assert_eq!(cgroup_cpus(&d, "vcpu0"), "0");

    // --persist on a transient domain: refused before anything changes.
    let r = pin(&["--guard", "1", "--allow-shared", "--persist"]);
    r.expect_code(2);
    assert!(
        r.stderr.contains("transient") && r.stderr.contains("nothing was changed"),
        "{}",
        r.stderr
    );
    assert_eq!(cpus_allowed(d.pid(), vcpus[0]), "0");

    let r = pin(&["--guard", "1", "--allow-shared"]);
    r.expect_code(0);
    assert!(r.stdout.contains("live only"), "{}", r.stdout);
    // The kernel, libvirt's view and libvirt's cgroups all agree.
    for (i, tid) in vcpus.iter().enumerate() {
        assert_eq!(cpus_allowed(d.pid(), *tid), "1", "vCPU {i}");
        assert_eq!(
            cgroup_cpus(&d, &format!("vcpu{i}")),
            "1",
            "vCPU {i}'s cgroup"
        );
    }
    assert_eq!(d.vcpupin(), ["1", "1"], "virsh vcpupin");
    assert_eq!(d.emulatorpin(), "0", "virsh emulatorpin");
    assert_eq!(cgroup_cpus(&d, "emulator"), "0");
    // Every other thread of QEMU is off the guarded CPU, including the ones
    // a vCPU thread created inside its own cgroup (KVM's NX huge page
    // recovery worker).
    for tid in testkit::host::tids(d.pid()) {
        if !vcpus.contains(&tid) {
            assert_eq!(cpus_allowed(d.pid(), tid), "0", "emulator thread {tid}");
        }
    }
    // The per-guest kernel thread of the in-kernel PIT goes with the emulator.
    let pit = testkit::host::processes(|comm| comm == format!("kvm-pit/{}", d.pid()))
        .first()
        .map(|(pid, _)| *pid);
    if let Some(pit) = pit {
        assert_eq!(cpus_allowed(pit, pit), "0", "kvm-pit/{}", d.pid());
    }
}

#[test]
fn the_enforcing_daemon_restores_a_vcpu_moved_with_virsh_and_libvirt_agrees() {
    require!(missing_libvirt());
    let _libvirtd = Libvirtd::ensure();
    let d = Domain::create("pg-lv-enforce", 1);
    only(&d);
    let vcpu = d.vcpu_tids()[0];
    let mut daemon = Daemon::start("mode = \"enforce\"\nverify_interval = \"200ms\"\n", &[]);
    let labels = [("vm", "pg-lv-enforce"), ("vcpu", "0")];
    daemon.wait_metric("the vCPU pinned", "pinguard_vcpu_pinned", &labels, |v| {
        v == 1.0
    });
    assert_eq!(d.vcpupin(), ["1"], "libvirt agrees after the first pin");

    // An operator moves the vCPU with libvirt: its cgroup now holds CPU 0 only.
    virsh(&["vcpupin", &d.name, "0", "0", "--live"]);
    wait_for(
        "the daemon to put the vCPU back on CPU 1 through libvirt",
        Duration::from_secs(10),
        || (cpus_allowed(d.pid(), vcpu) == "1" && d.vcpupin() == ["1"]).then_some(()),
    );
    assert_eq!(cgroup_cpus(&d, "vcpu0"), "1");
    daemon
        .process()
        .wait_stderr("re-pinned \"pg-lv-enforce\" vcpu 0", Duration::from_secs(5));
    let errors = daemon
        .metric("pinguard_enforcement_errors_total", &[])
        .unwrap_or(0.0);
    assert_eq!(errors, 0.0, "{}", daemon.process().stderr_tail());
}
