//! The isolation daemon's state machine: guest inventory, CPU ownership,
//! event classification into violations, enforcement and metrics.
//!
//! Everything runs on one thread (a current-thread tokio runtime), so the
//! state needs no locks; the HTTP server only reads the metrics registry and
//! the recent-violations list.
pub mod metrics;

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use pin_common::class;

use crate::{
    bpf::probe::{DecodedEvent, Probe, ProbeError, StatsGuard},
    config::{Config, Mode},
    daemon::metrics::{Deltas, Metrics},
    guests::{DiscoverOptions, Discoverer, Discovery, Guest},
    host::affinity::{self, AffinityError},
    host::cpulist::CpuSet,
    host::procfs::Proc,
    host::topology::{Guard, Topology},
    placement::enforce::{self, Limiter},
    placement::plan::{self, PlanOptions, Role},
};

/// How many violations the recent list keeps.
pub const RECENT_VIOLATIONS: usize = 256;

/// One violation, as logged and listed on `/violations`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Violation {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub kind: &'static str,
    pub cpu: u32,
    pub tid: u32,
    pub tgid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    pub detail: String,
}

impl Violation {
    fn new(kind: &'static str, cpu: u32, tid: u32, tgid: u32, comm: &str, detail: String) -> Self {
        Self {
            time: now_epoch(),
            kind,
            cpu,
            tid,
            tgid,
            comm: comm.to_string(),
            vm: None,
            vcpu: None,
            detail,
        }
    }

    /// Names the guest and vCPU concerned.
    fn of_vcpu(mut self, a: &Assignment) -> Self {
        self.vm = Some(a.vm.clone());
        self.vcpu = Some(a.vcpu);
        self
    }
}

pub type RecentViolations = Arc<Mutex<VecDeque<Violation>>>;

/// How many intruders `/intruders` lists.
pub const TOP_INTRUDERS: usize = 100;

/// One thread's intrusion on one guarded CPU since pinguard started (or since
/// the thread first intruded), from the kernel's per-thread accounting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IntruderRecord {
    pub cpu: u32,
    pub tid: u32,
    pub tgid: u32,
    pub comm: String,
    pub class: &'static str,
    pub run_ns: u64,
    pub slices: u64,
    pub max_slice_ns: u64,
}

/// A vCPU thread and the guarded CPU it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Assignment {
    vm: String,
    pid: u32,
    vcpu: u32,
    cpu: u32,
}

/// A guest process to look at again (it just exec'ed, or a thread vanished).
#[derive(Debug, Clone, Copy)]
struct Retry {
    due: Instant,
    attempt: u32,
}

/// Back-off schedule after an exec: QEMU creates its vCPU threads and QMP
/// socket during start-up, so look again a few times.
const RETRY_DELAYS_MS: [u64; 6] = [100, 300, 1000, 3000, 10_000, 30_000];

