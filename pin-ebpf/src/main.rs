//! pinguard's in-kernel observer.
//!
//! Every context switch on a guarded CPU attributes the slice that just ended
//! to the thread that ran it (`sched_switch`: `current` is still `prev` there),
//! classifies it (owner vCPU / per-CPU kernel thread / allowed / intruder) and
//! aggregates in maps. Only what is rare and new — an intruder first seen on a
//! CPU, a migration onto a guarded CPU, an owner leaving its CPU, someone
//! changing a vCPU's affinity — goes to userspace through the ring buffer.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod affinity;
#[cfg(target_arch = "bpf")]
mod empty;
#[cfg(target_arch = "bpf")]
mod lifecycle;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod migrate;
#[cfg(target_arch = "bpf")]
mod noise;
#[cfg(target_arch = "bpf")]
mod switch;
#[cfg(target_arch = "bpf")]
mod task;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a panic, so this is never run.
    loop {}
}

/// Reading task_struct and using bpf_probe_read require a GPL-compatible license.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// The host build of this crate (used only so `cargo` workspace commands work) is empty.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
