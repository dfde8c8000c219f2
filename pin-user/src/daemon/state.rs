//! The daemon's decisions: guest inventory, CPU ownership, classification of
//! kernel events into violations, enforcement with back-off, and the metrics
//! the daemon itself owns.
//!
//! Events, ticks and rescans come in; everything the decisions do to the
//! world goes through [`Effects`] (the probe's maps, affinities, /proc,
//! discovery, the clock), so the unit tests below drive it with a fake host.
//! Everything runs on one thread: the state needs no locks.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use crate::{
    bpf::{
        class::ThreadClass,
        events::{AFFINITY_EVENT_CPUS, AffinityChange, Intrusion, KernelEvent, Migration, Thread},
    },
    config::{Config, Mode},
    control::{Allow, DaemonInfo, Reply, Request},
    daemon::{
        collector::{VcpuLabel, VcpuTable},
        effects::{Discovered, Effects},
        metrics::Metrics,
        violation::{Recent, Violation, ViolationKind},
    },
    guests::{DiscoverOptions, Discovery, Guest, Manager},
    host::{
        affinity::AffinityError,
        cpulist::CpuSet,
        topology::{Guard, Topology},
    },
    isolate::{
        self, IsolateError,
        apply::Outcome,
        state::{State, Store},
    },
    placement::{
        apply::{self, OnFailure, Status},
        enforce::{self, Limiter},
        place::Target,
        plan::{self, Role},
    },
};

/// A vCPU thread and the guarded CPU it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Assignment {
    vm: String,
    pid: u32,
    vcpu: u32,
    cpu: u32,
    manager: Manager,
}

/// The runtime isolation the daemon keeps (`isolation = "runtime"`).
struct Upkeep {
    store: Store,
    /// What was changed, with the values from before: the state file's content.
    state: State,
    /// Targets whose repair failed: logged once until it works again.
    failing: HashSet<String>,
}

/// Threads a client of the control socket registered on a guarded CPU
/// (`pinguard latency`'s cyclictest): allowed there while its connection
/// is open and the registered process is the one that registered.
#[derive(Debug, Clone)]
struct Registration {
    conn: u64,
    allow: Allow,
    /// Threads allowed in the kernel because of it.
    allowed: HashSet<u32>,
}

/// A guest process to look at again (it just exec'ed, or a thread vanished).
#[derive(Debug, Clone, Copy)]
struct Retry {
    due: std::time::Instant,
    attempt: u32,
}

/// Back-off schedule after an exec: QEMU creates its vCPU threads and QMP
/// socket during start-up, so look again a few times.
const RETRY_DELAYS_MS: [u64; 6] = [100, 300, 1000, 3000, 10_000, 30_000];

/// How long the threads of a guest whose main thread exited are left alone:
/// its other threads tear down (and may still run on its CPU) after the
/// leader's exit event, when /proc no longer shows the process's KVM fds.
const EXITED_GRACE: Duration = Duration::from_secs(10);

/// Log lines about single threads (violations, evictions): a burst of
/// [`LOG_BURST`] (a daemon starting on a busy host), then [`LOG_LINES_PER_SEC`].
/// Under thread churn every new id is one, and the journal must not grow by
/// a hundred megabytes an hour. The counters and /violations keep them all.
const LOG_BURST: f64 = 200.0;
const LOG_LINES_PER_SEC: f64 = 5.0;

/// A token bucket for those lines.
#[derive(Debug)]
struct LogBudget {
    tokens: f64,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self {
            tokens: LOG_BURST,
            last: None,
            suppressed: 0,
        }
    }
}

