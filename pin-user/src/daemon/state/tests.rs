//! The daemon's decisions, driven with a fake host: two CPUs, CPU 1 guarded.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    time::{Duration, Instant},
};

use pin_common::ThreadKey;

use super::*;
use crate::{
    bpf::{
        events::{AffinityChange, Intrusion, Migration, Process, Thread},
        probe::ProbeError,
    },
    control::{Allow, Request},
    daemon::effects::{Discovered, Effects},
    guests::{DiscoverError, Manager, Source, Vcpu},
    host::{
        affinity::{Affinities, fake::Table},
        procfs::ThreadInfo,
    },
    placement::place::Placement,
};

const GUEST: u32 = 100;
const VCPU: u32 = 101;
const EMU: u32 = 102;
const STRANGER: u32 = 500;

#[derive(Default)]
struct Fake {
    aff: Table,
    guests: Vec<Guest>,
    /// /proc: (tgid, tid) -> facts.
    threads: BTreeMap<(u32, u32), ThreadInfo>,
    owners: BTreeMap<u32, u32>,
    watched: BTreeSet<u32>,
    exit_watched: BTreeSet<u32>,
    allowed: BTreeMap<u32, Option<u32>>,
    scans: u32,
    /// CPU 1 is offline (hotplug).
    offline_cpu: Option<()>,
    /// Discovery requests not answered yet (None: a full scan).
    requests: std::collections::VecDeque<Option<u32>>,
    /// Processes holding KVM vCPUs.
    kvm: BTreeSet<u32>,
    /// pid -> parent pid.
    parents: BTreeMap<u32, u32>,
    clock: Duration,
    start: Option<Instant>,
    /// Threads placed through their guest's manager: (tid, manager).
    placed: Vec<(u32, Manager)>,
    /// What the isolate applier changes, and the planner's facts about it
    /// (their values are read from `iso` at each call).
    iso: crate::isolate::apply::fake::Host,
    iso_facts: Option<crate::isolate::facts::Facts>,
}

impl Placement for Fake {
    fn place(&mut self, t: &Target<'_>, cpus: &CpuSet) -> Result<(), AffinityError> {
        self.placed.push((t.tid, t.manager));
        self.aff.set(t.tid, cpus)
    }
}

impl Affinities for Fake {
    fn get(&self, tid: u32) -> Result<CpuSet, AffinityError> {
        self.aff.get(tid)
    }

    fn set(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
        self.aff.set(tid, cpus)
    }
}

impl Effects for Fake {
    type Isolation = crate::isolate::apply::fake::Host;

    fn isolation_facts(
        &self,
        _guard: &Guard,
    ) -> Result<crate::isolate::facts::Facts, crate::isolate::IsolateError> {
        use crate::isolate::facts::{V1_FILES, V1_GUARDED, V1_HOUSEKEEPING};
        let mut f = self.iso_facts.clone().expect("isolation facts");
        let h = &self.iso;
        let now = |p: &std::path::Path| h.files[p].clone();
        for s in &mut f.sysctls {
            s.value.text = now(&s.value.path);
        }
        for w in f.workqueues.iter_mut().chain(f.default_irq.as_mut()) {
            w.text = now(&w.path);
        }
        for i in &mut f.irqs {
            i.affinity.text = now(&i.affinity.path);
        }
        if let Some(v1) = &mut f.v1 {
            v1.load_balance = h
                .files
                .get(&v1.root.join("cpuset.sched_load_balance"))
                .cloned();
            let files = |dir: std::path::PathBuf| {
                h.dirs.contains(&dir).then(|| {
                    V1_FILES
                        .iter()
                        .filter_map(|n| {
                            h.files
                                .get(&dir.join(n))
                                .map(|v| (n.to_string(), v.clone()))
                        })
                        .collect()
                })
            };
            v1.housekeeping_files = files(v1.root.join(V1_HOUSEKEEPING));
            v1.guarded_files = files(v1.root.join(V1_GUARDED));
        }
        for t in &mut f.threads {
            if let Some((_, cg, aff)) = h.threads.get(&t.info.tid) {
                t.cpuset = Some(cg.clone());
                t.info.allowed = aff.clone();
            }
        }
        Ok(f)
    }

    fn isolation(&mut self) -> &mut Self::Isolation {
        &mut self.iso
    }