pub struct Daemon {
    pub config: Config,
    topo: Topology,
    guard: Guard,
    probe: Probe,
    proc: Proc,
    discoverer: Discoverer,
    metrics: Arc<Metrics>,
    recent: RecentViolations,
    /// JSON of the top intruders, refreshed every tick, served on `/intruders`.
    intruders: Arc<Mutex<String>>,
    guests: BTreeMap<u32, Guest>,
    /// vCPU tid -> assignment.
    assignments: BTreeMap<u32, Assignment>,
    /// vCPU tid -> whether its affinity equalled its assignment at the last check.
    pinned: HashMap<u32, bool>,
    retries: BTreeMap<u32, Retry>,
    /// Full rescans scheduled after a QEMU exec: with `-daemonize` the guest
    /// is a forked child whose pid the exec event cannot name.
    scan_retry: Option<Retry>,
    limiter: Limiter,
    /// (kind, cpu, tid) already logged: each violation is logged once.
    logged: HashSet<(&'static str, u32, u32)>,
    deltas: Deltas,
    /// CPUs the current plan makes vCPUs share.
    shared: CpuSet,
    /// Emulator threads allowlisted in the kernel because the plan puts them on guarded CPUs.
    emulators_allowed: HashSet<u32>,
    /// Guest pids registered in the kernel's GUESTS map (exit notification).
    guests_watched: HashSet<u32>,
    /// Names of the guests known at the last re-plan: a name that is gone
    /// takes its per-VM series with it, so churning guests do not grow the
    /// label set without bound.
    vm_names: HashSet<String>,
    /// IRQ number -> its actions' names (from /proc/irq/N/), for labels.
    irq_names: HashMap<u32, String>,
    _stats: Option<StatsGuard>,
    ticks: u64,
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Daemon {
    pub fn new(
        config: Config,
        topo: Topology,
        guard: Guard,
        probe: Probe,
        metrics: Arc<Metrics>,
        recent: RecentViolations,
        intruders: Arc<Mutex<String>>,
    ) -> Self {
        let stats = if config.bpf_stats {
            StatsGuard::enable()
                .map_err(|e| log::warn!("BPF run-time statistics unavailable: {e}"))
                .ok()
        } else {
            None
        };
        let proc = Proc::default();
        let discoverer = Discoverer::new(proc.clone(), Self::discover_options(&config));
        let limiter = Limiter::new(config.min_interval, config.max_backoff);
        let d = Self {
            topo,
            guard,
            probe,
            proc,
            discoverer,
            metrics,
            recent,
            intruders,
            guests: BTreeMap::new(),
            assignments: BTreeMap::new(),
            pinned: HashMap::new(),
            retries: BTreeMap::new(),
            scan_retry: None,
            limiter,
            logged: HashSet::new(),
            deltas: Deltas::default(),
            irq_names: HashMap::new(),
            shared: CpuSet::new(),
            emulators_allowed: HashSet::new(),
            guests_watched: HashSet::new(),
            vm_names: HashSet::new(),
            _stats: stats,
            ticks: 0,
            config,
        };
        d.publish_static();
        d
    }

    fn discover_options(config: &Config) -> DiscoverOptions {
        DiscoverOptions {
            qmp: config.qmp.clone(),
            ..DiscoverOptions::default()
        }
    }

    fn publish_static(&self) {
        let m = &self.metrics;
        m.cpu_guarded.reset();
        for cpu in self.guard.guarded.iter() {
            m.cpu_guarded.with_label_values(&[&cpu.to_string()]).set(1);
            // Every class is present from the start, so dashboards and rate() see zeros, not gaps.
            for class in crate::daemon::metrics::CLASSES {
                m.cpu_run_seconds
                    .with_label_values(&[&cpu.to_string(), class])
                    .inc_by(0.0);
            }
        }
        m.mode.reset();
        m.mode
            .with_label_values(&[self.config.mode.as_str()])
            .set(1);
        m.events_lost.inc_by(0);
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Applies a reloaded configuration. The guarded set and listen address
    /// need a restart; everything else takes effect now.
    pub fn reload(&mut self, config: Config) -> Result<(), String> {
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
            ("listen", old.listen != config.listen),
        ];
        for (key, changed) in fixed {
            if changed {
                log::warn!("reload: `{key}` changed but takes effect only after a restart");
            }
        }
        // Keep the back-off state unless its parameters changed: a reload must
        // not restart a fight with another tool at full rate.
        if (old.min_interval, old.max_backoff) != (config.min_interval, config.max_backoff) {
            self.limiter = Limiter::new(config.min_interval, config.max_backoff);
        }
        self.discoverer = Discoverer::new(self.proc.clone(), Self::discover_options(&config));
        // Allowances came from the old `[[allow]]` rules: drop them and let the
        // new rules allow threads again as they show up.
        if let Ok(allowed) = self.probe.allowed() {
            for tid in allowed
                .into_iter()
                .filter(|t| !self.emulators_allowed.contains(t))
            {
                let _ = self.probe.remove_allowed(tid);
            }
        }
        self.config = config;
        self.publish_static();
        self.rescan();
        Ok(())
    }

    fn record(&mut self, v: Violation) {
        self.metrics
            .violations
            .with_label_values(&[&v.cpu.to_string(), v.kind])
            .inc();
        if self.logged.len() > 65536 {
            self.logged.clear();
        }
        if self.logged.insert((v.kind, v.cpu, v.tid)) {
            let who = match (&v.vm, v.vcpu) {
                (Some(vm), Some(i)) => format!(" (vm {vm} vcpu {i})"),
                _ => String::new(),
            };
            log::warn!(
                "violation {} on CPU {}: tid {} pid {} {:?}{}: {}",
                v.kind,
                v.cpu,
                v.tid,
                v.tgid,
                v.comm,
                who,
                v.detail
            );
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_VIOLATIONS {
            recent.pop_front();
        }
        recent.push_back(v);
    }

    /// Full rescan of /proc (start-up, SIGHUP, and a periodic safety net).
    pub fn rescan(&mut self) {
        self.metrics.discovery_scans.inc();
        match self.discoverer.scan() {
            Ok(d) => self.apply_discovery(d, None),
            Err(e) => {
                self.metrics.discovery_errors.inc();
                log::error!("guest discovery failed: {e}");
            }
        }
    }

    fn rediscover(&mut self, pid: u32) {
        match self.discoverer.rediscover(pid) {
            Ok(d) => self.apply_discovery(d, Some(pid)),
            Err(e) => {
                self.metrics.discovery_errors.inc();
                log::warn!("rediscovering pid {pid}: {e}");
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
                } else if let Some(r) = self.retries.get_mut(&pid) {
                    r.attempt += 1;
                    match RETRY_DELAYS_MS.get(r.attempt as usize) {
                        Some(ms) => r.due = Instant::now() + Duration::from_millis(*ms),
                        None => {
                            self.retries.remove(&pid);
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
                match affinity::get(tid) {
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
        let mut opts = PlanOptions {
            vm: self
                .config
                .vm
                .iter()
                .filter(|(n, _)| names.contains(n.as_str()))
                .cloned()
                .collect(),
            emulator: self.config.emulator.clone(),
            smt: self.config.smt,
            allow_shared: self.config.allow_shared,
        };
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
                },
            );
        }
        // Tell the kernel who owns what before moving anything: a vCPU that
        // runs on its CPU right after the move must already count as its owner.
        self.set_assignments(next);
        self.allow_emulators(&plan);
        if self.config.mode == Mode::Enforce {
            for e in plan.changes() {
                match enforce::repin(e.tid, &e.to) {
                    Ok(()) => {
                        if e.role == Role::Vcpu {
                            self.metrics.repins.with_label_values(&[&e.vm]).inc();
                        }
                        log::info!(
                            "pinned {} {} (tid {}) to CPUs {} (was {})",
                            e.vm,
                            role_name(e),
                            e.tid,
                            e.to,
                            e.from
                        );
                    }
                    Err(err) => self.enforcement_error("pin", &err),
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
                "shared_cpu",
                cpu,
                0,
                0,
                "",
                format!("vCPUs share this CPU: {}", sharing.join(", ")),
            ));
        }
        self.verify_pins();
    }

    /// Brings the kernel's OWNERS/GUESTS maps and the placement metrics in line.
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
                    self.limiter.forget(*tid);
                    if let Err(e) = self.probe.remove_owner(*tid) {
                        log::warn!("removing owner {tid}: {e}");
                    }
                    let _ = self.probe.remove_watched(*tid);
                    let _ = m
                        .vcpu_wait_seconds_total
                        .remove_label_values(&[&old.vm, &old.vcpu.to_string()]);
                }
            }
        }
        for (tid, a) in &next {
            if self.assignments.get(tid) != Some(a) {
                if let Err(e) = self.probe.set_owner(*tid, a.cpu) {
                    log::error!(
                        "registering vCPU thread {tid} as owner of CPU {}: {e}",
                        a.cpu
                    );
                }
                if let Err(e) = self.probe.set_watched(*tid, pin_common::watch::VCPU) {
                    log::warn!("measuring the waits of vCPU thread {tid}: {e}");
                }
            }
            m.vcpu_info
                .with_label_values(&[&a.vm, &a.vcpu.to_string(), &a.cpu.to_string()])
                .set(1);
        }
        let new_pids: HashSet<u32> = self.guests.keys().copied().collect();
        for pid in self.guests_watched.difference(&new_pids) {
            let _ = self.probe.remove_guest(*pid);
        }
        for pid in new_pids.difference(&self.guests_watched.clone()) {
            if let Err(e) = self.probe.set_guest(*pid) {
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
            if let Err(err) = self.probe.set_allowed(e.tid, cpu) {
                log::warn!(
                    "allowing emulator thread {} on CPUs {on_guarded}: {err}",
                    e.tid
                );
            }
            now.insert(e.tid);
        }
        for tid in self.emulators_allowed.difference(&now) {
            let _ = self.probe.remove_allowed(*tid);
        }
        self.emulators_allowed = now;
    }

    fn enforcement_error(&mut self, action: &str, err: &AffinityError) {
        if err.is_gone() {
            // The thread exited under us: normal, counted, not an error.
            self.metrics.tasks_vanished.inc();
            return;
        }
        self.metrics
            .enforcement_errors
            .with_label_values(&[action, &err.errno_name()])
            .inc();
        log::warn!("{action} failed: {err}");
    }

    /// Checks every vCPU's affinity against its assignment (and re-pins in enforce mode).
    fn verify_pins(&mut self) {
        let tids: Vec<u32> = self.assignments.keys().copied().collect();
        for tid in tids {
            self.verify_one(tid, None);
        }
    }

    fn verify_one(&mut self, tid: u32, cause: Option<&DecodedEvent>) {
        let Some(a) = self.assignments.get(&tid).cloned() else {
            return;
        };
        let want = CpuSet::single(a.cpu);
        let have = match affinity::get(tid) {
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
        let was = self.pinned.insert(tid, ok);
        let label = [a.vm.as_str(), &a.vcpu.to_string()];
        self.metrics
            .vcpu_pinned
            .with_label_values(&label)
            .set(i64::from(ok));
        if ok {
            return;
        }
        // A drift is reported when it starts, not every second; when an event
        // explains it (affinity change, migration), its handler has reported it.
        if was != Some(false) && cause.is_none() {
            let comm = self
                .proc
                .comm(a.pid, tid)
                .ok()
                .flatten()
                .unwrap_or_default();
            let detail = format!("affinity is {have}, assigned {want}");
            self.record(Violation::new("vcpu_drift", a.cpu, tid, a.pid, &comm, detail).of_vcpu(&a));
        }
        if self.config.mode == Mode::Enforce {
            self.repin(tid, &a);
        }
    }

    fn repin(&mut self, tid: u32, a: &Assignment) {
        if let Err(wait) = self.limiter.check(tid, Instant::now()) {
            log::debug!("not re-pinning {tid} for another {wait:?} (back-off)");
            return;
        }
        match enforce::repin(tid, &CpuSet::single(a.cpu)) {
            Ok(()) => {
                self.metrics.repins.with_label_values(&[&a.vm]).inc();
                self.pinned.insert(tid, true);
                self.metrics
                    .vcpu_pinned
                    .with_label_values(&[a.vm.as_str(), &a.vcpu.to_string()])
                    .set(1);
                log::info!(
                    "re-pinned {} vcpu {} (tid {tid}) to CPU {}",
                    a.vm,
                    a.vcpu,
                    a.cpu
                );
            }
            Err(e) => self.enforcement_error("repin", &e),
        }
    }

    fn schedule_retry(&mut self, pid: u32, attempt: u32) {
        let ms = RETRY_DELAYS_MS[(attempt as usize).min(RETRY_DELAYS_MS.len() - 1)];
        self.retries.entry(pid).or_insert(Retry {
            due: Instant::now() + Duration::from_millis(ms),
            attempt,
        });
    }

    /// Handles one event from the kernel.
    pub fn handle(&mut self, ev: &DecodedEvent) {
        match ev.event {
            "intrusion" => self.on_intrusion(ev),
            "migrate_in" => self.on_migrate_in(ev),
            "owner_away" => {
                // The kernel named the CPU it knew; a re-plan may already have
                // moved the vCPU (then this is pinguard's own move).
                if let Some(a) = self.assignments.get(&ev.tid).cloned()
                    && ev.cpu == a.cpu
                    && ev.other_cpu != Some(a.cpu)
                {
                    self.record(
                        Violation::new(
                            "vcpu_drift",
                            a.cpu,
                            ev.tid,
                            ev.tgid,
                            &ev.comm,
                            format!(
                                "left its CPU {} for CPU {}",
                                a.cpu,
                                ev.other_cpu.unwrap_or_default()
                            ),
                        )
                        .of_vcpu(&a),
                    );
                    self.pinned.insert(ev.tid, false);
                    self.verify_one(ev.tid, Some(ev));
                }
            }
            "affinity_change" => {
                let target = ev.target_tid.unwrap_or_default();
                if let Some(a) = self.assignments.get(&target).cloned() {
                    self.record(
                        Violation::new(
                            "affinity_changed",
                            a.cpu,
                            ev.tid,
                            ev.tgid,
                            &ev.comm,
                            format!(
                                "{:?} (pid {}) set the affinity of {} vcpu {} (tid {target}) to {}",
                                ev.comm,
                                ev.tgid,
                                a.vm,
                                a.vcpu,
                                ev.mask.as_deref().unwrap_or("?")
                            ),
                        )
                        .of_vcpu(&a),
                    );
                    self.verify_one(target, Some(ev));
                }
            }
            "exec" => {
                log::debug!(
                    "exec of {:?} (pid {}): looking for a new guest",
                    ev.comm,
                    ev.tgid
                );
                self.scan_retry = Some(Retry {
                    due: Instant::now() + Duration::from_millis(RETRY_DELAYS_MS[0]),
                    attempt: 0,
                });
            }
            "exit" => {
                if ev.tid == ev.tgid && self.guests.contains_key(&ev.tgid) {
                    log::info!("guest process {} exited", ev.tgid);
                    self.guests.remove(&ev.tgid);
                    self.retries.remove(&ev.tgid);
                    self.discoverer.forget(ev.tgid);
                    let next = self
                        .assignments
                        .iter()
                        .filter(|(_, a)| a.pid != ev.tgid)
                        .map(|(t, a)| (*t, a.clone()))
                        .collect();
                    self.set_assignments(next);
                } else if self.assignments.contains_key(&ev.tid) {
                    // A vCPU thread exited (CPU hot-unplug in the guest, or the guest is going away).
                    self.schedule_retry(ev.tgid, 0);
                }
            }
            _ => {}
        }
    }

    fn allowlisted(&self, tid: u32, tgid: u32, comm: &str) -> Option<Option<CpuSet>> {
        let cgroup = || {
            std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/cgroup"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
                })
        };
        if self.config.allow.is_empty() {
            return None;
        }
        // The name now, not the one in the event: a new thread's first slice
        // still carries its creator's name until it names itself.
        let current = self.proc.comm(tgid, tid).ok().flatten();
        let comm = current.as_deref().unwrap_or(comm);
        self.config
            .allow
            .iter()
            .find(|r| r.matches(comm, tgid, cgroup))
            .map(|r| r.cpus.clone())
    }

    fn on_intrusion(&mut self, ev: &DecodedEvent) {
        if let Some(a) = self.assignments.get(&ev.tid).cloned() {
            if a.cpu == ev.cpu {
                // A vCPU on its own CPU: the event raced its registration as owner.
                return;
            }
            // Another guest's vCPU running here: its owner CPU lost it too.
            let detail = format!("ran on CPU {} instead of its CPU {}", ev.cpu, a.cpu);
            self.record(
                Violation::new("vcpu_drift", a.cpu, ev.tid, ev.tgid, &ev.comm, detail).of_vcpu(&a),
            );
            self.verify_one(ev.tid, None);
        }
        if ev.class == class::name(class::INTRUDER_USER)
            && let Some(cpus) = self.allowlisted(ev.tid, ev.tgid, &ev.comm)
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
            if let Err(e) = self.probe.set_allowed(ev.tid, allowed) {
                log::warn!("allowlisting {}: {e}", ev.tid);
            }
            return;
        }
        self.record(Violation::new(
            "intruder",
            ev.cpu,
            ev.tid,
            ev.tgid,
            &ev.comm,
            format!(
                "{} ran {} µs (total {} µs in {} slices)",
                ev.class,
                ev.run_ns / 1000,
                ev.total_ns / 1000,
                ev.slices
            ),
        ));
        self.evict(ev);
    }