impl LogBudget {
    fn allow(&mut self, now: std::time::Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * LOG_LINES_PER_SEC;
            self.tokens = (self.tokens + refill).min(LOG_BURST);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// A retry whose rediscovery is running is due again only if no answer came
/// (the discovery thread is stuck on something the deadlines did not catch).
const IN_FLIGHT: Duration = Duration::from_secs(60);

/// Appended to a drift's detail when the affinity syscalls are not traced.
pub const CULPRIT_UNKNOWN: &str = "; changed by: unknown (affinity syscall tracing off; \
     `[observer] affinity_syscalls = true` names the caller)";

/// How long after a guarded CPU went or came back a refused affinity is the
/// hotplug's doing (cpusets are updated after the CPU itself), not an error.
const HOTPLUG_SETTLE: Duration = Duration::from_secs(2);

/// How many (kind, CPU, thread) triples are remembered as already logged.
const LOGGED_MAX: usize = 65536;

pub struct Daemon<E: Effects> {
    pub config: Config,
    topo: Topology,
    guard: Guard,
    fx: E,
    metrics: Arc<Metrics>,
    recent: Recent,
    /// vCPU tid -> labels, for the collector's per-vCPU series.
    vcpu_table: VcpuTable,
    guests: BTreeMap<u32, Guest>,
    /// vCPU tid -> assignment.
    assignments: BTreeMap<u32, Assignment>,
    /// vCPU tid -> whether its affinity equalled its assignment at the last check.
    pinned: HashMap<u32, bool>,
    /// vCPU tid -> its start time when it was assigned: a tid reused by
    /// another thread (the exit event lost) is never acted on.
    started: HashMap<u32, u64>,
    retries: BTreeMap<u32, Retry>,
    /// Full rescans scheduled after a QEMU exec: with `-daemonize` the guest
    /// is a forked child whose pid the exec event cannot name.
    scan_retry: Option<Retry>,
    /// A full scan is running (on the discovery thread).
    scanning: Option<std::time::Instant>,
    /// Another full scan was asked for while one ran: what it saw may be stale.
    scan_again: bool,
    /// Processes being looked at again.
    rediscovering: HashSet<u32>,
    limiter: Limiter,
    /// (kind, cpu, tid) already logged: each violation is logged once.
    logged: HashSet<(ViolationKind, u32, u32)>,
    log_budget: LogBudget,
    /// CPUs the current plan makes vCPUs share.
    shared: CpuSet,
    /// Emulator threads allowlisted in the kernel because the plan puts them on guarded CPUs.
    emulators_allowed: HashSet<u32>,
    /// Guarded CPUs that are offline (hotplug).
    offline: CpuSet,
    /// When a guarded CPU last went offline or came back.
    hotplug: Option<std::time::Instant>,
    /// Guests whose main thread exited, and when.
    exited: HashMap<u32, std::time::Instant>,
    /// Guest pids registered in the kernel's GUESTS map (exit notification).
    guests_watched: HashSet<u32>,
    /// Names of the guests known at the last re-plan: a name that is gone
    /// takes its per-VM series with it, so churning guests do not grow the
    /// label set without bound.
    vm_names: HashSet<String>,
    isolation: Option<Upkeep>,
    /// What clients of the control socket registered.
    registrations: Vec<Registration>,
    ticks: u64,
}

pub fn discover_options(config: &Config) -> DiscoverOptions {
    DiscoverOptions {
        qmp: config.qmp.clone(),
        ..DiscoverOptions::default()
    }
}

impl<E: Effects> Daemon<E> {
    pub fn new(
        config: Config,
        topo: Topology,
        guard: Guard,
        fx: E,
        metrics: Arc<Metrics>,
        recent: Recent,
        vcpu_table: VcpuTable,
    ) -> Self {
        let limiter = Limiter::new(config.min_interval, config.max_backoff);
        let d = Self {
            topo,
            guard,
            fx,
            metrics,
            recent,
            vcpu_table,
            guests: BTreeMap::new(),
            assignments: BTreeMap::new(),
            pinned: HashMap::new(),
            started: HashMap::new(),
            retries: BTreeMap::new(),
            scan_retry: None,
            scanning: None,
            scan_again: false,
            rediscovering: HashSet::new(),
            limiter,
            logged: HashSet::new(),
            log_budget: LogBudget::default(),
            shared: CpuSet::new(),
            emulators_allowed: HashSet::new(),
            exited: HashMap::new(),
            offline: CpuSet::new(),
            hotplug: None,
            guests_watched: HashSet::new(),
            vm_names: HashSet::new(),
            isolation: None,
            registrations: Vec::new(),
            ticks: 0,
            config,
        };
        d.metrics.publish_static(&d.guard.guarded, d.config.mode);
        d
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Applies a reloaded configuration. The guarded set and listen address
    /// need a restart; everything else takes effect now.
    pub fn reload(&mut self, mut config: Config) -> Result<(), String> {
        if config.mode != self.config.mode && !config.mode_explicit {
            // An empty or truncated file is all defaults: it must not switch
            // enforcement off (or on) by saying nothing.
            return Err(format!(
                "the new configuration does not set `mode` and would switch the daemon from {} to {} \
                 (an empty or truncated file?); write `mode = \"{}\"` to change it",
                self.config.mode.as_str(),
                config.mode.as_str(),
                config.mode.as_str()
            ));
        }
        let guard = self
            .topo
            .guard(config.guard.as_ref().or(self.config.guard.as_ref()))
            .map_err(|e| e.to_string())?;
        if guard != self.guard {
            return Err(format!(
                "the guarded CPUs cannot change on reload (running with {}, config says {}); restart pinguard",
                self.guard.guarded, guard.guarded
            ));
        }
        // These are fixed when the daemon starts (timers, the eBPF object's
        // globals, the statistics fd): say so instead of pretending.
        let old = &self.config;
        let fixed = [
            (
                "verify_interval",
                old.verify_interval != config.verify_interval,
            ),
            (
                "rescan_interval",
                old.rescan_interval != config.rescan_interval,
            ),
            (
                "event_interval",
                old.event_interval != config.event_interval,
            ),
            ("bpf_stats", old.bpf_stats != config.bpf_stats),
            ("isolation", old.isolation != config.isolation),
            (
                "isolation_interval",
                old.isolation_interval != config.isolation_interval,
            ),
            ("listen", old.listen != config.listen),
            (
                "observer.affinity_syscalls",
                old.affinity_syscalls != config.affinity_syscalls,
            ),
        ];
        for (key, changed) in fixed {
            if changed {
                log::warn!("reload: `{key}` changed but takes effect only after a restart");
            }
        }
        // What is attached, not what the file now says: violations tell
        // whether a culprit could have been named.
        config.affinity_syscalls = old.affinity_syscalls;
        // Keep the back-off state unless its parameters changed: a reload must
        // not restart a fight with another tool at full rate.
        if (old.min_interval, old.max_backoff) != (config.min_interval, config.max_backoff) {
            self.limiter = Limiter::new(config.min_interval, config.max_backoff);
        }
        self.fx.set_discover_options(discover_options(&config));
        // Allowances came from the old `[[allow]]` rules: drop them and let the
        // new rules allow threads again as they show up.
        if let Ok(allowed) = self.fx.allowed() {
            for tid in allowed
                .into_iter()
                .filter(|t| !self.emulators_allowed.contains(t))
            {
                let _ = self.fx.remove_allowed(tid);
            }
        }
        self.config = config;
        self.metrics
            .publish_static(&self.guard.guarded, self.config.mode);
        self.rescan();
        Ok(())
    }

    fn record(&mut self, v: Violation) {
        self.metrics
            .violations
            .with_label_values(&[&v.cpu.to_string(), v.kind.as_str()])
            .inc();
        if self.logged.len() > LOGGED_MAX {
            self.logged.clear();
        }
        if self.logged.insert((v.kind, v.cpu, v.tid)) && self.log_budget.allow(self.fx.now()) {
            log::warn!("{v}");
        }
        self.recent.push(v);
    }

    /// Asks for a full rescan of /proc (start-up, SIGHUP, a periodic safety
    /// net, after an exec). One runs at a time; one asked for meanwhile runs
    /// after it.
    pub fn rescan(&mut self) {
        if self.scanning.is_some() {
            self.scan_again = true;
            return;
        }
        self.scanning = Some(self.fx.now());
        self.metrics.discovery_scans.inc();
        self.fx.request_scan();
    }

    /// A discovery result from the discovery thread.
    pub fn discovered(&mut self, result: Discovered) {
        match result {
            Discovered::Scan(r) => {
                self.scanning = None;
                match r {
                    Ok(d) => self.apply_discovery(d, None),
                    Err(e) => {
                        self.metrics.discovery_errors.inc();
                        log::error!("guest discovery failed: {e}");
                    }
                }
                if std::mem::take(&mut self.scan_again) {
                    self.rescan();
                }
            }
            Discovered::Pid(pid, r) => {
                self.rediscovering.remove(&pid);
                match r {
                    Ok(d) => self.apply_discovery(d, Some(pid)),
                    Err(e) => {
                        self.retries.remove(&pid);
                        self.metrics.discovery_errors.inc();
                        log::warn!("rediscovering pid {pid}: {e}");
                    }
                }
            }
        }
    }

    /// Merges a discovery result (of everything, or of one pid) and re-plans.
    fn apply_discovery(&mut self, d: Discovery, only: Option<u32>) {
        for w in &d.warnings {
            log::debug!("discovery: {w}");
        }
        for e in &d.errors {
            self.metrics.discovery_errors.inc();
            log::warn!("discovery: {e}");
        }
        match only {
            None => {
                self.guests = d.guests.into_iter().map(|g| (g.pid, g)).collect();
            }
            Some(pid) => {
                self.guests.remove(&pid);
                for g in d.guests {
                    self.guests.insert(g.pid, g);
                }
                // Still no vCPUs: QEMU may still be starting; look again later.
                let found = self.guests.get(&pid).is_some_and(|g| !g.vcpus.is_empty());
                if found {
                    self.retries.remove(&pid);
                } else {
                    let now = self.fx.now();
                    if let Some(r) = self.retries.get_mut(&pid) {
                        r.attempt += 1;
                        match RETRY_DELAYS_MS.get(r.attempt as usize) {
                            Some(ms) => r.due = now + Duration::from_millis(*ms),
                            None => {
                                self.retries.remove(&pid);
                            }
                        }
                    }
                }
            }
        }
        self.replan();
    }

    /// Computes ownership from the guests and (in enforce mode) applies it.
    fn replan(&mut self) {
        let guests: Vec<Guest> = self.guests.values().cloned().collect();
        let mut current = BTreeMap::new();
        for g in &guests {
            for tid in g.tids() {
                match self.fx.get(tid) {
                    Ok(set) => {
                        current.insert(tid, set);
                    }
                    Err(e) if e.is_gone() => self.metrics.tasks_vanished.inc(),
                    Err(e) => log::debug!("affinity of {tid}: {e}"),
                }
            }
        }
        // Configured placements apply to guests that are running now.
        let names: HashSet<&str> = guests.iter().map(|g| g.name.as_str()).collect();
        let mut opts = self.config.plan_options();
        opts.vm.retain(|(n, _)| names.contains(n.as_str()));
        let plan = match plan::plan(&self.topo, &self.guard, &guests, &current, &opts) {
            Ok(p) => p,
            Err(e) => {
                // A daemon keeps going: place what it can, sharing CPUs, and say so.
                log::error!("placement: {e}; falling back to sharing guarded CPUs");
                opts.allow_shared = true;
                opts.vm.clear();
                match plan::plan(&self.topo, &self.guard, &guests, &current, &opts) {
                    Ok(p) => p,
                    Err(e) => {
                        log::error!("placement impossible: {e}");
                        return;
                    }
                }
            }
        };
        for w in &plan.warnings {
            log::info!("placement: {w}");
        }
        let mut next: BTreeMap<u32, Assignment> = BTreeMap::new();
        for e in plan.entries.iter().filter(|e| e.role == Role::Vcpu) {
            let (Some(vcpu), Some(cpu)) = (e.vcpu, e.to.first()) else {
                continue;
            };
            next.insert(
                e.tid,
                Assignment {
                    vm: e.vm.clone(),
                    pid: e.pid,
                    vcpu,
                    cpu,
                    manager: e.manager,
                },
            );
        }
        // Tell the kernel who owns what before moving anything: a vCPU that
        // runs on its CPU right after the move must already count as its owner.
        self.set_assignments(next);
        self.allow_emulators(&plan);
        if self.config.mode == Mode::Enforce {
            // Nothing goes to a guarded CPU that is offline (hotplug): the
            // kernel would refuse, and verification re-pins when it is back.
            self.check_online();
            let mut plan = plan.clone();
            for e in plan.entries.iter_mut() {
                if e.to.is_subset(&self.offline) {
                    e.change = false;
                }
            }
            // Never fails with `Continue`: failures are in the result.
            if let Ok(applied) = apply::apply(&plan, &mut self.fx, OnFailure::Continue) {
                for (e, status) in plan.entries.iter().zip(&applied.statuses) {
                    match status {
                        Status::Applied => {
                            if e.role == Role::Vcpu {
                                self.metrics.repins.with_label_values(&[&e.vm]).inc();
                            }
                            log::info!(
                                "pinned {:?} {} (tid {}) to CPUs {} (was {})",
                                e.vm,
                                role_name(e),
                                e.tid,
                                e.to,
                                e.from
                            );
                        }
                        Status::Vanished => self.metrics.tasks_vanished.inc(),
                        _ => {}
                    }
                }
                for (i, err) in &applied.failures {
                    let what = apply::describe(&plan.entries[*i]);
                    self.enforcement_error("pin", &what, err);
                }
            }
        }
        // Two vCPUs on one CPU cannot both have it to themselves. Reported when
        // a CPU becomes shared, not again at every re-plan.
        let newly_shared = plan.shared_cpus.difference(&self.shared);
        self.shared = plan.shared_cpus.clone();
        for cpu in newly_shared.iter() {
            let sharing: Vec<String> = self
                .assignments
                .iter()
                .filter(|(_, a)| a.cpu == cpu)
                .map(|(tid, a)| format!("{} vcpu {} (tid {tid})", a.vm, a.vcpu))
                .collect();
            self.record(Violation::new(
                ViolationKind::SharedCpu,
                cpu,
                0,
                0,
                "",
                format!("vCPUs share this CPU: {}", sharing.join(", ")),
            ));
        }
        self.verify_pins();
    }

    /// Brings the kernel's maps, the collector's vCPU table and the placement
    /// metrics in line with `next`.
    fn set_assignments(&mut self, next: BTreeMap<u32, Assignment>) {
        let m = self.metrics.clone();
        for (tid, old) in &self.assignments {
            if next.get(tid) != Some(old) {
                let _ = m.vcpu_info.remove_label_values(&[
                    &old.vm,
                    &old.vcpu.to_string(),
                    &old.cpu.to_string(),
                ]);
                let _ = m
                    .vcpu_pinned
                    .remove_label_values(&[&old.vm, &old.vcpu.to_string()]);
                if !next.contains_key(tid) {
                    self.pinned.remove(tid);
                    self.started.remove(tid);
                    self.limiter.forget(*tid);
                    if let Err(e) = self.fx.remove_owner(*tid) {
                        log::warn!("removing owner {tid}: {e}");
                    }
                    let _ = self.fx.remove_watched(*tid);
                }
            }
        }
        for (tid, a) in &next {
            if self.assignments.get(tid) != Some(a) {
                match self.fx.start_time(a.pid, *tid) {
                    Some(t) => {
                        self.started.insert(*tid, t);
                    }
                    None => {
                        self.started.remove(tid);
                    }
                }
                if let Err(e) = self.fx.set_owner(*tid, a.cpu) {
                    log::error!(
                        "registering vCPU thread {tid} as owner of CPU {}: {e}",
                        a.cpu
                    );
                }
                if let Err(e) = self.fx.set_watched(*tid) {
                    log::warn!("measuring the waits of vCPU thread {tid}: {e}");
                }
            }
            m.vcpu_info
                .with_label_values(&[&a.vm, &a.vcpu.to_string(), &a.cpu.to_string()])
                .set(1);
        }
        self.vcpu_table.replace(
            next.iter()
                .map(|(tid, a)| {
                    let label = VcpuLabel {
                        vm: a.vm.clone(),
                        vcpu: a.vcpu,
                    };
                    (*tid, label)
                })
                .collect(),
        );
        let new_pids: HashSet<u32> = self.guests.keys().copied().collect();
        for pid in self.guests_watched.difference(&new_pids) {
            let _ = self.fx.remove_guest(*pid);
        }
        for pid in new_pids.difference(&self.guests_watched) {
            if let Err(e) = self.fx.set_guest(*pid) {
                log::warn!("watching guest {pid} for exit: {e}");
            }
        }
        self.guests_watched = new_pids;
        self.assignments = next;
        m.vms.set(self.guests.len() as i64);
        let names: HashSet<String> = self.guests.values().map(|g| g.name.clone()).collect();
        for gone in self.vm_names.difference(&names) {
            let _ = m.repins.remove_label_values(&[gone]);
        }
        self.vm_names = names;
    }

    /// Emulator threads the plan puts on guarded CPUs (`--emulator with-vcpu0`
    /// or a CPU list) are there by design: allowlist them in the kernel, and
    /// drop the allowance when the plan no longer does so.
    fn allow_emulators(&mut self, plan: &plan::Plan) {
        let mut now: HashSet<u32> = HashSet::new();
        for e in plan.entries.iter().filter(|e| e.role == Role::Emulator) {
            let on_guarded = e.to.intersection(&self.guard.guarded);
            if on_guarded.is_empty() {
                continue;
            }
            let cpu = if on_guarded.len() == 1 {
                on_guarded.first()
            } else {
                None
            };
            if let Err(err) = self.fx.set_allowed(e.tid, cpu) {
                log::warn!(
                    "allowing emulator thread {} on CPUs {on_guarded}: {err}",
                    e.tid
                );
            }
            now.insert(e.tid);
        }
        for tid in self.emulators_allowed.difference(&now) {
            let _ = self.fx.remove_allowed(*tid);
        }
        self.emulators_allowed = now;
    }

    /// Counts a failed action by errno and logs it with what it was about.
    fn enforcement_error(&mut self, action: &str, what: &str, err: &AffinityError) {
        if err.is_gone() {
            // The thread exited under us: normal, counted, not an error.
            self.metrics.tasks_vanished.inc();
            return;
        }
        let settling = self
            .hotplug
            .is_some_and(|at| self.fx.now().saturating_duration_since(at) < HOTPLUG_SETTLE);
        if settling
            && matches!(
                err,
                AffinityError::Invalid { .. } | AffinityError::Mismatch { .. }
            )
        {
            // A CPU just went or came back: the kernel's cpusets catch up
            // asynchronously. The back-off retries; not an error.
            log::debug!("{action} of {what} during CPU hotplug: {err}");
            return;
        }
        self.metrics
            .enforcement_errors
            .with_label_values(&[action, &err.errno_name()])
            .inc();
        log::warn!("{action} of {what} failed: {err}");
    }

    /// Checks every vCPU's affinity against its assignment (and re-pins in enforce mode).
    fn verify_pins(&mut self) {
        let tids: Vec<u32> = self.assignments.keys().copied().collect();
        for tid in tids {
            self.verify_one(tid, false);
        }
    }

    /// `explained`: an event already reported why the vCPU moved.
    fn verify_one(&mut self, tid: u32, explained: bool) {
        let Some(a) = self.assignments.get(&tid).cloned() else {
            return;
        };
        if !self.same_thread(tid, &a) {
            // Exited, or its id now names another thread: never act on it.
            self.metrics.tasks_vanished.inc();
            self.schedule_retry(a.pid, 0);
            return;
        }
        if self.offline.contains(a.cpu) {
            // The kernel moved it off its offline CPU; nothing to do until it is back.
            self.mark_unpinned(tid, &a);
            return;
        }
        let want = CpuSet::single(a.cpu);
        let have = match self.fx.get(tid) {
            Ok(s) => s,
            Err(e) if e.is_gone() => {
                self.metrics.tasks_vanished.inc();
                self.schedule_retry(a.pid, 0);
                return;
            }
            Err(e) => {
                log::warn!("reading affinity of vCPU thread {tid}: {e}");
                return;
            }
        };
        let ok = have == want;
        if !ok {
            // Off its CPU: hotplug may have just taken that CPU away (the
            // kernel moves the vCPU at once, before the next tick looks).
            self.check_online();
            if self.offline.contains(a.cpu) {
                self.mark_unpinned(tid, &a);
                return;
            }
        }
        let was = self.pinned.insert(tid, ok);
        self.metrics
            .vcpu_pinned
            .with_label_values(&[a.vm.as_str(), &a.vcpu.to_string()])
            .set(i64::from(ok));
        if ok {
            return;
        }
        // A drift is reported when it starts, not every second; when an event
        // explains it (affinity change, migration), its handler has reported it.
        if was != Some(false) && !explained {
            let comm = self.fx.comm(a.pid, tid).unwrap_or_default();
            let detail = format!(
                "affinity is {have}, assigned {want}{}",
                self.culprit_unknown()
            );
            self.record(
                Violation::new(ViolationKind::VcpuDrift, a.cpu, tid, a.pid, &comm, detail)
                    .of_vcpu(&a.vm, a.vcpu),
            );
        }
        if self.config.mode == Mode::Enforce {
            self.repin(tid, &a);
        }
    }

    /// What a drift's detail says about its culprit when no syscall
    /// tracepoint could have named it (with them, an `affinity_changed`
    /// violation names the caller).
    fn culprit_unknown(&self) -> &'static str {
        if self.config.affinity_syscalls {
            ""
        } else {
            CULPRIT_UNKNOWN
        }
    }

    /// Whether `tid` is still the vCPU thread that was assigned: in the same
    /// process, with the same start time.
    fn same_thread(&mut self, tid: u32, a: &Assignment) -> bool {
        let Some(now) = self.fx.start_time(a.pid, tid) else {
            return false;
        };
        *self.started.entry(tid).or_insert(now) == now
    }

    fn mark_unpinned(&mut self, tid: u32, a: &Assignment) {
        self.pinned.insert(tid, false);
        self.metrics
            .vcpu_pinned
            .with_label_values(&[a.vm.as_str(), &a.vcpu.to_string()])
            .set(0);
    }

    fn repin(&mut self, tid: u32, a: &Assignment) {
        if let Err(wait) = self.limiter.check(tid, self.fx.now()) {
            log::debug!("not re-pinning {tid} for another {wait:?} (back-off)");
            return;
        }
        let target = Target {
            vm: &a.vm,
            pid: a.pid,
            vcpu: Some(a.vcpu),
            tid,
            manager: a.manager,
        };
        match self.fx.place(&target, &CpuSet::single(a.cpu)) {
            Ok(()) => {
                self.metrics.repins.with_label_values(&[&a.vm]).inc();
                self.pinned.insert(tid, true);
                self.metrics
                    .vcpu_pinned
                    .with_label_values(&[a.vm.as_str(), &a.vcpu.to_string()])
                    .set(1);
                log::info!(
                    "re-pinned {:?} vcpu {} (tid {tid}) to CPU {}",
                    a.vm,
                    a.vcpu,
                    a.cpu
                );
            }
            Err(e) => {
                let what = format!("{:?} vcpu {} (tid {tid})", a.vm, a.vcpu);
                self.enforcement_error("repin", &what, &e);
            }
        }
    }

    fn schedule_retry(&mut self, pid: u32, attempt: u32) {
        let ms = RETRY_DELAYS_MS[(attempt as usize).min(RETRY_DELAYS_MS.len() - 1)];
        let due = self.fx.now() + Duration::from_millis(ms);
        self.retries.entry(pid).or_insert(Retry { due, attempt });
    }

    /// Handles one event from the kernel.
    pub fn handle(&mut self, ev: &KernelEvent) {
        match ev {
            KernelEvent::Intrusion(i) => self.on_intrusion(i),
            KernelEvent::MigrateIn(m) => self.on_migrate_in(m),
            KernelEvent::OwnerAway(m) => self.on_owner_away(m),
            KernelEvent::AffinityChange(c) => self.on_affinity_change(c),
            KernelEvent::Exec(p) => {
                log::debug!(
                    "exec of {:?} (pid {}): looking for a new guest",
                    p.thread.comm,
                    p.thread.tgid
                );
                self.scan_retry = Some(Retry {
                    due: self.fx.now() + Duration::from_millis(RETRY_DELAYS_MS[0]),
                    attempt: 0,
                });
            }
            KernelEvent::Exit(p) => self.on_exit(&p.thread),
            // Latency-probe events: the daemon watches no probe.
            KernelEvent::Episode(_) | KernelEvent::Irq(_) | KernelEvent::Softirq(_) => {}
        }
    }

    fn on_owner_away(&mut self, m: &Migration) {
        let t = &m.thread;
        // The kernel named the CPU it knew; a re-plan may already have
        // moved the vCPU (then this is pinguard's own move).
        if let Some(a) = self.assignments.get(&t.tid).cloned()
            && m.from_cpu == a.cpu
            && m.to_cpu != a.cpu
        {
            self.record(
                Violation::new(
                    ViolationKind::VcpuDrift,
                    a.cpu,
                    t.tid,
                    t.tgid,
                    &t.comm,
                    format!(
                        "left its CPU {} for CPU {}{}",
                        a.cpu,
                        m.to_cpu,
                        self.culprit_unknown()
                    ),
                )
                .of_vcpu(&a.vm, a.vcpu),
            );
            self.pinned.insert(t.tid, false);
            self.verify_one(t.tid, true);
        }
    }

    /// The new affinity of an [`AffinityChange`]. The event carries only the
    /// mask's first [`AFFINITY_EVENT_CPUS`] CPUs; on a host with more (CPU
    /// ids up to `MAX_CPUS`) that prefix cannot tell "CPU 100 only" from
    /// "nothing", nor "CPU 1 only" from "CPUs 1 and 100". The event is sent at
    /// syscall exit, so the thread's affinity now is that mask (unless it
    /// changed again since, which another event then reports).
    fn full_mask(&self, c: &AffinityChange) -> CpuSet {
        if self
            .topo
            .online
            .last()
            .is_none_or(|l| l < AFFINITY_EVENT_CPUS)
        {
            return c.mask.clone();
        }
        self.fx.get(c.target_tid).unwrap_or_else(|_| c.mask.clone())
    }

    fn on_affinity_change(&mut self, c: &AffinityChange) {
        let target = c.target_tid;
        let t = &c.caller;
        if let Some(a) = self.assignments.get(&target).cloned() {
            let mask = self.full_mask(c);
            // Setting a vCPU to exactly its assigned CPU satisfies the plan,
            // whoever does it: `pinguard pin`, or libvirt when pinguard
            // pins through it.
            if mask == CpuSet::single(a.cpu) {
                self.verify_one(target, true);
                return;
            }
            self.record(
                Violation::new(
                    ViolationKind::AffinityChanged,
                    a.cpu,
                    t.tid,
                    t.tgid,
                    &t.comm,
                    format!(
                        "{:?} (pid {}) set the affinity of {:?} vcpu {} (tid {target}) to {}",
                        t.comm, t.tgid, a.vm, a.vcpu, mask
                    ),
                )
                .of_vcpu(&a.vm, a.vcpu),
            );
            self.verify_one(target, true);
        }
    }

    fn on_exit(&mut self, t: &Thread) {
        if t.tid == t.tgid && self.guests.contains_key(&t.tgid) {
            log::info!("guest process {} exited", t.tgid);
            self.guests.remove(&t.tgid);
            let now = self.fx.now();
            self.exited
                .retain(|_, at| now.saturating_duration_since(*at) < EXITED_GRACE);
            self.exited.insert(t.tgid, now);
            self.retries.remove(&t.tgid);
            self.fx.forget(t.tgid);
            let next = self
                .assignments
                .iter()
                .filter(|(_, a)| a.pid != t.tgid)
                .map(|(t, a)| (*t, a.clone()))
                .collect();
            self.set_assignments(next);
        } else if self.assignments.contains_key(&t.tid) {
            // A vCPU thread exited (CPU hot-unplug in the guest, or the guest is going away).
            self.schedule_retry(t.tgid, 0);
        }
    }

    /// The CPUs an `[[allow]]` rule allows the thread on (`Some(None)`: any).
    fn allowlisted(&self, tid: u32, tgid: u32, comm: &str) -> Option<Option<CpuSet>> {
        if self.config.allow.is_empty() {
            return None;
        }
        // The name now, not the one in the event: a new thread's first slice
        // still carries its creator's name until it names itself.
        let current = self.fx.comm(tgid, tid);
        let comm = current.as_deref().unwrap_or(comm);
        self.config
            .allow
            .iter()
            .find(|r| r.matches(comm, tgid, || self.fx.cgroup(tgid, tid)))
            .map(|r| r.cpus.clone())
    }

    fn on_intrusion(&mut self, ev: &Intrusion) {
        let t = &ev.thread;
        if let Some(a) = self.assignments.get(&t.tid).cloned() {
            if a.cpu == ev.cpu {
                // A vCPU on its own CPU: the event raced its registration as owner.
                return;
            }
            // Another guest's vCPU running here: its owner CPU lost it too.
            let detail = format!("ran on CPU {} instead of its CPU {}", ev.cpu, a.cpu);
            self.record(
                Violation::new(
                    ViolationKind::VcpuDrift,
                    a.cpu,
                    t.tid,
                    t.tgid,
                    &t.comm,
                    detail,
                )
                .of_vcpu(&a.vm, a.vcpu),
            );
            self.verify_one(t.tid, false);
        }
        if ev.class == ThreadClass::IntruderUser && self.registered(t, ev.cpu) {
            return;
        }
        if ev.class == ThreadClass::IntruderUser
            && let Some(cpus) = self.allowlisted(t.tid, t.tgid, &t.comm)
            && cpus.as_ref().is_none_or(|c| c.contains(ev.cpu))
        {
            // The kernel keeps one CPU or "any" per thread: a rule covering
            // every guarded CPU is "any"; a partial list is approximated by
            // the CPU the thread was seen on (see the note on `allow.cpus`).
            let allowed = match &cpus {
                None => None,
                Some(c) if self.guard.guarded.is_subset(c) => None,
                Some(c) if c.len() == 1 => c.first(),
                Some(_) => Some(ev.cpu),
            };
            if let Err(e) = self.fx.set_allowed(t.tid, allowed) {
                log::warn!("allowlisting {}: {e}", t.tid);
            }
            return;
        }
        self.record(Violation::new(
            ViolationKind::Intruder,
            ev.cpu,
            t.tid,
            t.tgid,
            &t.comm,
            format!(
                "{} ran {} µs (total {} µs in {} slices)",
                ev.class,
                ev.run_ns / 1000,
                ev.total_ns / 1000,
                ev.slices
            ),
        ));
        self.evict(ev.cpu, t);
    }

    fn on_migrate_in(&mut self, m: &Migration) {
        let t = &m.thread;
        if self.allowlisted(t.tid, t.tgid, &t.comm).is_some() || self.registered(t, m.to_cpu) {
            return;
        }
        self.record(Violation::new(
            ViolationKind::MigrationIn,
            m.to_cpu,
            t.tid,
            t.tgid,
            &t.comm,
            format!(
                "moved from CPU {} onto guarded CPU {}",
                m.from_cpu, m.to_cpu
            ),
        ));
        self.evict(m.to_cpu, t);
    }

    /// Enforce mode: moves a user intruder (`t`, seen on guarded CPU `cpu`) off the guarded CPUs.
    fn evict(&mut self, cpu: u32, t: &Thread) {
        if self.config.mode != Mode::Enforce || self.assignments.contains_key(&t.tid) {
            return;
        }
        // A guest's threads are placed by the plan, never evicted; nor those
        // of a guest that is going away.
        if self.guests.contains_key(&t.tgid)
            || self
                .exited
                .get(&t.tgid)
                .is_some_and(|at| self.fx.now().saturating_duration_since(*at) < EXITED_GRACE)
        {
            return;
        }
        // A vCPU of a guest not discovered yet (it just started) triggers a
        // rescan instead. The name alone proves nothing (any thread can call
        // itself "CPU 0/KVM"): the process must hold KVM vCPUs.
        if crate::guests::parse_vcpu_thread_name(&t.comm).is_some() && self.fx.is_kvm_guest(t.tgid)
        {
            if self.scan_retry.is_none() {
                self.scan_retry = Some(Retry {
                    due: self.fx.now(),
                    attempt: 0,
                });
            }
            return;
        }
        let info = match self.fx.thread(t.tgid, t.tid) {
            Ok(Some(info)) => info,
            Ok(None) => {
                self.metrics.tasks_vanished.inc();
                return;
            }
            Err(e) => {
                log::debug!("reading thread {}: {e}", t.tid);
                return;
            }
        };
        if enforce::untouchable(&info).is_some() {
            return;
        }
        if let Err(wait) = self.limiter.check(t.tid, self.fx.now()) {
            log::debug!("not evicting {} for another {wait:?} (back-off)", t.tid);
            return;
        }
        let target =
            enforce::eviction_target(&info.allowed, &self.guard.guarded, &self.guard.housekeeping);
        match self.fx.set(t.tid, &target) {
            Ok(()) => {
                self.metrics
                    .evictions
                    .with_label_values(&[&cpu.to_string()])
                    .inc();
                if self.log_budget.allow(self.fx.now()) {
                    log::info!(
                        "evicted tid {} ({:?}, pid {}) from CPU {} to CPUs {target} (was {})",
                        t.tid,
                        t.comm,
                        t.tgid,
                        cpu,
                        info.allowed
                    );
                }
            }
            Err(e) => {
                let what = format!("tid {} ({:?}, pid {})", t.tid, t.comm, t.tgid);
                self.enforcement_error("evict", &what, &e);
            }
        }
    }

    /// Periodic work: retries, affinity verification, pruning of per-thread
    /// entries of threads that exited.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.check_online();
        let suppressed = std::mem::take(&mut self.log_budget.suppressed);
        if suppressed > 0 {
            log::warn!(
                "{suppressed} log lines about single threads suppressed (more than \
                 {LOG_LINES_PER_SEC}/s after a burst of {LOG_BURST}); /violations and the \
                 pinguard_violations_total and pinguard_evictions_total counters have them all"
            );
        }
        let now = self.fx.now();
        let due: Vec<u32> = self
            .retries
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(p, _)| *p)
            .collect();
        for pid in due {
            if self.rediscovering.insert(pid) {
                self.fx.request_rediscover(pid);
            }
            // In flight: its answer reschedules or ends the retries.
            if let Some(r) = self.retries.get_mut(&pid) {
                r.due = now + IN_FLIGHT;
            }
        }
        if let Some(r) = self.scan_retry
            && r.due <= now
        {
            self.rescan();
            self.scan_retry = RETRY_DELAYS_MS.get(r.attempt as usize + 1).map(|ms| Retry {
                due: now + Duration::from_millis(*ms),
                attempt: r.attempt + 1,
            });
        }
        self.verify_pins();
        if self.ticks.is_multiple_of(10) {
            self.prune_threads();
        }
    }