    fn set_owner(&mut self, tid: u32, cpu: u32) -> Result<(), ProbeError> {
        self.owners.insert(tid, cpu);
        Ok(())
    }
    fn remove_owner(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.owners.remove(&tid);
        Ok(())
    }
    fn set_watched(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.watched.insert(tid);
        Ok(())
    }
    fn remove_watched(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.watched.remove(&tid);
        Ok(())
    }
    fn set_guest(&mut self, pid: u32) -> Result<(), ProbeError> {
        self.exit_watched.insert(pid);
        Ok(())
    }
    fn remove_guest(&mut self, pid: u32) -> Result<(), ProbeError> {
        self.exit_watched.remove(&pid);
        Ok(())
    }
    fn set_allowed(&mut self, tid: u32, cpu: Option<u32>) -> Result<(), ProbeError> {
        self.allowed.insert(tid, cpu);
        Ok(())
    }
    fn remove_allowed(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.allowed.remove(&tid);
        Ok(())
    }
    fn allowed(&self) -> Result<Vec<u32>, ProbeError> {
        Ok(self.allowed.keys().copied().collect())
    }
    fn thread_keys(&self) -> Result<Vec<(ThreadKey, u32)>, ProbeError> {
        Ok(Vec::new())
    }
    fn remove_thread(&mut self, _key: ThreadKey) -> Result<(), ProbeError> {
        Ok(())
    }
    fn thread(&self, tgid: u32, tid: u32) -> io::Result<Option<ThreadInfo>> {
        Ok(self.threads.get(&(tgid, tid)).cloned())
    }
    fn start_time(&self, tgid: u32, tid: u32) -> Option<u64> {
        self.threads.get(&(tgid, tid)).map(|t| t.start_time)
    }
    fn comm(&self, tgid: u32, tid: u32) -> Option<String> {
        self.threads.get(&(tgid, tid)).map(|t| t.comm.clone())
    }
    fn cgroup(&self, _tgid: u32, _tid: u32) -> Option<String> {
        None
    }
    fn task_exists(&self, tgid: u32, tid: u32) -> bool {
        self.threads.contains_key(&(tgid, tid))
    }
    fn process_exists(&self, pid: u32) -> bool {
        self.threads.keys().any(|(tgid, _)| *tgid == pid)
    }
    fn is_kvm_guest(&self, pid: u32) -> bool {
        self.kvm.contains(&pid)
    }
    fn parent(&self, pid: u32) -> Option<u32> {
        self.parents.get(&pid).copied()
    }
    fn request_scan(&mut self) {
        self.scans += 1;
        self.requests.push_back(None);
    }
    fn request_rediscover(&mut self, pid: u32) {
        self.requests.push_back(Some(pid));
    }
    fn forget(&mut self, _pid: u32) {}
    fn set_discover_options(&mut self, _opts: DiscoverOptions) {}
    fn online_cpus(&self) -> Option<CpuSet> {
        Some(self.offline_cpu.map_or(cpus("0-1"), |_| cpus("0")))
    }
    fn now(&self) -> Instant {
        *self.start.as_ref().expect("clock started") + self.clock
    }
}

fn cpus(s: &str) -> CpuSet {
    CpuSet::parse(s).unwrap()
}

fn thread(tgid: u32, tid: u32, comm: &str, flags: u32) -> ThreadInfo {
    ThreadInfo {
        tgid,
        tid,
        comm: comm.into(),
        state: 'R',
        flags,
        last_cpu: 1,
        allowed: cpus("0-1"),
        start_time: 1,
        sched: None,
    }
}

/// A host with one guest (one vCPU, one emulator thread), everything on
/// both CPUs, and a stranger thread.
fn host() -> Fake {
    let mut fx = Fake {
        start: Some(Instant::now()),
        ..Fake::default()
    };
    fx.guests.push(Guest {
        name: "g1".into(),
        pid: GUEST,
        vcpus: vec![Vcpu {
            index: 0,
            tid: VCPU,
        }],
        emulator_tids: vec![EMU],
        source: Source::Qmp,
        manager: Default::default(),
    });
    for (tgid, tid, comm) in [
        (GUEST, VCPU, "CPU 0/KVM"),
        (GUEST, EMU, "qemu-system-x86"),
        (STRANGER, STRANGER, "stress"),
    ] {
        fx.threads.insert((tgid, tid), thread(tgid, tid, comm, 0));
        fx.aff.cpus.insert(tid, cpus("0-1"));
    }
    fx
}

fn daemon(fx: Fake, config: &str) -> Daemon<Fake> {
    daemon_on(fx, config, 2)
}

/// [`daemon`] on a host of `cpus` CPUs (still CPU 1 guarded).
fn daemon_on(fx: Fake, config: &str, cpus: u32) -> Daemon<Fake> {
    let config = Config::parse(config, std::path::Path::new("test.toml")).unwrap();
    let topo = Topology::flat(cpus);
    let guard = topo.guard(Some(&CpuSet::single(1))).unwrap();
    let mut d = Daemon::new(
        config,
        topo,
        guard,
        fx,
        Arc::new(Metrics::new()),
        Recent::default(),
        VcpuTable::default(),
    );
    d.rescan();
    pump(&mut d);
    d
}

/// Answers the discovery requests, as the discovery thread would.
fn pump(d: &mut Daemon<Fake>) {
    while let Some(req) = d.fx.requests.pop_front() {
        let found = |pid: Option<u32>| -> Result<Discovery, DiscoverError> {
            Ok(Discovery {
                guests: d
                    .fx
                    .guests
                    .iter()
                    .filter(|g| pid.is_none_or(|p| p == g.pid))
                    .cloned()
                    .collect(),
                ..Discovery::default()
            })
        };
        let answer = match req {
            None => Discovered::Scan(found(None)),
            Some(pid) => Discovered::Pid(pid, found(Some(pid))),
        };
        d.discovered(answer);
    }
}

const ENFORCE: &str = "mode = \"enforce\"\n";

fn ev_thread(tid: u32, tgid: u32, comm: &str) -> Thread {
    Thread {
        tid,
        tgid,
        comm: comm.into(),
    }
}

fn intrusion(tid: u32, tgid: u32, comm: &str, class: ThreadClass) -> KernelEvent {
    KernelEvent::Intrusion(Intrusion {
        cpu: 1,
        thread: ev_thread(tid, tgid, comm),
        cgroup_id: 0,
        start_ns: 0,
        run_ns: 200_000,
        total_ns: 200_000,
        slices: 1,
        class,
    })
}

fn kinds(d: &Daemon<Fake>) -> Vec<ViolationKind> {
    d.recent.to_vec().iter().map(|v| v.kind).collect()
}

fn counter(d: &Daemon<Fake>, name: &str, labels: &[(&str, &str)]) -> f64 {
    for f in d.metrics.registry.gather() {
        if f.name() != name {
            continue;
        }
        for m in f.get_metric() {
            let have: BTreeMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
                return match f.get_field_type() {
                    prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                    _ => m.get_counter().get_value(),
                };
            }
        }
    }
    0.0
}