    fn on_migrate_in(&mut self, ev: &DecodedEvent) {
        if self.allowlisted(ev.tid, ev.tgid, &ev.comm).is_some() {
            return;
        }
        self.record(Violation::new(
            "migration_in",
            ev.cpu,
            ev.tid,
            ev.tgid,
            &ev.comm,
            format!(
                "moved from CPU {} onto guarded CPU {}",
                ev.other_cpu.unwrap_or_default(),
                ev.cpu
            ),
        ));
        self.evict(ev);
    }

    /// Enforce mode: moves a user intruder off the guarded CPUs.
    fn evict(&mut self, ev: &DecodedEvent) {
        if self.config.mode != Mode::Enforce || self.assignments.contains_key(&ev.tid) {
            return;
        }
        // A guest's threads are placed by the plan, never evicted. A vCPU of a
        // guest not discovered yet (it just started) triggers a rescan instead.
        if self.guests.contains_key(&ev.tgid)
            || crate::guests::parse_vcpu_thread_name(&ev.comm).is_some()
        {
            if !self.guests.contains_key(&ev.tgid) && self.scan_retry.is_none() {
                self.scan_retry = Some(Retry {
                    due: Instant::now(),
                    attempt: 0,
                });
            }
            return;
        }
        let info = match self.proc.thread(ev.tgid, ev.tid) {
            Ok(Some(t)) => t,
            Ok(None) => {
                self.metrics.tasks_vanished.inc();
                return;
            }
            Err(e) => {
                log::debug!("reading thread {}: {e}", ev.tid);
                return;
            }
        };
        if enforce::untouchable(&info).is_some() {
            return;
        }
        if let Err(wait) = self.limiter.check(ev.tid, Instant::now()) {
            log::debug!("not evicting {} for another {wait:?} (back-off)", ev.tid);
            return;
        }
        let target =
            enforce::eviction_target(&info.allowed, &self.guard.guarded, &self.guard.housekeeping);
        match affinity::set(ev.tid, &target) {
            Ok(()) => {
                self.metrics
                    .evictions
                    .with_label_values(&[&ev.cpu.to_string()])
                    .inc();
                log::info!(
                    "evicted tid {} ({:?}, pid {}) from CPU {} to CPUs {target} (was {})",
                    ev.tid,
                    ev.comm,
                    ev.tgid,
                    ev.cpu,
                    info.allowed
                );
            }
            Err(e) => self.enforcement_error("evict", &e),
        }
    }