    /// `isolation = "runtime"`: applies the runtime isolation, the planner
    /// and applier of `pinguard isolate`, recording in `store` (the file
    /// `pinguard isolate --undo` reads) before each change. An isolation
    /// already recorded there for the same CPUs (a previous daemon's, or
    /// `pinguard isolate`'s) is taken over and completed. A failure rolls
    /// back what this call applied.
    pub fn start_isolation(&mut self, store: Store) -> Result<(), IsolateError> {
        let existing = store.load()?;
        if let Some(s) = &existing
            && s.guarded != self.guard.guarded
        {
            return Err(IsolateError::OtherActive {
                guarded: s.guarded.clone(),
                mechanism: s.mechanism,
                path: store.path.clone(),
            });
        }
        let facts = self.fx.isolation_facts(&self.guard)?;
        let plan = isolate::plan::plan(&facts, existing.as_ref().map(|s| s.mechanism))?;
        let had = existing.as_ref().map_or(0, |s| s.changes.len());
        let mut state = existing.unwrap_or_else(|| {
            State::new(
                self.guard.guarded.clone(),
                self.guard.housekeeping.clone(),
                plan.mechanism,
                store.boot_id.clone(),
            )
        });
        let done = isolate::apply::apply(self.fx.isolation(), &plan, &mut state, &mut |s| {
            store.save(s)
        })?;
        state.compact();
        if !state.changes.is_empty() {
            store.save(&state)?;
        }
        let applied = done
            .iter()
            .filter(|d| d.outcome == Outcome::Applied)
            .count();
        log::info!(
            "runtime isolation of CPUs {} ({}): {applied} change(s) applied{}, recorded in {} \
             (`pinguard isolate --undo` restores them); re-checked every {}",
            self.guard.guarded,
            state.mechanism,
            if had > 0 {
                format!(", {had} taken over from an earlier run")
            } else {
                String::new()
            },
            store.path.display(),
            humantime::format_duration(self.config.isolation_interval),
        );
        for u in &plan.unchanged {
            log::info!(
                "isolation: left as it is: {} {}: {}",
                u.what.name(),
                u.target,
                u.why
            );
        }
        if let Some(r) = &plan.reboot {
            log::info!(
                "isolation: only a reboot can do the rest ({}): {} ({})",
                r.why,
                r.params,
                r.howto
            );
        }
        self.metrics.isolation_active.reset();
        for cpu in self.guard.guarded.iter() {
            self.metrics
                .isolation_active
                .with_label_values(&[&cpu.to_string(), state.mechanism.label()])
                .set(1);
        }
        self.isolation = Some(Upkeep {
            store,
            state,
            failing: HashSet::new(),
        });
        Ok(())
    }

