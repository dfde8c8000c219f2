//! What the daemon's own configuration leaves out: the `culprit_naming` item.
//!
//! Not a property of the host's isolation, but an operator reading `check`
//! should learn that, by default, a drifted vCPU is reported without the name
//! of whoever changed its affinity, and what naming it costs.
use super::{Item, pass, warn};
use crate::host::Host;

pub const ID: &str = "culprit_naming";

/// The sched_setaffinity syscall tracepoints: on (`[observer]
/// affinity_syscalls = true`) and present, on but missing here, or off.
pub fn culprit_naming(host: &Host, affinity_syscalls: bool) -> Item {
    let events = host.sys.join("kernel/tracing/events/syscalls");
    let present = ["sys_enter_sched_setaffinity", "sys_exit_sched_setaffinity"]
        .iter()
        .all(|e| events.join(e).is_dir());
    match (affinity_syscalls, present) {
        (true, true) => pass(
            ID,
            "on: the sched_setaffinity syscall tracepoints name who changes a vCPU's affinity \
             (every syscall on the host takes the traced-syscall path, ~18 ns more here)",
        ),
        (true, false) => warn(
            ID,
            format!(
                "[observer] affinity_syscalls = true, but {} has no sched_setaffinity \
                 tracepoints: `pinguard run` will refuse to start",
                events.display()
            ),
            "mount tracefs (`mount -t tracefs nodev /sys/kernel/tracing`) on a kernel with \
             CONFIG_FTRACE_SYSCALLS, or set affinity_syscalls = false",
        ),
        (false, _) => pass(
            ID,
            "off (the default): a vCPU moved or widened off its CPU is still caught and \
             re-pinned, but its violation says \"changed by: unknown\"; to name the caller \
             set `[observer] affinity_syscalls = true` in the config and restart pinguard \
             (every syscall on the host then takes the traced-syscall path)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{super::Status, *};

    fn host_with_tracepoints(present: bool) -> (tempfile::TempDir, Host) {
        let tmp = tempfile::tempdir().unwrap();
        if present {
            for e in ["sys_enter_sched_setaffinity", "sys_exit_sched_setaffinity"] {
                std::fs::create_dir_all(
                    tmp.path()
                        .join("sys/kernel/tracing/events/syscalls")
                        .join(e),
                )
                .unwrap();
            }
        }
        let host = Host::under(tmp.path());
        (tmp, host)
    }

    #[test]
    fn off_by_default_says_how_to_turn_it_on() {
        let (_t, host) = host_with_tracepoints(true);
        let item = culprit_naming(&host, false);
        assert_eq!(item.status, Status::Pass);
        assert!(item.message.starts_with("off"), "{}", item.message);
        assert!(
            item.message.contains("affinity_syscalls = true"),
            "{}",
            item.message
        );
    }

    #[test]
    fn on_needs_the_tracepoints() {
        let (_t, host) = host_with_tracepoints(true);
        assert_eq!(culprit_naming(&host, true).status, Status::Pass);
        let (_t, host) = host_with_tracepoints(false);
        let item = culprit_naming(&host, true);
        assert_eq!(item.status, Status::Warn);
        assert!(item.fix.unwrap().contains("tracefs"));
    }
}
