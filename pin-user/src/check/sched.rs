//! Where the scheduler and the kernel's own work run: unbound workqueues,
//! the preemption model, RT throttling and timer migration.
use super::{Ctx, Item, fail, pass, read_opt, unreadable, warn};
use crate::host::{cpulist::CpuSet, procfs::Proc};

impl Ctx<'_> {
    pub(super) fn workqueue(&self) -> Item {
        const ID: &str = "workqueue";
        let g = self.guarded;
        let hk = self.housekeeping;
        let path = self.host.sys.join("devices/virtual/workqueue/cpumask");
        let fix = format!(
            "`echo {} > /sys/devices/virtual/workqueue/cpumask`; to keep it across reboots add workqueue.unbound_cpus={hk} (Linux 6.6+) {}",
            hk.to_mask(),
            self.boot.howto()
        );
        let text = match read_opt(&path) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return warn(
                    ID,
                    format!(
                        "{} is missing: cannot tell where unbound workqueue workers run",
                        path.display()
                    ),
                    "mount sysfs at /sys; kernels since 4.2 have this file",
                );
            }
            Err(e) => return unreadable(ID, &path, &e),
        };
        let mask = match CpuSet::parse_mask(&text) {
            Ok(m) => m,
            Err(e) => {
                return warn(ID, format!("cannot parse {}: {e}", path.display()), fix);
            }
        };
        if mask.intersects(g) {
            fail(
                ID,
                format!(
                    "unbound workqueue workers (kworker/u*) may run on guarded CPUs {} (cpumask {} = CPUs {mask})",
                    mask.intersection(g),
                    text.trim()
                ),
                fix,
            )
        } else {
            pass(
                ID,
                format!("unbound workqueue workers run on CPUs {mask} only"),
            )
        }
    }

    pub(super) fn preemption(&self) -> Item {
        const ID: &str = "preemption";
        let realtime = read_opt(&self.host.sys.join("kernel/realtime"))
            .ok()
            .flatten()
            .is_some_and(|s| s.trim() == "1");
        let version = read_opt(&self.host.proc.join("sys/kernel/version"))
            .ok()
            .flatten()
            .unwrap_or_default();
        let version = version.trim();
        let has_word = |w: &str| version.split_whitespace().any(|x| x == w);
        if realtime || has_word("PREEMPT_RT") {
            let how = if realtime {
                "/sys/kernel/realtime = 1"
            } else {
                "uname -v"
            };
            return pass(
                ID,
                format!(
                    "PREEMPT_RT kernel ({how}): host-side latency for real-time guests is bounded"
                ),
            );
        }
        // PREEMPT_DYNAMIC kernels report the active mode as "none (voluntary) full".
        let debugfs = read_opt(&self.host.sys.join("kernel/debug/sched/preempt"))
            .ok()
            .flatten()
            .and_then(|s| {
                let start = s.find('(')?;
                let end = s[start..].find(')')? + start;
                Some(s[start + 1..end].to_string())
            });
        let boot = self
            .cmdline
            .as_ref()
            .ok()
            .and_then(|c| c.get("preempt").flatten().map(str::to_string));
        let dynamic = has_word("PREEMPT_DYNAMIC");
        let (model, mode) = match (debugfs, boot) {
            (Some(m), _) => (format!("PREEMPT_DYNAMIC, mode {m}"), Some(m)),
            (None, Some(m)) => (format!("PREEMPT_DYNAMIC, preempt={m} at boot"), Some(m)),
            (None, None) if dynamic => (
                "PREEMPT_DYNAMIC, mode unknown: `mount -t debugfs none /sys/kernel/debug` to read /sys/kernel/debug/sched/preempt"
                    .to_string(),
                None,
            ),
            (None, None) if has_word("PREEMPT") => ("CONFIG_PREEMPT (full)".to_string(), Some("full".into())),
            (None, None) => ("voluntary or no preemption".to_string(), None),
        };
        let mut fix = "for real-time guests boot a PREEMPT_RT kernel (Debian: `apt install linux-image-rt-amd64`; RHEL: kernel-rt)".to_string();
        if dynamic && mode.as_deref() != Some("full") {
            fix.push_str(&format!(
                "; otherwise at least add preempt=full {}",
                self.boot.howto()
            ));
        }
        warn(
            ID,
            format!(
                "not a PREEMPT_RT kernel ({model}): fine for general-purpose guests, but host kernel paths can delay a real-time guest's vCPU for milliseconds"
            ),
            fix,
        )
    }

    pub(super) fn rt_throttling(&self) -> Item {
        const ID: &str = "sched_rt_runtime";
        let path = self.host.proc.join("sys/kernel/sched_rt_runtime_us");
        let text = match read_opt(&path) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return pass(
                    ID,
                    "no RT throttling sysctl on this kernel (kernel.sched_rt_runtime_us is absent)",
                );
            }
            Err(e) => return unreadable(ID, &path, &e),
        };
        let Ok(runtime) = text.trim().parse::<i64>() else {
            return warn(
                ID,
                format!("cannot parse {}: {:?}", path.display(), text.trim()),
                "`sysctl kernel.sched_rt_runtime_us` to inspect it",
            );
        };
        if runtime < 0 {
            let rt = self.realtime_threads_on_guarded();
            if !rt.is_empty() {
                return warn(
                    ID,
                    format!(
                        "RT throttling is off (kernel.sched_rt_runtime_us = -1) and real-time \
                         threads are confined to guarded CPUs: {}. While one of them runs, nothing \
                         of lower priority runs on its CPU, including that CPU's per-CPU kernel \
                         threads (ksoftirqd, kworkers, RCU): a real-time vCPU that never halts \
                         starves them, and the host stalls on them",
                        rt.join(", ")
                    ),
                    "keep RT vCPUs halting (idle=halt in the guest, not idle=poll), or turn \
                     throttling back on (`sysctl -w kernel.sched_rt_runtime_us=950000`), or keep \
                     per-CPU work off guarded CPUs (nohz_full=, rcu_nocbs=, isolcpus=)",
                );
            }
            return pass(
                ID,
                "RT throttling is off (kernel.sched_rt_runtime_us = -1): a SCHED_FIFO vCPU may use all of its guarded CPU; \
                 the trade-off is that a runaway real-time task can starve that CPU's kernel threads, so keep IRQs, \
                 RCU callbacks and workqueues off guarded CPUs",
            );
        }
        let period = read_opt(&self.host.proc.join("sys/kernel/sched_rt_period_us"))
            .ok()
            .flatten()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(1_000_000);
        warn(
            ID,
            format!(
                "RT throttling is on (kernel.sched_rt_runtime_us = {runtime} of {period} us): a SCHED_FIFO vCPU is descheduled for {} us every period. \
                 -1 turns throttling off, at the cost of no safety net against a runaway real-time task (fine when nothing else needs the guarded CPUs; \
                 irrelevant for SCHED_OTHER vCPUs)",
                (period - runtime).max(0)
            ),
            "`sysctl -w kernel.sched_rt_runtime_us=-1`; to keep it: `echo kernel.sched_rt_runtime_us=-1 > /etc/sysctl.d/90-pinguard.conf`",
        )
    }

    /// "tid 123 CPU 0/KVM (FF 1) on CPU 1" for every SCHED_FIFO/RR thread
    /// whose affinity lies within the guarded CPUs.
    fn realtime_threads_on_guarded(&self) -> Vec<String> {
        let proc = Proc::new(self.host.proc.clone());
        let Ok(threads) = proc.all_threads() else {
            return Vec::new();
        };
        threads
            .iter()
            .filter(|t| !t.is_kthread() && t.allowed.is_subset(self.guarded))
            .filter_map(|t| {
                let s = proc.sched(t.tgid, t.tid)?;
                s.is_realtime()
                    .then(|| format!("tid {} {:?} ({s}) on CPU {}", t.tid, t.comm, t.allowed))
            })
            .collect()
    }

    pub(super) fn timer_migration(&self) -> Item {
        const ID: &str = "timer_migration";
        let path = self.host.proc.join("sys/kernel/timer_migration");
        let text = match read_opt(&path) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return pass(
                    ID,
                    "no kernel.timer_migration on this kernel (built without NO_HZ_COMMON): timers stay on the CPU that armed them",
                );
            }
            Err(e) => return unreadable(ID, &path, &e),
        };
        match text.trim() {
            "0" => pass(
                ID,
                "kernel.timer_migration = 0: timers fire on the CPU that armed them",
            ),
            v => warn(
                ID,
                format!(
                    "kernel.timer_migration = {v}: idle CPUs hand their timers to busy CPUs, and a CPU running a vCPU is always busy, \
                     so housekeeping timers can fire on guarded CPUs {}{}; 0 keeps each timer on the CPU that armed it \
                     (at the cost of more wakeups of idle housekeeping CPUs)",
                    self.guarded,
                    if self.guarded.is_subset(&self.topo.nohz_full) {
                        " (less so here: kernels avoid nohz_full CPUs as timer targets)"
                    } else {
                        ""
                    }
                ),
                "`sysctl -w kernel.timer_migration=0`; to keep it: `echo kernel.timer_migration=0 > /etc/sysctl.d/90-pinguard.conf`",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::{Status, check, fixtures::*};
    use crate::host::Host;

    #[test]
    fn good_host_runs_preempt_rt() {
        let report = check(&fixture("intel-2s16c2t"), None).unwrap();
        assert!(
            report
                .item("preemption")
                .unwrap()
                .message
                .contains("PREEMPT_RT")
        );
    }

    #[test]
    fn bad_host_gets_sysctls_and_masks() {
        let report = check(&fixture("small-2cpu"), Some(&set("1"))).unwrap();
        let item = |id| report.item(id).unwrap();
        let wq = item("workqueue");
        assert!(
            wq.message.contains("guarded CPUs 1 (cpumask 3 = CPUs 0-1)"),
            "{}",
            wq.message
        );
        assert!(
            wq.fix
                .as_deref()
                .unwrap()
                .contains("echo 1 > /sys/devices/virtual/workqueue/cpumask")
        );

        let pre = item("preemption");
        assert!(
            pre.message.contains("PREEMPT_DYNAMIC, mode voluntary"),
            "{}",
            pre.message
        );
        assert!(pre.fix.as_deref().unwrap().contains("preempt=full"));

        let rt = item("sched_rt_runtime");
        assert!(
            rt.message.contains("950000 of 1000000 us"),
            "{}",
            rt.message
        );
        assert!(
            rt.message.contains("50000 us every period"),
            "{}",
            rt.message
        );
        assert!(
            rt.fix
                .as_deref()
                .unwrap()
                .contains("sysctl -w kernel.sched_rt_runtime_us=-1")
        );

        assert!(
            item("timer_migration")
                .fix
                .as_deref()
                .unwrap()
                .contains("sysctl -w kernel.timer_migration=0")
        );
    }

    #[test]
    fn unreadable_file_warns_instead_of_passing() {
        let dir = copy_fixture("small-2cpu");
        let p = dir.path().join("proc/sys/kernel/timer_migration");
        fs::remove_file(&p).unwrap();
        // A directory where a file should be: read_to_string fails with EISDIR.
        fs::create_dir(&p).unwrap();
        let report = check(&Host::under(dir.path()), Some(&set("1"))).unwrap();
        let item = report.item("timer_migration").unwrap();
        assert_eq!(item.status, Status::Warn);
        assert!(item.message.contains("cannot read"), "{}", item.message);
    }
}