    /// Re-plans the isolation (every `isolation_interval`): whatever the
    /// planner finds to change has drifted (a new IRQ, a task outside the
    /// shield, a mask or sysctl someone set back) and is put back, one change
    /// at a time (a failure rolls back only itself), each recorded first.
    pub fn keep_isolation(&mut self) {
        let now = self.fx.now();
        let Some(up) = self.isolation.as_mut() else {
            return;
        };
        let mut plan = match self
            .fx
            .isolation_facts(&self.guard)
            .and_then(|f| isolate::plan::plan(&f, Some(up.state.mechanism)))
        {
            Ok(p) => p,
            Err(e) => {
                log::warn!("isolation: cannot re-plan: {e}");
                return;
            }
        };
        let mut repaired = false;
        let changes = std::mem::take(&mut plan.changes);
        plan.unchanged.clear();
        plan.reboot = None;
        for change in changes {
            let one = isolate::Plan {
                changes: vec![change.clone()],
                ..plan.clone()
            };
            let store = &up.store;
            let result =
                isolate::apply::apply(self.fx.isolation(), &one, &mut up.state, &mut |s| {
                    store.save(s)
                });
            match result.map(|mut d| d.pop().map(|d| d.outcome)) {
                Ok(Some(Outcome::Applied)) => {
                    repaired = true;
                    up.failing.remove(&change.target);
                    self.metrics
                        .isolation_repairs
                        .with_label_values(&[change.what.label()])
                        .inc();
                    if self.log_budget.allow(now) {
                        log::info!(
                            "isolation: put back {} {} ({})",
                            change.what.name(),
                            change.target,
                            change.before_after()
                        );
                    }
                }
                Ok(Some(Outcome::Refused { reason })) => {
                    log::debug!("isolation: {} refused: {reason}", change.target);
                }
                Ok(_) => {}
                Err(e) => {
                    if up.failing.insert(change.target.clone()) {
                        log::warn!("isolation: cannot put back {}: {e}", change.target);
                    } else {
                        log::debug!("isolation: cannot put back {}: {e}", change.target);
                    }
                }
            }
        }
        if repaired {
            up.state.compact();
            if let Err(e) = up.store.save(&up.state) {
                log::warn!("isolation: {e}");
            }
        }
    }

