//! The latency lab's guest (`cargo xtask lab-guest`): each kernel flavour
//! boots from its kernel + initramfs alone, its qemu-guest-agent answers on
//! `org.qemu.guest_agent.0`, and cyclictest runs inside, on the guest's own
//! kernel (not the host's), PREEMPT_RT for the rt flavour.
//!
//! KVM first. On a host where KVM cannot boot a Linux kernel (this lab is a
//! nested guest whose KVM hangs in the kernel's real-mode setup code, right
//! after "Probing EDD") the same image is booted under TCG and the test says
//! so: what is tested then is the image and the agent, not KVM.
use testkit::{
    env::missing_kvm_guests,
    lab::{boot, images, lab_dir},
    require,
};

#[test]
fn both_kernels_boot_and_run_cyclictest_through_the_guest_agent() {
    require!(missing_kvm_guests());
    let Some(dir) = images() else {
        require!(Some(format!(
            "no lab guest in {} (run `cargo xtask lab-guest`)",
            lab_dir().display()
        )));
        return;
    };
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    for flavour in ["gp", "rt"] {
        let (vm, mut agent, accel) = boot(&dir.join(flavour), &format!("lab-{flavour}"), 1);
        let (code, uname, err) = agent.exec(&["uname", "-rv"]);
        assert_eq!(code, 0, "{flavour}: uname -rv failed: {err}");
        assert!(
            !uname.starts_with(host_release.trim()),
            "{flavour}: the guest runs the host's kernel {host_release:?}: {uname:?}"
        );
        assert_eq!(
            uname.contains("PREEMPT_RT"),
            flavour == "rt",
            "{flavour}: uname -v {uname:?}"
        );
        let (code, out, err) = agent.exec(&["cyclictest", "-q", "-D", "2", "-i", "1000", "-m"]);
        assert_eq!(code, 0, "{flavour}: cyclictest failed: {out}{err}");
        assert!(
            out.contains("T: 0") && out.contains("Max:"),
            "{flavour}: no cyclictest summary in {out:?} ({err})"
        );
        eprintln!(
            "lab_guest: {flavour} ({accel}): {} / {}",
            uname.trim(),
            out.lines().last().unwrap_or("").trim()
        );
        drop(vm);
    }
}