#[test]
fn observe_mode_registers_owners_and_reports_drift_without_moving_anything() {
    let d = daemon(host(), "");
    assert_eq!(d.fx.owners, BTreeMap::from([(VCPU, 1)]));
    assert!(d.fx.watched.contains(&VCPU));
    assert!(d.fx.exit_watched.contains(&GUEST));
    assert!(
        d.fx.aff.log.is_empty(),
        "observe mode moved {:?}",
        d.fx.aff.log
    );
    assert_eq!(kinds(&d), [ViolationKind::VcpuDrift]);
    assert_eq!(counter(&d, "pinguard_vcpu_pinned", &[("vm", "g1")]), 0.0);
    assert_eq!(counter(&d, "pinguard_vms", &[]), 1.0);
}

#[test]
fn a_drift_is_reported_once_not_at_every_tick() {
    let mut d = daemon(host(), "");
    d.tick();
    d.tick();
    assert_eq!(kinds(&d), [ViolationKind::VcpuDrift]);
}

#[test]
fn enforce_mode_applies_the_plan_emulators_first() {
    let d = daemon(host(), ENFORCE);
    let moved: Vec<u32> = d.fx.aff.log.iter().map(|(tid, _)| *tid).collect();
    assert_eq!(moved, [EMU, VCPU]);
    assert_eq!(d.fx.aff.cpus[&VCPU], cpus("1"));
    assert_eq!(d.fx.aff.cpus[&EMU], cpus("0"));
    assert_eq!(counter(&d, "pinguard_vcpu_pinned", &[("vm", "g1")]), 1.0);
    assert_eq!(counter(&d, "pinguard_repins_total", &[("vm", "g1")]), 1.0);
    assert!(kinds(&d).is_empty(), "{:?}", d.recent.to_vec());
}

#[test]
fn another_tool_widening_a_vcpu_is_reported_and_undone() {
    let mut d = daemon(host(), ENFORCE);
    d.fx.aff.cpus.insert(VCPU, cpus("0-1"));
    d.handle(&KernelEvent::AffinityChange(AffinityChange {
        cpu: 0,
        caller: ev_thread(STRANGER, STRANGER, "taskset"),
        target_tid: VCPU,
        mask: cpus("0-1"),
        at_ns: 0,
    }));
    assert_eq!(kinds(&d), [ViolationKind::AffinityChanged]);
    let v = &d.recent.to_vec()[0];
    assert_eq!((v.vm.as_deref(), v.vcpu), (Some("g1"), Some(0)));
    assert_eq!(d.fx.aff.cpus[&VCPU], cpus("1"), "not re-pinned");
}

#[test]
fn a_widening_nothing_traced_is_caught_at_the_next_tick_culprit_unknown() {
    // No syscall tracepoints (the default): a widened affinity that moved
    // nothing sends no event; the periodic verify finds and undoes it.
    let mut d = daemon(host(), ENFORCE);
    d.fx.aff.cpus.insert(VCPU, cpus("0-1"));
    d.tick();
    assert_eq!(kinds(&d), [ViolationKind::VcpuDrift]);
    let v = &d.recent.to_vec()[0];
    assert!(v.detail.ends_with(super::CULPRIT_UNKNOWN), "{}", v.detail);
    assert_eq!(d.fx.aff.cpus[&VCPU], cpus("1"), "not re-pinned");
    // With them, the affinity_changed violation names the caller instead.
    let mut d = daemon(
        host(),
        &format!("{ENFORCE}\n[observer]\naffinity_syscalls = true\n"),
    );
    d.fx.aff.cpus.insert(VCPU, cpus("0-1"));
    d.tick();
    let v = &d.recent.to_vec()[0];
    assert!(!v.detail.contains("unknown"), "{}", v.detail);
}

#[test]
fn setting_a_vcpu_to_its_assigned_cpu_is_not_a_violation() {
    // `pinguard pin` (or libvirt, pinning for pinguard) in observe mode.
    let mut h = host();
    h.aff.cpus.insert(VCPU, cpus("1"));
    let mut d = daemon(h, "");
    d.handle(&KernelEvent::AffinityChange(AffinityChange {
        cpu: 1,
        caller: ev_thread(STRANGER, STRANGER, "pinguard"),
        target_tid: VCPU,
        mask: cpus("1"),
        at_ns: 0,
    }));
    assert!(kinds(&d).is_empty(), "{:?}", d.recent.to_vec());
}

#[test]
fn on_a_host_of_more_than_64_cpus_a_change_is_judged_by_the_whole_new_mask() {
    // The event holds the new mask's first 64 CPUs: "CPUs 1 and 100" arrives
    // as {1}, which alone would pass for the vCPU's own CPU.
    let mut h = host();
    h.aff.cpus.insert(VCPU, cpus("1"));
    let mut d = daemon_on(h, "", 128);
    assert!(kinds(&d).is_empty(), "{:?}", d.recent.to_vec());
    d.fx.aff.cpus.insert(VCPU, cpus("1,100"));
    d.handle(&KernelEvent::AffinityChange(AffinityChange {
        cpu: 1,
        caller: ev_thread(STRANGER, STRANGER, "taskset"),
        target_tid: VCPU,
        mask: cpus("1"),
        at_ns: 0,
    }));
    assert!(
        kinds(&d).contains(&ViolationKind::AffinityChanged),
        "widening to CPU 100 not reported: {:?}",
        d.recent.to_vec()
    );
    let v = &d.recent.to_vec()[0];
    assert!(v.detail.contains("1,100"), "{}", v.detail);

    // And exactly its CPU, set by `pinguard pin`, is still no violation.
    let mut h = host();
    h.aff.cpus.insert(VCPU, cpus("1"));
    let mut d = daemon_on(h, "", 128);
    d.handle(&KernelEvent::AffinityChange(AffinityChange {
        cpu: 1,
        caller: ev_thread(STRANGER, STRANGER, "pinguard"),
        target_tid: VCPU,
        mask: cpus("1"),
        at_ns: 0,
    }));
    assert!(kinds(&d).is_empty(), "{:?}", d.recent.to_vec());
}