    /// At exit: undoes the runtime isolation when `isolation_undo_on_exit`
    /// says so (from the state file, which `pinguard isolate` may have
    /// added to), else leaves it applied for the next start to take over.
    pub fn stop_isolation(&mut self) {
        let Some(up) = self.isolation.take() else {
            return;
        };
        self.metrics.isolation_active.reset();
        let path = up.store.path.display();
        if !self.config.isolation_undo_on_exit {
            log::info!(
                "the runtime isolation stays applied (isolation_undo_on_exit = false): the next start \
                 takes it over; `pinguard isolate --undo` restores what it changed ({path})"
            );
            return;
        }
        match isolate::apply::undo_from(self.fx.isolation(), &up.store) {
            Ok((_, r)) => {
                for o in &r.overwritten {
                    log::warn!(
                        "isolation undo: {} was {} instead of {}; restored anyway",
                        o.target,
                        o.found,
                        o.set
                    );
                }
                if r.errors.is_empty() {
                    log::info!(
                        "runtime isolation undone: {} value(s) restored, {} already as before",
                        r.restored,
                        r.unchanged
                    );
                } else {
                    log::error!(
                        "isolation undo could not restore: {}; `pinguard isolate --undo` retries from {path}",
                        r.errors.join("; ")
                    );
                }
            }
            Err(e) => log::error!("isolation undo: {e}"),
        }
    }