    /// Periodic work: retries, affinity verification, metrics from the maps,
    /// pruning of per-thread entries of threads that exited.
    pub fn tick(&mut self) {
        self.ticks += 1;
        let now = Instant::now();
        let due: Vec<u32> = self
            .retries
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(p, _)| *p)
            .collect();
        for pid in due {
            self.rediscover(pid);
            if let Some(r) = self.retries.get(&pid)
                && r.due <= now
            {
                // rediscover() did not reschedule (e.g. the process is gone).
                self.retries.remove(&pid);
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
        if let Err(e) = self.update_metrics() {
            log::warn!("reading the eBPF maps: {e}");
        }
        self.publish_intruders();
        if self.ticks.is_multiple_of(10) {
            self.prune_threads();
        }
    }

    /// Time until the earliest pending retry (the run loop wakes for it).
    pub fn next_retry_in(&self) -> Option<Duration> {
        self.retries
            .values()
            .chain(self.scan_retry.as_ref())
            .map(|r| r.due.saturating_duration_since(Instant::now()))
            .min()
    }

    pub fn update_metrics(&mut self) -> Result<(), ProbeError> {
        let m = self.metrics.clone();
        for (cpu, s) in self.probe.cpu_stats()? {
            let c = cpu.to_string();
            let by = |k: u32| s.run_ns[k as usize];
            let slices = |k: u32| s.slices[k as usize];
            for (label, ns) in [
                ("vcpu", by(class::VCPU)),
                ("kernel", by(class::KERNEL)),
                ("allowed", by(class::ALLOWED)),
                (
                    "intruder",
                    by(class::INTRUDER_USER) + by(class::INTRUDER_KTHREAD),
                ),
                ("idle", by(class::IDLE)),
            ] {
                let d = self.deltas.delta(format!("run/{c}/{label}"), ns);
                m.cpu_run_seconds
                    .with_label_values(&[&c, label])
                    .inc_by(d as f64 / 1e9);
            }
            for (source, k) in [
                ("user", class::INTRUDER_USER),
                ("kthread", class::INTRUDER_KTHREAD),
            ] {
                let d = self.deltas.delta(format!("intr/{c}/{source}"), by(k));
                m.intruder_run_seconds
                    .with_label_values(&[&c, source])
                    .inc_by(d as f64 / 1e9);
                let n = self.deltas.delta(format!("slices/{c}/{source}"), slices(k));
                m.intrusions.with_label_values(&[&c, source]).inc_by(n);
            }
        }
        self.update_noise_metrics()?;
        let counters = self.probe.counters()?;
        m.events_lost.inc_by(
            self.deltas
                .delta("events_lost".into(), counters.events_lost),
        );
        m.thread_map_full.inc_by(
            self.deltas
                .delta("thread_map_full".into(), counters.thread_map_full),
        );
        for p in self.probe.program_stats() {
            let d = self
                .deltas
                .delta(format!("bpf_ns/{}", p.name), p.run_time.as_nanos() as u64);
            m.bpf_run_seconds
                .with_label_values(&[p.name])
                .inc_by(d as f64 / 1e9);
            m.bpf_runs.with_label_values(&[p.name]).inc_by(
                self.deltas
                    .delta(format!("bpf_runs/{}", p.name), p.run_count),
            );
        }
        Ok(())
    }

    fn update_noise_metrics(&mut self) -> Result<(), ProbeError> {
        let m = self.metrics.clone();
        for (key, stat) in self.probe.irq_stats()? {
            let name = self
                .irq_names
                .entry(key.irq)
                .or_insert_with(|| crate::host::irq::irq_name(key.irq))
                .clone();
            let (cpu, irq) = (key.cpu.to_string(), key.irq.to_string());
            let labels = [cpu.as_str(), irq.as_str(), name.as_str()];
            let d = self.deltas.delta(format!("irq_ns/{cpu}/{irq}"), stat.ns);
            m.irq_seconds
                .with_label_values(&labels)
                .inc_by(d as f64 / 1e9);
            m.irqs
                .with_label_values(&labels)
                .inc_by(self.deltas.delta(format!("irq_n/{cpu}/{irq}"), stat.count));
        }
        for (cpu, s) in self.probe.softirq_stats()? {
            let c = cpu.to_string();
            for (i, stat) in s.vec.iter().take(pin_common::NR_SOFTIRQS).enumerate() {
                let vector = pin_common::SOFTIRQ_NAMES[i];
                let d = self.deltas.delta(format!("sirq_ns/{c}/{vector}"), stat.ns);
                m.softirq_seconds
                    .with_label_values(&[&c, vector])
                    .inc_by(d as f64 / 1e9);
                m.softirqs.with_label_values(&[&c, vector]).inc_by(
                    self.deltas
                        .delta(format!("sirq_n/{c}/{vector}"), stat.count),
                );
            }
        }
        for (cpu, (count, _ns)) in self.probe.nmi_stats()? {
            let c = cpu.to_string();
            m.nmis
                .with_label_values(&[&c])
                .inc_by(self.deltas.delta(format!("nmi/{c}"), count));
        }
        let hists = self.probe.wait_hists()?;
        let mut series = Vec::new();
        for (tid, a) in &self.assignments {
            let Some(h) = hists.get(tid) else { continue };
            let vcpu = a.vcpu.to_string();
            let d = self.deltas.delta(format!("wait/{tid}"), h.total_ns);
            m.vcpu_wait_seconds_total
                .with_label_values(&[&a.vm, &vcpu])
                .inc_by(d as f64 / 1e9);
            series.push((a.vm.clone(), vcpu, *h));
        }
        *m.extra_text.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::daemon::metrics::render_wait_histogram(&series);
        Ok(())
    }

    /// Counts events the userspace reader could not decode as lost.
    pub fn count_lost(&self, n: u64) {
        self.metrics.events_lost.inc_by(n);
    }

    fn publish_intruders(&self) {
        let Ok(threads) = self.probe.threads() else {
            return;
        };
        let mut list: Vec<IntruderRecord> = threads
            .into_iter()
            .map(|(k, t)| IntruderRecord {
                cpu: k.cpu,
                tid: k.tid,
                tgid: t.tgid,
                comm: crate::bpf::probe::comm_str(&t.comm),
                class: class::name(t.class),
                run_ns: t.run_ns,
                slices: t.slices,
                max_slice_ns: t.max_slice_ns,
            })
            .collect();
        list.sort_by_key(|i| std::cmp::Reverse(i.run_ns));
        list.truncate(TOP_INTRUDERS);
        let json = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into()) + "\n";
        *self.intruders.lock().unwrap_or_else(|e| e.into_inner()) = json;
    }

    fn prune_threads(&mut self) {
        let Ok(threads) = self.probe.threads() else {
            return;
        };
        let mut alive_cache: HashMap<u32, bool> = HashMap::new();
        for (key, stats) in threads {
            let alive = *alive_cache.entry(key.tid).or_insert_with(|| {
                std::path::Path::new(&format!("/proc/{}/task/{}", stats.tgid, key.tid)).exists()
            });
            if !alive {
                let _ = self.probe.remove_thread(key);
            }
        }
        // Allowlisted threads that exited: their ids may be reused by anyone.
        if let Ok(allowed) = self.probe.allowed() {
            for tid in allowed {
                if !std::path::Path::new(&format!("/proc/{tid}")).exists() {
                    let _ = self.probe.remove_allowed(tid);
                    self.emulators_allowed.remove(&tid);
                }
            }
        }
    }
}

fn role_name(e: &plan::Entry) -> String {
    match (e.role, e.vcpu) {
        (Role::Vcpu, Some(i)) => format!("vcpu {i}"),
        _ => "emulator thread".into(),
    }
}