#[test]
fn a_libvirt_domains_vcpu_is_re_pinned_through_libvirt() {
    let mut h = host();
    h.guests[0].manager = Manager::Libvirt;
    let mut d = daemon(h, ENFORCE);
    assert!(
        d.fx.placed.contains(&(VCPU, Manager::Libvirt)),
        "{:?}",
        d.fx.placed
    );
    // `virsh vcpupin g1 0 0`: libvirt moves the vCPU away; it comes back through libvirt.
    d.fx.placed.clear();
    d.fx.aff.cpus.insert(VCPU, cpus("0"));
    d.tick();
    assert_eq!(d.fx.placed, [(VCPU, Manager::Libvirt)]);
    assert_eq!(d.fx.aff.cpus[&VCPU], cpus("1"));
}

#[test]
fn intruders_are_evicted_in_enforce_mode_only() {
    let mut d = daemon(host(), "");
    d.handle(&intrusion(
        STRANGER,
        STRANGER,
        "stress",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(
        d.fx.aff.cpus[&STRANGER],
        cpus("0-1"),
        "observe mode evicted"
    );
    assert!(kinds(&d).contains(&ViolationKind::Intruder));

    let mut d = daemon(host(), ENFORCE);
    d.handle(&intrusion(
        STRANGER,
        STRANGER,
        "stress",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(d.fx.aff.cpus[&STRANGER], cpus("0"));
    assert_eq!(
        counter(&d, "pinguard_evictions_total", &[("cpu", "1")]),
        1.0
    );
}

#[test]
fn kernel_threads_and_guest_threads_are_never_evicted() {
    let mut fx = host();
    fx.threads.insert(
        (77, 77),
        thread(77, 77, "kworker/u4:1", pin_common::PF_KTHREAD),
    );
    fx.aff.cpus.insert(77, cpus("0-1"));
    let mut d = daemon(fx, ENFORCE);
    let before = d.fx.aff.log.len();
    d.handle(&intrusion(
        77,
        77,
        "kworker/u4:1",
        ThreadClass::IntruderKthread,
    ));
    // The guest's emulator thread back on the guarded CPU: the plan places it, not eviction.
    d.handle(&intrusion(
        EMU,
        GUEST,
        "qemu-system-x86",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(
        d.fx.aff.log.len(),
        before,
        "moved {:?}",
        &d.fx.aff.log[before..]
    );
    assert_eq!(
        counter(&d, "pinguard_evictions_total", &[("cpu", "1")]),
        0.0
    );
}

#[test]
fn a_thread_that_keeps_coming_back_is_evicted_with_back_off() {
    let mut d = daemon(host(), ENFORCE);
    let evict_again = |d: &mut Daemon<Fake>| {
        d.fx.aff.cpus.insert(STRANGER, cpus("0-1"));
        d.handle(&intrusion(
            STRANGER,
            STRANGER,
            "stress",
            ThreadClass::IntruderUser,
        ));
        counter(d, "pinguard_evictions_total", &[("cpu", "1")])
    };
    assert_eq!(evict_again(&mut d), 1.0);
    // Back within the minimum interval (100 ms): left alone for now.
    d.fx.clock += Duration::from_millis(50);
    assert_eq!(evict_again(&mut d), 1.0);
    d.fx.clock += Duration::from_millis(100);
    assert_eq!(evict_again(&mut d), 2.0);
    // The second strike doubles the wait: 150 ms is not enough.
    d.fx.clock += Duration::from_millis(150);
    assert_eq!(evict_again(&mut d), 2.0);
    d.fx.clock += Duration::from_millis(100);
    assert_eq!(evict_again(&mut d), 3.0);
}

#[test]
fn a_failing_repin_is_counted_by_errno_and_backs_off() {
    let mut d = daemon(host(), ENFORCE);
    for _ in 0..5 {
        d.fx.aff.cpus.insert(VCPU, cpus("0-1"));
        d.fx.aff.fail.insert(
            VCPU,
            AffinityError::Invalid {
                tid: VCPU,
                cpus: cpus("1"),
            },
        );
        d.tick();
    }
    let errors = counter(
        &d,
        "pinguard_enforcement_errors_total",
        &[("action", "repin"), ("errno", "EINVAL")],
    );
    // No clock advance: the first attempt only; the rest wait out the back-off.
    assert_eq!(errors, 1.0);
    assert_eq!(kinds(&d), [ViolationKind::VcpuDrift], "reported once");
}

#[test]
fn allowlisted_threads_are_allowed_in_the_kernel_not_reported() {
    let mut d = daemon(host(), &format!("{ENFORCE}[[allow]]\ncomm = \"str*\"\n"));
    d.handle(&intrusion(
        STRANGER,
        STRANGER,
        "stress",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(
        d.fx.allowed.get(&STRANGER),
        Some(&None),
        "allowed on any guarded CPU"
    );
    assert_eq!(
        d.fx.aff.cpus[&STRANGER],
        cpus("0-1"),
        "an allowed thread was evicted"
    );
    assert!(kinds(&d).is_empty());
    d.handle(&KernelEvent::MigrateIn(Migration {
        thread: ev_thread(STRANGER, STRANGER, "stress"),
        from_cpu: 0,
        to_cpu: 1,
        at_ns: 0,
    }));
    assert!(kinds(&d).is_empty());
}

/// `pinguard latency` (LAT) and its cyclictest child (CT, measuring
/// thread CT_T), as the control socket registers them.
const LAT: u32 = 600;
const CT: u32 = 610;
const CT_T: u32 = 611;

fn with_latency() -> Fake {
    let mut fx = host();
    for (tgid, tid, comm) in [
        (LAT, LAT, "pinguard"),
        (CT, CT, "cyclictest"),
        (CT, CT_T, "cyclictest"),
    ] {
        fx.threads.insert((tgid, tid), thread(tgid, tid, comm, 0));
        fx.aff.cpus.insert(tid, cpus("1"));
    }
    fx.parents.insert(CT, LAT);
    fx.parents.insert(STRANGER, 1);
    fx
}

fn allow(pid: u32, tid: Option<u32>, children: bool) -> Request {
    Request::Allow(Allow {
        pid,
        tid,
        start_time: 1,
        cpu: 1,
        children,
        what: "pinguard latency".into(),
    })
}

#[test]
fn registered_measuring_threads_are_neither_evicted_nor_intruders() {
    let mut d = daemon(with_latency(), ENFORCE);
    let hello = d.control(1, LAT, Request::Hello);
    let info = hello.daemon.unwrap();
    assert!(hello.ok);
    assert_eq!(
        (info.mode.as_str(), info.guarded.as_str()),
        ("enforce", "1")
    );
    // Before cyclictest starts: latency registers itself and its children.
    assert!(d.control(1, LAT, allow(LAT, None, true)).ok);
    // cyclictest's first slice and its move onto CPU 1 come before it is
    // seen by latency: covered as latency's child.
    d.handle(&KernelEvent::MigrateIn(Migration {
        thread: ev_thread(CT_T, CT, "cyclictest"),
        from_cpu: 0,
        to_cpu: 1,
        at_ns: 0,
    }));
    d.handle(&intrusion(
        CT_T,
        CT,
        "cyclictest",
        ThreadClass::IntruderUser,
    ));
    assert!(kinds(&d).is_empty(), "{:?}", kinds(&d));
    assert_eq!(d.fx.aff.cpus[&CT_T], cpus("1"), "evicted");
    assert_eq!(
        counter(&d, "pinguard_evictions_total", &[("cpu", "1")]),
        0.0
    );
    assert_eq!(
        d.fx.allowed.get(&CT_T),
        Some(&Some(1)),
        "allowed in the kernel"
    );
    // Then the measuring thread itself, by tid.
    assert!(d.control(1, LAT, allow(CT, Some(CT_T), false)).ok);
    // Anyone else is still an intruder, and evicted.
    d.handle(&intrusion(
        STRANGER,
        STRANGER,
        "stress",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(kinds(&d), [ViolationKind::Intruder]);
    assert_eq!(d.fx.aff.cpus[&STRANGER], cpus("0"));
    // The connection closes: the allowance goes with it.
    d.disconnected(1);
    assert_eq!(d.fx.allowed.get(&CT_T), None);
    d.handle(&intrusion(
        CT_T,
        CT,
        "cyclictest",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(d.fx.aff.cpus[&CT_T], cpus("0"), "no longer registered");
}

#[test]
fn registrations_are_checked_and_end_with_their_process() {
    let mut d = daemon(with_latency(), ENFORCE);
    // Not the caller's own process or child, as a whole.
    let r = d.control(1, LAT, allow(STRANGER, None, false));
    assert!(!r.ok);
    assert!(r.error.unwrap().contains("neither the caller"));
    // One thread of it, by tid and start time (a guest's vCPU thread that
    // `latency --vm` measures through): allowed, and gone with the connection.
    assert!(d.control(3, LAT, allow(STRANGER, Some(STRANGER), false)).ok);
    assert_eq!(d.fx.allowed.get(&STRANGER), Some(&Some(1)));
    d.disconnected(3);
    assert_eq!(d.fx.allowed.get(&STRANGER), None);
    // A start time that is not the thread's: the id was reused.
    let mut a = allow(CT, Some(CT_T), false);
    if let Request::Allow(a) = &mut a {
        a.start_time = 5;
    }
    let r = d.control(1, LAT, a);
    assert!(r.error.unwrap().contains("started at 1, not 5"));
    assert!(!d.control(1, LAT, allow(CT, Some(999), false)).ok);
    assert!(d.fx.allowed.is_empty());
    // The registered thread exits: dropped at the next prune.
    assert!(d.control(2, LAT, allow(CT, Some(CT_T), false)).ok);
    assert_eq!(d.fx.allowed.get(&CT_T), Some(&Some(1)));
    d.fx.threads.remove(&(CT, CT_T));
    d.fx.threads.remove(&(CT, CT));
    for _ in 0..10 {
        d.tick();
    }
    assert_eq!(d.fx.allowed.get(&CT_T), None);
    // A new process reusing the id is not covered.
    d.fx.threads.insert(
        (CT, CT_T),
        ThreadInfo {
            start_time: 9,
            ..thread(CT, CT_T, "x", 0)
        },
    );
    d.handle(&intrusion(CT_T, CT, "x", ThreadClass::IntruderUser));
    assert_eq!(kinds(&d), [ViolationKind::Intruder]);
}

#[test]
fn emulators_placed_with_vcpu0_are_allowed_not_evicted() {
    let d = daemon(
        host(),
        &format!("{ENFORCE}[placement]\nemulator = \"with-vcpu0\"\n"),
    );
    assert_eq!(d.fx.aff.cpus[&EMU], cpus("1"));
    assert_eq!(d.fx.allowed.get(&EMU), Some(&Some(1)));
}

#[test]
fn a_guest_that_exits_takes_its_ownership_and_series_with_it() {
    let mut d = daemon(host(), ENFORCE);
    assert_eq!(counter(&d, "pinguard_vcpu_info", &[("vm", "g1")]), 1.0);
    d.fx.guests.clear();
    d.handle(&KernelEvent::Exit(Process {
        thread: ev_thread(GUEST, GUEST, "qemu-system-x86"),
        at_ns: 0,
    }));
    assert!(d.fx.owners.is_empty());
    assert!(d.fx.watched.is_empty());
    assert!(d.fx.exit_watched.is_empty());
    assert_eq!(counter(&d, "pinguard_vms", &[]), 0.0);
    assert_eq!(counter(&d, "pinguard_vcpu_info", &[("vm", "g1")]), 0.0);
    assert!(d.vcpu_table.snapshot().is_empty());
}

#[test]
fn an_exec_schedules_rescans_that_find_the_new_guest() {
    let mut fx = host();
    let g = fx.guests.pop().unwrap();
    let mut d = daemon(fx, ENFORCE);
    assert_eq!(counter(&d, "pinguard_vms", &[]), 0.0);
    d.fx.guests.push(g);
    d.handle(&KernelEvent::Exec(Process {
        thread: ev_thread(GUEST, GUEST, "qemu-system-x86"),
        at_ns: 0,
    }));
    let due = d.next_retry_in().expect("a rescan is scheduled");
    d.fx.clock += due;
    d.tick();
    pump(&mut d);
    assert_eq!(counter(&d, "pinguard_vms", &[]), 1.0);
    assert_eq!(d.fx.owners, BTreeMap::from([(VCPU, 1)]));
}

#[test]
fn a_vcpu_that_leaves_its_cpu_is_reported_once_with_its_vm() {
    let mut d = daemon(host(), "");
    d.fx.aff.cpus.insert(VCPU, cpus("1"));
    d.tick();
    let before = kinds(&d).len();
    d.handle(&KernelEvent::OwnerAway(Migration {
        thread: ev_thread(VCPU, GUEST, "CPU 0/KVM"),
        from_cpu: 1,
        to_cpu: 0,
        at_ns: 0,
    }));
    let v = d.recent.to_vec();
    assert_eq!(v.len(), before + 1);
    let last = v.last().unwrap();
    assert_eq!(last.kind, ViolationKind::VcpuDrift);
    assert_eq!(last.vm.as_deref(), Some("g1"));
}

#[test]
fn a_thread_named_like_a_vcpu_is_evicted_unless_its_process_holds_kvm_vcpus() {
    let mut fx = host();
    // A stranger's thread that named itself like a vCPU, and a guest not
    // discovered yet (just started) whose vCPU already ran on CPU 1.
    fx.threads
        .insert((STRANGER, 501), thread(STRANGER, 501, "CPU 0/KVM", 0));
    fx.aff.cpus.insert(501, cpus("0-1"));
    fx.threads
        .insert((900, 901), thread(900, 901, "CPU 0/KVM", 0));
    fx.aff.cpus.insert(901, cpus("0-1"));
    fx.kvm.insert(900);
    let mut d = daemon(fx, ENFORCE);
    let scans = d.fx.scans;
    d.handle(&intrusion(
        501,
        STRANGER,
        "CPU 0/KVM",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(
        d.fx.aff.cpus[&501],
        cpus("0"),
        "the impostor was not evicted"
    );
    d.handle(&intrusion(901, 900, "CPU 0/KVM", ThreadClass::IntruderUser));
    assert_eq!(
        d.fx.aff.cpus[&901],
        cpus("0-1"),
        "a new guest's vCPU was evicted"
    );
    d.tick();
    assert_eq!(
        d.fx.scans,
        scans + 1,
        "the new guest's vCPU did not trigger a rescan"
    );
}

#[test]
fn a_reload_without_mode_cannot_switch_enforcement_off() {
    let mut d = daemon(host(), ENFORCE);
    let empty = Config::parse("guard = \"1\"\n", std::path::Path::new("t.toml")).unwrap();
    let err = d.reload(empty).unwrap_err();
    assert!(err.contains("does not set `mode`"), "{err}");
    assert_eq!(d.config.mode, Mode::Enforce);
    let text = "guard = \"1\"\nmode = \"observe\"\n";
    let observe = Config::parse(text, std::path::Path::new("t.toml")).unwrap();
    d.reload(observe).unwrap();
    pump(&mut d);
    assert_eq!(d.config.mode, Mode::Observe);
    // Saying nothing about the mode is fine when it does not change it.
    let same = Config::parse("guard = \"1\"\n", std::path::Path::new("t.toml")).unwrap();
    d.reload(same).unwrap();
}

#[test]
fn a_vcpu_id_reused_by_another_thread_is_never_repinned() {
    let mut d = daemon(host(), ENFORCE);
    assert_eq!(d.fx.aff.cpus[&VCPU], cpus("1"));
    // The guest died without an exit event; a new thread of the same process
    // id got the vCPU's id (another start time) and runs anywhere.
    let mut newcomer = thread(GUEST, VCPU, "worker", 0);
    newcomer.start_time = 99;
    d.fx.threads.insert((GUEST, VCPU), newcomer);
    d.fx.aff.cpus.insert(VCPU, cpus("0-1"));
    let moves = d.fx.aff.log.len();
    d.tick();
    // The id in another process altogether.
    d.fx.threads.remove(&(GUEST, VCPU));
    d.fx.threads
        .insert((777, VCPU), thread(777, VCPU, "worker", 0));
    d.tick();
    assert_eq!(
        d.fx.aff.log.len(),
        moves,
        "acted on {:?}",
        &d.fx.aff.log[moves..]
    );
    assert_eq!(d.fx.aff.cpus[&VCPU], cpus("0-1"));
    assert!(counter(&d, "pinguard_tasks_vanished_total", &[]) >= 2.0);
}

#[test]
fn the_threads_of_a_guest_going_away_are_not_evicted() {
    let mut d = daemon(host(), ENFORCE);
    d.fx.guests.clear();
    d.handle(&KernelEvent::Exit(Process {
        thread: ev_thread(GUEST, GUEST, "qemu-system-x86"),
        at_ns: 0,
    }));
    // Its vCPU thread still tears down on CPU 1, its KVM fds already gone.
    let moves = d.fx.aff.log.len();
    d.handle(&intrusion(
        VCPU,
        GUEST,
        "CPU 0/KVM",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(
        d.fx.aff.log.len(),
        moves,
        "a dying guest's vCPU was evicted"
    );
    // Long after, the id is someone else's business again.
    d.fx.clock += EXITED_GRACE;
    d.handle(&intrusion(
        VCPU,
        GUEST,
        "CPU 0/KVM",
        ThreadClass::IntruderUser,
    ));
    assert_eq!(d.fx.aff.log.len(), moves + 1);
}

#[test]
fn thread_churn_cannot_flood_the_log() {
    let mut fx = host();
    for tid in 1000..1200 {
        fx.threads.insert((tid, tid), thread(tid, tid, "churn", 0));
        fx.aff.cpus.insert(tid, cpus("0-1"));
    }
    let mut d = daemon(fx, ENFORCE);
    for tid in 1000..1200 {
        d.handle(&intrusion(tid, tid, "churn", ThreadClass::IntruderUser));
    }
    // 200 violations and 200 evictions in one instant: all counted and
    // listed, a burst of LOG_BURST logged.
    assert_eq!(
        counter(&d, "pinguard_evictions_total", &[("cpu", "1")]),
        200.0
    );
    assert_eq!(d.log_budget.suppressed, 400 - LOG_BURST as u64);
    d.tick();
    assert_eq!(
        d.log_budget.suppressed, 0,
        "the tick reports and resets the count"
    );
    // Then LOG_LINES_PER_SEC: one line 200 ms later, not two.
    d.fx.clock += Duration::from_millis(200);
    assert!(d.log_budget.allow(d.fx.now()));
    assert!(!d.log_budget.allow(d.fx.now()));
}

#[test]
fn discovery_runs_one_scan_at_a_time_and_repeats_one_asked_for_meanwhile() {
    let mut d = daemon(host(), "");
    let scans = d.fx.scans;
    d.rescan();
    d.rescan();
    d.rescan();
    assert_eq!(
        d.fx.scans,
        scans + 1,
        "scans queued up behind a running one"
    );
    pump(&mut d);
    assert_eq!(
        d.fx.scans,
        scans + 2,
        "the scan asked for meanwhile did not run after"
    );
    assert_eq!(counter(&d, "pinguard_vms", &[]), 1.0);
}

#[test]
fn a_vanished_vcpu_is_looked_at_again_off_the_loop_and_the_guest_dropped() {
    let mut d = daemon(host(), "");
    // The guest is gone without an exit event: its vCPU no longer exists.
    d.fx.threads.retain(|(tgid, _), _| *tgid != GUEST);
    d.fx.guests.clear();
    d.tick();
    assert!(
        d.fx.requests.is_empty(),
        "rediscovery before its retry was due"
    );
    d.fx.clock += d.next_retry_in().expect("a retry is scheduled");
    d.tick();
    assert_eq!(d.fx.requests, [Some(GUEST)]);
    // Asked once, however many ticks pass before the answer.
    d.tick();
    assert_eq!(d.fx.requests.len(), 1);
    pump(&mut d);
    assert_eq!(counter(&d, "pinguard_vms", &[]), 0.0);
    assert!(d.fx.owners.is_empty());
}

#[test]
fn a_guarded_cpu_going_offline_pauses_repinning_until_it_is_back() {
    let mut d = daemon(host(), ENFORCE);
    assert_eq!(counter(&d, "pinguard_cpu_guarded", &[("cpu", "1")]), 1.0);
    // CPU 1 goes offline: the kernel moves the vCPU (its affinity widens).
    d.fx.offline_cpu = Some(());
    d.fx.aff.cpus.insert(VCPU, cpus("0-1"));
    d.fx.aff.fail.insert(
        VCPU,
        AffinityError::Invalid {
            tid: VCPU,
            cpus: cpus("1"),
        },
    );
    let violations = d.recent.to_vec().len();
    for _ in 0..5 {
        d.fx.clock += Duration::from_secs(1);
        d.tick();
    }
    assert_eq!(counter(&d, "pinguard_cpu_guarded", &[("cpu", "1")]), 0.0);
    assert_eq!(
        counter(
            &d,
            "pinguard_enforcement_errors_total",
            &[("action", "repin")]
        ),
        0.0,
        "re-pinned onto an offline CPU"
    );
    assert_eq!(
        d.recent.to_vec().len(),
        violations,
        "drift reported while offline"
    );
    // Back online: re-pinned at the next tick.
    d.fx.offline_cpu = None;
    d.fx.aff.fail.clear();
    d.fx.clock += Duration::from_secs(1);
    d.tick();
    assert_eq!(counter(&d, "pinguard_cpu_guarded", &[("cpu", "1")]), 1.0);
    assert_eq!(d.fx.aff.cpus[&VCPU], cpus("1"));
}

/// A host to isolate: the isolate planner's 2-CPU cgroup v1 fixture (IRQs,
/// workqueues, sysctls, tasks in the root cpuset), behind the fake.
fn isolatable() -> Fake {
    let facts = crate::isolate::plan::tests_support::host(true, false);
    let mut fx = host();
    fx.iso = crate::isolate::apply::fake::Host::from_facts(&facts);
    fx.iso_facts = Some(facts);
    fx
}

fn iso_store(dir: &tempfile::TempDir) -> Store {
    Store {
        path: dir.path().join("isolation.json"),
        boot_id: "boot".into(),
    }
}

const RUNTIME: &str = "isolation = \"runtime\"\nisolation_interval = \"1s\"\n";

fn repairs(d: &Daemon<Fake>, what: &str) -> f64 {
    counter(d, "pinguard_isolation_repairs_total", &[("what", what)])
}

#[test]
fn runtime_isolation_is_kept_counted_and_undone_at_exit_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let fx = isolatable();
    let files_before = fx.iso.files.clone();
    let mut threads_before = fx.iso.threads.clone();
    let mut d = daemon(fx, &format!("{RUNTIME}isolation_undo_on_exit = true\n"));
    d.start_isolation(iso_store(&dir)).unwrap();
    let irq = std::path::PathBuf::from("/proc/irq/24/smp_affinity");
    let timer = std::path::PathBuf::from("/proc/sys/kernel/timer_migration");
    assert_eq!(d.fx.iso.files[&irq], "1");
    assert_eq!(d.fx.iso.threads[&1].1, "/pinguard-housekeeping");
    assert_eq!(
        counter(
            &d,
            "pinguard_isolation_active",
            &[("cpu", "1"), ("mechanism", "shield")]
        ),
        1.0
    );
    assert_eq!(repairs(&d, "irq"), 0.0, "applying is not repairing");
    let recorded = d.isolation.as_ref().unwrap().state.changes.len();

    // Something undoes parts of it, and a task appears outside the shield.
    d.fx.iso.files.insert(timer.clone(), "1".into());
    d.fx.iso.files.insert(irq.clone(), "3".into());
    d.fx.iso
        .threads
        .insert(600, (6000, "/".into(), cpus("0-1")));
    threads_before.insert(600, (6000, "/".into(), cpus("0-1")));
    d.fx.iso_facts
        .as_mut()
        .unwrap()
        .threads
        .push(crate::isolate::plan::thread(
            600,
            600,
            "forked",
            0,
            "0-1",
            Some("/"),
        ));
    d.tick();
    assert_eq!(
        d.fx.iso.files[&irq], "3",
        "on its own interval, not at ticks"
    );
    d.keep_isolation();
    assert_eq!(d.fx.iso.files[&irq], "1");
    assert_eq!(d.fx.iso.files[&timer], "0");
    assert_eq!(d.fx.iso.threads[&600].1, "/pinguard-housekeeping");
    assert_eq!(
        (
            repairs(&d, "irq"),
            repairs(&d, "sysctl"),
            repairs(&d, "task")
        ),
        (1.0, 1.0, 1.0)
    );
    assert_eq!(repairs(&d, "workqueue"), 0.0, "every kind exists at 0");
    // A second drift of the same IRQ: counted, recorded once (the first
    // record holds the value from before the isolation).
    d.fx.iso.files.insert(irq.clone(), "2".into());
    d.keep_isolation();
    assert_eq!(repairs(&d, "irq"), 2.0);
    let state = &d.isolation.as_ref().unwrap().state;
    assert_eq!(state.changes.len(), recorded + 1, "the new task only");
    let on_disk = iso_store(&dir).load().unwrap().unwrap();
    assert_eq!(&on_disk, state);

    d.stop_isolation();
    assert_eq!(d.fx.iso.files, files_before);
    assert_eq!(d.fx.iso.threads, threads_before);
    assert!(d.fx.iso.dirs.is_empty(), "{:?}", d.fx.iso.dirs);
    assert!(!dir.path().join("isolation.json").exists());
    assert_eq!(
        counter(&d, "pinguard_isolation_active", &[("cpu", "1")]),
        0.0
    );
}

#[test]
fn runtime_isolation_stays_at_exit_by_default_and_the_next_start_takes_it_over() {
    let dir = tempfile::tempdir().unwrap();
    let fx = isolatable();
    let files_before = fx.iso.files.clone();
    let mut d = daemon(fx, RUNTIME);
    d.start_isolation(iso_store(&dir)).unwrap();
    let recorded = d.isolation.as_ref().unwrap().state.clone();
    d.stop_isolation();
    let irq = std::path::PathBuf::from("/proc/irq/24/smp_affinity");
    assert_eq!(d.fx.iso.files[&irq], "1", "still applied");
    assert_eq!(iso_store(&dir).load().unwrap().as_ref(), Some(&recorded));

    // The next daemon (same host) finds it complete and changes nothing.
    let Daemon { fx, .. } = d;
    let writes = fx.iso.writes.len();
    let mut d = daemon(fx, RUNTIME);
    d.start_isolation(iso_store(&dir)).unwrap();
    assert_eq!(
        d.fx.iso.writes.len(),
        writes,
        "{:?}",
        &d.fx.iso.writes[writes..]
    );
    assert_eq!(d.isolation.as_ref().unwrap().state, recorded);

    // `pinguard isolate --undo` still restores everything.
    let store = iso_store(&dir);
    let (_, r) = crate::isolate::apply::undo_from(&mut d.fx.iso, &store).unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(d.fx.iso.files, files_before);
}

#[test]
fn runtime_isolation_of_other_cpus_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = iso_store(&dir);
    store
        .save(&State::new(
            cpus("0"),
            cpus("1"),
            crate::isolate::Mechanism::Affinity,
            "boot".into(),
        ))
        .unwrap();
    let mut d = daemon(isolatable(), RUNTIME);
    let e = d.start_isolation(store).unwrap_err().to_string();
    assert!(e.contains("already active") && e.contains("--undo"), "{e}");
    assert!(d.fx.iso.writes.is_empty(), "{:?}", d.fx.iso.writes);
}