    /// Reads which guarded CPUs are online; publishes it and says when it changes.
    fn check_online(&mut self) {
        let Some(online) = self.fx.online_cpus() else {
            return;
        };
        let offline = self.guard.guarded.difference(&online);
        if offline != self.offline {
            if offline.is_empty() {
                log::info!("every guarded CPU is online again: re-pinning their vCPUs");
            } else {
                log::warn!(
                    "guarded CPUs {offline} are offline (hotplug): their vCPUs run elsewhere \
                     until they are back; not re-pinned, not reported as drift meanwhile"
                );
            }
            self.offline = offline;
            self.hotplug = Some(self.fx.now());
            self.metrics
                .publish_online(&self.guard.guarded, &self.offline);
        }
    }

    /// Since when the running full scan has run, if one does.
    pub fn scanning_since(&self) -> Option<std::time::Instant> {
        self.scanning
    }

    /// Time until the earliest pending retry (the run loop wakes for it).
    pub fn next_retry_in(&self) -> Option<Duration> {
        let now = self.fx.now();
        self.retries
            .values()
            .chain(self.scan_retry.as_ref())
            .map(|r| r.due.saturating_duration_since(now))
            .min()
    }

    fn prune_threads(&mut self) {
        let Ok(threads) = self.fx.thread_keys() else {
            return;
        };
        let mut alive: HashMap<u32, bool> = HashMap::new();
        for (key, tgid) in threads {
            let fx = &self.fx;
            if !*alive
                .entry(key.tid)
                .or_insert_with(|| fx.task_exists(tgid, key.tid))
            {
                let _ = self.fx.remove_thread(key);
            }
        }
        // Allowlisted threads that exited: their ids may be reused by anyone.
        if let Ok(allowed) = self.fx.allowed() {
            for tid in allowed {
                if !self.fx.process_exists(tid) {
                    let _ = self.fx.remove_allowed(tid);
                    self.emulators_allowed.remove(&tid);
                    for r in &mut self.registrations {
                        r.allowed.remove(&tid);
                    }
                }
            }
        }
        self.drop_stale_registrations();
    }
}

