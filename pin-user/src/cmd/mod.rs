//! Subcommands: the binary edge. Each returns the process exit code.
pub mod attach;
pub mod audit;
pub mod check;
pub mod cleanup;
pub mod completions;
pub mod isolate;
pub mod lab;
pub mod latency;
mod latency_vm;
pub mod manpages;
pub mod pin;
pub mod policy;
pub mod run;
pub mod top;
pub mod watch;

use anyhow::Context as _;

use crate::{host::cpulist::CpuSet, host::procfs::Proc};

/// Moves every thread of this process onto `cpus` (the housekeeping set), so
/// pinguard never runs on the CPUs it guards. Threads created later (tokio
/// workers, blocking pool) inherit the affinity, so call this before starting
/// the runtime.
pub fn move_self_to(cpus: &CpuSet) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for cpu in cpus.iter() {
        set.set(cpu as usize)
            .with_context(|| format!("CPU {cpu} does not fit in a cpu_set_t"))?;
    }
    let me = std::process::id();
    for tid in Proc::default().tids(me)? {
        let pid = nix::unistd::Pid::from_raw(tid as i32);
        nix::sched::sched_setaffinity(pid, &set)
            .with_context(|| format!("moving pinguard thread {tid} to housekeeping CPUs {cpus}"))?;
    }
    Ok(())
}

/// A single-threaded tokio runtime: pinguard's work is small and latency-tolerant,
/// and one thread on a housekeeping CPU is the least intrusive footprint.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Validates `--owner CPU=TID` pairs: the CPU is guarded and the thread exists.
pub fn check_owners(guarded: &CpuSet, owners: &[(u32, u32)]) -> anyhow::Result<()> {
    let proc = Proc::default();
    for &(cpu, tid) in owners {
        if !guarded.contains(cpu) {
            anyhow::bail!(
                "--owner {cpu}={tid}: CPU {cpu} is not guarded (guarded CPUs: {guarded})"
            );
        }
        if proc.tgid_of(tid)?.is_none() {
            anyhow::bail!("--owner {cpu}={tid}: no thread with id {tid} exists");
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_stop() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