impl<E: Effects> Daemon<E> {
    /// Who the daemon is, for clients of the control socket.
    pub fn info(&self) -> DaemonInfo {
        DaemonInfo {
            pid: std::process::id(),
            mode: self.config.mode.as_str().to_string(),
            guarded: self.guard.guarded.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            registered: false,
        }
    }

    /// One request on the control socket, from connection `conn` of
    /// process `peer` (root: the socket checks).
    pub fn control(&mut self, conn: u64, peer: u32, req: Request) -> Reply {
        let result = match req {
            Request::Hello => Ok(()),
            Request::Allow(a) => self.register(conn, peer, a),
        };
        Reply {
            ok: result.is_ok(),
            error: result.err(),
            daemon: Some(self.info()),
        }
    }

    fn register(&mut self, conn: u64, peer: u32, a: Allow) -> Result<(), String> {
        // A whole process only if it is the client itself or its child: a
        // registration names what the client runs, not whatever it would
        // like left alone. One thread, named with its start time, may belong
        // to any process: `latency --vm` measures through a guest's vCPU
        // thread, which QEMU runs, not the client (the socket takes root
        // clients only, and the allowance ends with the connection).
        if a.tid.is_none() && a.pid != peer && self.fx.parent(a.pid) != Some(peer) {
            return Err(format!(
                "pid {} is neither the caller (pid {peer}) nor its child: name one thread of it",
                a.pid
            ));
        }
        let tid = a.tid.unwrap_or(a.pid);
        match self.fx.start_time(a.pid, tid) {
            Some(t) if t == a.start_time => {}
            Some(t) => {
                return Err(format!(
                    "thread {tid} of pid {} started at {t}, not {}: another thread with a reused id",
                    a.pid, a.start_time
                ));
            }
            None => return Err(format!("no thread {tid} in pid {}", a.pid)),
        }
        let mut allowed = HashSet::new();
        if let Some(tid) = a.tid
            && self.guard.guarded.contains(a.cpu)
        {
            if let Err(e) = self.fx.set_allowed(tid, Some(a.cpu)) {
                return Err(format!("allowing thread {tid} in the kernel: {e}"));
            }
            allowed.insert(tid);
        }
        log::info!(
            "control: {} registered {} of pid {} on CPU {}{} for as long as it is connected",
            if a.what.is_empty() {
                format!("pid {peer}")
            } else {
                format!("{} (pid {peer})", a.what)
            },
            a.tid
                .map_or_else(|| "every thread".to_string(), |t| format!("thread {t}")),
            a.pid,
            a.cpu,
            if a.children { " and its children" } else { "" }
        );
        self.registrations.push(Registration {
            conn,
            allow: a,
            allowed,
        });
        Ok(())
    }

    /// A control connection closed: what it registered goes with it.
    pub fn disconnected(&mut self, conn: u64) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.registrations)
            .into_iter()
            .partition(|r| r.conn == conn);
        self.registrations = kept;
        for r in gone {
            log::info!(
                "control: registration of pid {} on CPU {} ended (connection closed)",
                r.allow.pid,
                r.allow.cpu
            );
            self.unallow(&r);
        }
    }

    /// Drops the allowances of a registration no other one still holds.
    fn unallow(&mut self, r: &Registration) {
        for tid in &r.allowed {
            let held = self.registrations.iter().any(|o| o.allowed.contains(tid))
                || self.emulators_allowed.contains(tid);
            if !held {
                let _ = self.fx.remove_allowed(*tid);
            }
        }
    }

    /// Registrations whose process (or thread) exited or was replaced.
    fn drop_stale_registrations(&mut self) {
        let (stale, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.registrations)
            .into_iter()
            .partition(|r| !self.still_registered(&r.allow));
        self.registrations = kept;
        for r in stale {
            self.unallow(&r);
        }
    }

    fn still_registered(&self, a: &Allow) -> bool {
        self.fx.start_time(a.pid, a.tid.unwrap_or(a.pid)) == Some(a.start_time)
    }

    /// Whether a registration covers thread `t` on `cpu`; if so it is
    /// allowed there in the kernel from now on (no more intrusion events).
    fn registered(&mut self, t: &Thread, cpu: u32) -> bool {
        if self.registrations.is_empty() {
            return false;
        }
        let parent = self.fx.parent(t.tgid);
        let hit = self.registrations.iter().position(|r| {
            let a = &r.allow;
            a.cpu == cpu
                && match a.tid {
                    Some(tid) => tid == t.tid && a.pid == t.tgid,
                    None => a.pid == t.tgid || (a.children && parent == Some(a.pid)),
                }
                && self.still_registered(a)
        });
        let Some(i) = hit else {
            return false;
        };
        if let Err(e) = self.fx.set_allowed(t.tid, Some(cpu)) {
            log::warn!("allowing registered thread {}: {e}", t.tid);
        }
        self.registrations[i].allowed.insert(t.tid);
        true
    }
}

fn role_name(e: &plan::Entry) -> String {
    match (e.role, e.vcpu) {
        (Role::Vcpu, Some(i)) => format!("vcpu {i}"),
        _ => "emulator thread".into(),
    }
}

#[cfg(test)]
mod tests;
