//! Loading, configuring and reading pinguard's eBPF observer.
//!
//! One `Probe` owns the loaded object: its programs stay attached until the
//! `Probe` is dropped (aya detaches links on drop), so an early return or a
//! panic never leaves a program behind.
use std::{collections::BTreeMap, io, path::Path, time::Duration};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, ProgramError, RawTracePoint, TracePoint, links::FdLink},
};
use pin_common::{
    ANY_CPU, CpuStats, GuardState, IrqKey, NO_CPU, NoiseStat, NoiseState, SoftirqStats,
    TASK_COMM_LEN, TaskInfo, ThreadKey, ThreadStats, WaitHist, Waiting, counter, global, guard,
    map, program, watch,
};
use thiserror::Error;

use crate::{
    bpf::{
        btf::{Btf, BtfError},
        events::{DecodeError, KernelEvent, decode},
        pinning::{self, Objects, PinningError, Pins},
    },
    host::cpulist::CpuSet,
};

/// The eBPF object built from pin-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pin"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "permission denied loading eBPF programs: run pinguard as root, or grant it CAP_BPF, CAP_PERFMON \
         and CAP_SYS_RESOURCE (see packaging/pinguard.service)"
    )]
    Permission,
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "tracefs is not mounted at /sys/kernel/tracing (needed for the sched_setaffinity and classic \
         tracepoints): mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    NoTracefs,
    #[error(
        "this pinguard binary was built with AYA_BUILD_SKIP=1 and contains no eBPF programs; rebuild with `cargo build --release`"
    )]
    EmptyObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("CPU {0} is beyond the {max} CPUs pinguard supports", max = pin_common::MAX_CPUS)]
    CpuOutOfRange(u32),
    #[error(transparent)]
    Pinning(#[from] PinningError),
    #[error(
        "the eBPF programs pinned in {dir} belong to a running pinguard (pid {pid}): one daemon per \
         host (stop it first; two daemons sharing one bpffs would share their maps)"
    )]
    InUse { dir: String, pid: u32 },
    #[error("program {name}: its link cannot be pinned: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> ProbeError {
    move |source| ProbeError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> ProbeError {
    move |source| {
        if is_eperm(&source) {
            ProbeError::Permission
        } else {
            ProbeError::Program { name, source }
        }
    }
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            // EACCES is what the verifier returns for a rejected program: not a privilege problem.
            if io.raw_os_error() == Some(libc::EPERM) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Kind of kernel hook for `sched_switch` (the benchmark compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hook {
    /// BTF-enabled raw tracepoint (tp_btf): cheapest, needs kernel BTF.
    #[default]
    TpBtf,
    /// Raw tracepoint.
    RawTp,
    /// Classic perf-event tracepoint.
    Tracepoint,
}

/// What to load and attach.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub guarded: CpuSet,
    pub hook: Hook,
    /// Minimum time between two intrusion events of one thread on one CPU.
    pub event_interval: Duration,
    /// Attach sched_migrate_task (migrations onto guarded CPUs, owners leaving).
    pub migrations: bool,
    /// Attach the sched_setaffinity syscall tracepoints (who changed a vCPU's
    /// affinity). Off by default: they put every syscall of every thread of
    /// the host on the traced-syscall slow path (`[observer] affinity_syscalls`).
    pub affinity: bool,
    /// Attach exec/exit hooks (QEMU starting, guests and vCPU threads exiting).
    pub lifecycle: bool,
    /// Attach IRQ/softirq/NMI timing.
    pub noise: bool,
    /// Attach `sched_wakeup(_new)`, which runs on every wake-up of every CPU:
    /// only latency probes need it (their episodes start at the wake-up);
    /// vCPU waits come from the kernel's `sched_info` at sched_switch.
    pub wakeups: bool,
    /// Size of the event ring buffer in bytes (a power of two, at least a page).
    pub events_bytes: u32,
}

impl ProbeConfig {
    pub fn new(guarded: CpuSet) -> Self {
        Self {
            guarded,
            hook: Hook::TpBtf,
            events_bytes: pin_common::EVENTS_BYTES,
            event_interval: Duration::from_secs(1),
            migrations: true,
            affinity: false,
            lifecycle: false,
            noise: true,
            wakeups: false,
        }
    }
}

/// Kernel-side counters of things that went wrong or were dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub events_lost: u64,
    pub thread_map_full: u64,
    pub read_errors: u64,
}

/// Cumulative run time and call count of one attached program (`bpf_stats`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_time: Duration,
    pub run_count: u64,
}

pub struct Probe {
    ebpf: Objects,
    /// Set when the programs are pinned in bpffs (`pinguard run`).
    pins: Option<Pins>,
    attached: Vec<&'static str>,
    guarded: CpuSet,
    /// What we wrote to `TASKS` (userspace is its only writer): the source of
    /// the per-CPU owner cache in `GUARDED`.
    tasks: std::collections::HashMap<u32, TaskInfo>,
    /// Every IRQ and softirq on guarded CPUs is sent as an event (latency runs).
    noise_events: bool,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

pub fn tracefs_mounted() -> bool {
    [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .iter()
    .any(|p| Path::new(p).is_dir())
}

impl Probe {
    /// Loads the object with the running kernel's offsets and attaches the
    /// observer. Nothing stays attached if any step fails.
    pub fn load(config: &ProbeConfig) -> Result<Self, ProbeError> {
        Self::load_programs(config, &[], None)
    }

    /// Loads the object and attaches exactly the named programs (benchmarks).
    pub fn load_only(config: &ProbeConfig, programs: &[&'static str]) -> Result<Self, ProbeError> {
        Self::load_programs(config, programs, None)
    }

    /// Loads the daemon's observer pinned in bpffs under [`pinning::ROOT`], or
    /// adopts the one a previous daemon left there (see `bpf::pinning`).
    /// Falls back to an unpinned load, saying why, when bpffs is unusable.
    pub fn load_pinned(config: &ProbeConfig) -> Result<Self, ProbeError> {
        match Self::try_load_pinned(config) {
            // bpffs refused (read-only, no right to mount it, ...): better
            // unpinned than not at all, unless something of ours is still
            // pinned and attached there (a removal that failed): a second
            // observer beside it would double the cost of every switch.
            Err(ProbeError::Pinning(e))
                if pinning::scan(Path::new(pinning::ROOT)).map_or(true, |f| f.is_empty()) =>
            {
                log::warn!(
                    "{e}; the eBPF programs are not pinned: they stop with the daemon \
                     (`pinguard cleanup` removes anything left in {})",
                    pinning::ROOT
                );
                Self::load(config)
            }
            other => other,
        }
    }

    fn try_load_pinned(config: &ProbeConfig) -> Result<Self, ProbeError> {
        let started = std::time::Instant::now();
        if pinning::ensure_bpffs()? {
            log::info!("mounted bpffs at {}", pinning::BPFFS);
        }
        let root = Path::new(pinning::ROOT);
        let layout = pinning::layout(OBJECT, interval_ns(config), config.events_bytes);
        let programs = Self::programs_for(config)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let plan = pinning::plan(&pinning::scan(root)?, &layout, &programs, PINNED_MAPS);
        for (name, why) in &plan.replace {
            let removed = pinning::remove(&root.join(name))?;
            log::info!(
                "replaced the eBPF programs pinned in {}/{name} ({why}): detached and removed {} objects",
                pinning::ROOT,
                removed.len()
            );
        }
        let dir = root.join(&layout);
        if plan.adopt.is_some() {
            match Self::adopt(config, &dir) {
                // Not ours to take over, nor to remove.
                Err(e @ ProbeError::InUse { .. }) => return Err(e),
                Ok(probe) => {
                    log::info!(
                        "adopted the eBPF programs pinned in {} ({} programs, attached while pinguard was down) in {} ms",
                        dir.display(),
                        probe.attached.len(),
                        started.elapsed().as_millis()
                    );
                    return Ok(probe);
                }
                // A start that fails the same way at every restart helps nobody.
                Err(e) => {
                    let removed = pinning::remove(&dir)?;
                    log::warn!(
                        "could not adopt the eBPF programs pinned in {} ({e}): detached and removed {} objects",
                        dir.display(),
                        removed.len()
                    );
                }
            }
        }
        let probe = Self::load_programs(config, &[], Some(&dir)).inspect_err(|_| {
            // Nothing half-pinned stays behind a failed load.
            let _ = pinning::remove(&dir);
        })?;
        log::info!(
            "loaded the eBPF programs and pinned them in {} in {} ms",
            dir.display(),
            started.elapsed().as_millis()
        );
        Ok(probe)
    }

    /// Takes over a pinned observer: same programs and links, the kernel's
    /// counters as they are. What userspace writes (guarded CPUs, owners,
    /// allowlist, guests) starts over as at a fresh load: the daemon writes
    /// it again from discovery, and entries of threads gone meanwhile must
    /// not outlive them.
    fn adopt(config: &ProbeConfig, dir: &Path) -> Result<Self, ProbeError> {
        let adopted = pinning::adopt(dir)?;
        let attached = Self::programs_for(config)
            .into_iter()
            .filter(|p| adopted.programs.contains_key(*p))
            .collect();
        let mut probe = Self {
            ebpf: Objects::Adopted {
                maps: adopted.maps,
                programs: adopted.programs,
            },
            pins: Some(adopted.pins),
            attached,
            guarded: CpuSet::new(),
            tasks: std::collections::HashMap::new(),
            noise_events: false,
            _logger: None,
        };
        // A daemon in another mount namespace (with its own run lock) may
        // still be using these pins: its tgid is in the map it wrote.
        if let Some(pid) = probe.daemon_tgid()?
            && pid != std::process::id()
            && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "pinguard")
        {
            return Err(ProbeError::InUse {
                dir: dir.display().to_string(),
                pid,
            });
        }
        probe.set_daemon_tgid()?;
        probe.clear::<TaskInfo>(map::TASKS)?;
        probe.clear::<u32>(map::GUESTS)?;
        // The old daemon may have guarded other CPUs: clear every CPU it did.
        let previous = {
            let m = probe
                .ebpf
                .map(map::GUARDED)
                .ok_or(ProbeError::MissingMap(map::GUARDED))?;
            let arr: Array<_, GuardState> = Array::try_from(m).map_err(map_err(map::GUARDED))?;
            (0..pin_common::MAX_CPUS)
                .filter(|cpu| arr.get(cpu, 0).is_ok_and(|g| g.bits != 0))
                .collect::<CpuSet>()
        };
        probe.guarded = previous;
        probe.set_guarded(&config.guarded)?;
        Ok(probe)
    }

    /// Empties a hash map keyed by thread or process id.
    fn clear<V: aya::Pod>(&mut self, name: &'static str) -> Result<(), ProbeError> {
        let mut h = self.hash::<u32, V>(name)?;
        let keys: Vec<u32> = h.keys().filter_map(Result::ok).collect();
        for k in keys {
            ignore_missing(h.remove(&k)).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// The tgid the last daemon wrote for the programs (None: none yet).
    fn daemon_tgid(&mut self) -> Result<Option<u32>, ProbeError> {
        let m = self
            .ebpf
            .map_mut(map::DAEMON_TGID)
            .ok_or(ProbeError::MissingMap(map::DAEMON_TGID))?;
        let arr: Array<_, u32> = Array::try_from(m).map_err(map_err(map::DAEMON_TGID))?;
        Ok(arr.get(&0, 0).ok().filter(|&t| t != 0))
    }

    /// Writes our tgid for the programs, whose own threads never produce events.
    fn set_daemon_tgid(&mut self) -> Result<(), ProbeError> {
        let m = self
            .ebpf
            .map_mut(map::DAEMON_TGID)
            .ok_or(ProbeError::MissingMap(map::DAEMON_TGID))?;
        let mut arr: Array<_, u32> = Array::try_from(m).map_err(map_err(map::DAEMON_TGID))?;
        arr.set(0, std::process::id(), 0)
            .map_err(map_err(map::DAEMON_TGID))
    }

    /// Whether this probe took over a previous daemon's pinned programs.
    pub fn adopted(&self) -> bool {
        matches!(self.ebpf, Objects::Adopted { .. })
    }

    /// Where the programs are pinned, if they are.
    pub fn pinned_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    /// Removes the pins: the programs detach when this probe is dropped.
    pub fn unpin(&mut self) -> Result<Vec<pinning::Removed>, ProbeError> {
        match self.pins.as_ref() {
            Some(p) => Ok(p.unpin()?),
            None => Ok(Vec::new()),
        }
    }

    fn load_programs(
        config: &ProbeConfig,
        only: &[&'static str],
        pin: Option<&Path>,
    ) -> Result<Self, ProbeError> {
        if OBJECT.is_empty() {
            return Err(ProbeError::EmptyObject);
        }
        if !nix::unistd::geteuid().is_root() && !crate::host::has_capability(crate::host::CAP_BPF) {
            return Err(ProbeError::Permission);
        }
        let needs_tracefs = config.affinity
            || config.hook == Hook::Tracepoint
            || only
                .iter()
                .any(|p| p.contains("tracepoint") || p.starts_with("setaffinity"));
        if needs_tracefs && !tracefs_mounted() {
            return Err(ProbeError::NoTracefs);
        }
        raise_memlock();
        let kernel_btf = Btf::from_sys()?;
        let offsets = kernel_btf.task_offsets()?;
        if offsets.last_queued == 0 {
            log::warn!(
                "this kernel keeps no sched_info (CONFIG_SCHED_INFO, enabled by SCHEDSTATS or \
                 TASK_DELAY_ACCT): vCPU wait times (pinguard_vcpu_wait_seconds) are not measured"
            );
        }
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| BtfError::Read {
            path: "/sys/kernel/btf/vmlinux".into(),
            source: io::Error::other(e.to_string()),
        })?;
        let interval_ns = interval_ns(config);
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .map_max_entries(map::EVENTS, config.events_bytes)
            .override_global(global::EVENT_INTERVAL_NS, &interval_ns, true)
            .override_global(global::TASK_OFFSETS, &offsets, true)
            .load(OBJECT)
            .map_err(|e| {
                if is_eperm(&e) {
                    ProbeError::Permission
                } else {
                    ProbeError::Load(e)
                }
            })?;
        // Diagnostics from the programs (aya-log); optional, never per event.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let mut probe = Self {
            ebpf: Objects::Loaded(ebpf),
            pins: None,
            attached: Vec::new(),
            guarded: CpuSet::new(),
            tasks: std::collections::HashMap::new(),
            noise_events: false,
            _logger: logger,
        };
        probe.set_daemon_tgid()?;
        probe.set_guarded(&config.guarded)?;

        let programs = if only.is_empty() {
            Self::programs_for(config)
        } else {
            only.to_vec()
        };
        let mut links = Vec::new();
        for name in programs {
            if let Some(link) = probe.attach(name, &aya_btf, pin.is_some())? {
                links.push((name, link));
            }
        }
        if let (Some(dir), Objects::Loaded(ebpf)) = (pin, &mut probe.ebpf) {
            probe.pins = Some(pinning::pin_loaded(ebpf, links, dir)?);
        }
        Ok(probe)
    }

    /// The programs `load` attaches for `config`.
    pub fn programs_for(config: &ProbeConfig) -> Vec<&'static str> {
        let mut p = vec![match config.hook {
            Hook::TpBtf => program::SWITCH_TP_BTF,
            Hook::RawTp => program::SWITCH_RAW_TP,
            Hook::Tracepoint => program::SWITCH_TRACEPOINT,
        }];
        if config.migrations {
            p.push(program::MIGRATE_TP_BTF);
        }
        if config.affinity {
            p.extend([program::SETAFFINITY_ENTER, program::SETAFFINITY_EXIT]);
        }
        if config.lifecycle {
            p.extend([program::PROC_EXEC, program::PROC_EXIT]);
        }
        if config.noise {
            p.extend([
                program::IRQ_ENTRY,
                program::IRQ_EXIT,
                program::SOFTIRQ_ENTRY,
                program::SOFTIRQ_EXIT,
            ]);
            // NMIs are timed where the kernel has the tracepoint (x86).
            if tracepoint_exists("nmi", "nmi_handler") {
                p.push(program::NMI);
            }
        }
        if config.wakeups {
            p.extend([program::WAKEUP, program::WAKEUP_NEW]);
        }
        p
    }

    /// Loads and attaches one program. With `take_link`, its link is handed
    /// to the caller (to pin it) instead of staying with the program.
    fn attach(
        &mut self,
        name: &'static str,
        btf: &aya::Btf,
        take_link: bool,
    ) -> Result<Option<FdLink>, ProbeError> {
        let Objects::Loaded(ebpf) = &mut self.ebpf else {
            return Err(ProbeError::Program {
                name,
                source: ProgramError::NotLoaded,
            });
        };
        let prog = ebpf.program_mut(name).ok_or(ProbeError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?;
        let (kind, hook) = hook_of(name);
        let link_err = |source| ProbeError::Link { name, source };
        let link = match kind {
            HookKind::TpBtf => {
                let p: &mut BtfTracePoint = prog.try_into().map_err(prog_err(name))?;
                p.load(hook, btf).map_err(prog_err(name))?;
                let id = p.attach().map_err(prog_err(name))?;
                take_link
                    .then(|| p.take_link(id).map(FdLink::from))
                    .transpose()
                    .map_err(prog_err(name))?
            }
            HookKind::RawTp => {
                let p: &mut RawTracePoint = prog.try_into().map_err(prog_err(name))?;
                p.load().map_err(prog_err(name))?;
                let id = p.attach(hook).map_err(prog_err(name))?;
                take_link
                    .then(|| p.take_link(id).map(FdLink::from))
                    .transpose()
                    .map_err(prog_err(name))?
            }
            HookKind::Tracepoint(category) => {
                let p: &mut TracePoint = prog.try_into().map_err(prog_err(name))?;
                p.load().map_err(prog_err(name))?;
                let id = p.attach(category, hook).map_err(prog_err(name))?;
                match take_link {
                    true => Some(
                        FdLink::try_from(p.take_link(id).map_err(prog_err(name))?)
                            .map_err(link_err)?,
                    ),
                    false => None,
                }
            }
        };
        self.attached.push(name);
        Ok(link)
    }

    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// Replaces the guarded set (the programs see the change at once).
    pub fn set_guarded(&mut self, guarded: &CpuSet) -> Result<(), ProbeError> {
        if let Some(cpu) = guarded.iter().find(|c| *c >= pin_common::MAX_CPUS) {
            return Err(ProbeError::CpuOutOfRange(cpu));
        }
        let previous = std::mem::replace(&mut self.guarded, guarded.clone());
        self.write_guard_bits_for(&previous.union(guarded))
    }

    fn write_guard_bits(&mut self) -> Result<(), ProbeError> {
        let cpus = self.guarded.clone();
        self.write_guard_bits_for(&cpus)
    }

    /// Writes the guard state of `cpus` (see [`guard_states`]).
    fn write_guard_bits_for(&mut self, cpus: &CpuSet) -> Result<(), ProbeError> {
        let states = guard_states(&self.tasks, &self.guarded, cpus, self.noise_events);
        let m = self
            .ebpf
            .map_mut(map::GUARDED)
            .ok_or(ProbeError::MissingMap(map::GUARDED))?;
        let mut arr: Array<_, GuardState> = Array::try_from(m).map_err(map_err(map::GUARDED))?;
        for &(cpu, state) in &states {
            arr.set(cpu, state, 0).map_err(map_err(map::GUARDED))?;
        }
        Ok(())
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, ProbeError> {
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(ProbeError::MissingMap(name))?;
        HashMap::try_from(m).map_err(map_err(name))
    }

    fn hash_ro<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>, ProbeError> {
        let m = self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))?;
        HashMap::try_from(m).map_err(map_err(name))
    }

    /// Reads, changes and writes back one thread's `TASKS` entry (deleting it
    /// when nothing is left), so owner, allowlist and watch settings of one
    /// thread never clobber each other.
    fn update_task(&mut self, tid: u32, f: impl FnOnce(&mut TaskInfo)) -> Result<(), ProbeError> {
        let before = self.tasks.get(&tid).copied().unwrap_or(TaskInfo::EMPTY);
        let mut info = before;
        f(&mut info);
        if info == before {
            return Ok(());
        }
        let mut h = self.hash::<u32, TaskInfo>(map::TASKS)?;
        if info.is_empty() {
            ignore_missing(h.remove(&tid)).map_err(map_err(map::TASKS))?;
            self.tasks.remove(&tid);
        } else {
            h.insert(tid, info, 0).map_err(map_err(map::TASKS))?;
            self.tasks.insert(tid, info);
        }
        // The kernel trusts a THREADS entry's class over TASKS: a thread that
        // becomes an owner or allowlisted must lose its intruder entries.
        if info.is_owner() || info.allowed_cpu != NO_CPU {
            for cpu in self.guarded.clone().iter() {
                self.remove_thread(ThreadKey { cpu, tid })?;
            }
        }
        if before.owner_cpu != info.owner_cpu || before.watch != info.watch {
            self.write_guard_bits()?;
        }
        Ok(())
    }

    fn tasks(&self) -> Result<Vec<(u32, TaskInfo)>, ProbeError> {
        Ok(self
            .hash_ro::<u32, TaskInfo>(map::TASKS)?
            .iter()
            .filter_map(Result::ok)
            .collect())
    }

    /// Declares `tid` the owner (vCPU) of guarded CPU `cpu`.
    pub fn set_owner(&mut self, tid: u32, cpu: u32) -> Result<(), ProbeError> {
        self.update_task(tid, |t| t.owner_cpu = cpu)
    }

    pub fn remove_owner(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.update_task(tid, |t| t.owner_cpu = NO_CPU)
    }

    /// Sends every hard IRQ and softirq on the guarded CPUs as an event
    /// (`irq`/`softirq`), for a latency probe to name what overlapped each wait.
    pub fn set_noise_events(&mut self, on: bool) -> Result<(), ProbeError> {
        self.noise_events = on;
        self.write_guard_bits()
    }

    /// Measures `tid`'s wake-up-to-run waits (`pin_common::watch::VCPU` or `PROBE`).
    pub fn set_watched(&mut self, tid: u32, kind: u32) -> Result<(), ProbeError> {
        self.update_task(tid, |t| t.watch = kind)
    }

    pub fn remove_watched(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.update_task(tid, |t| t.watch = 0)?;
        ignore_missing(self.hash::<u32, WaitHist>(map::WAIT_HIST)?.remove(&tid))
            .map_err(map_err(map::WAIT_HIST))?;
        ignore_missing(self.hash::<u32, Waiting>(map::WAITING)?.remove(&tid))
            .map_err(map_err(map::WAITING))
    }

    /// Wait-time histograms of watched threads: tid -> histogram.
    pub fn wait_hists(&self) -> Result<BTreeMap<u32, WaitHist>, ProbeError> {
        Ok(self
            .hash_ro::<u32, WaitHist>(map::WAIT_HIST)?
            .iter()
            .filter_map(Result::ok)
            .collect())
    }

    /// Hardware IRQs handled on guarded CPUs.
    pub fn irq_stats(&self) -> Result<BTreeMap<IrqKey, NoiseStat>, ProbeError> {
        Ok(self
            .hash_ro::<IrqKey, NoiseStat>(map::IRQ_STATS)?
            .iter()
            .filter_map(Result::ok)
            .collect())
    }

    /// Softirqs on each guarded CPU, per vector.
    pub fn softirq_stats(&self) -> Result<BTreeMap<u32, SoftirqStats>, ProbeError> {
        let m = self
            .ebpf
            .map(map::SOFTIRQ_STATS)
            .ok_or(ProbeError::MissingMap(map::SOFTIRQ_STATS))?;
        let arr: PerCpuArray<_, SoftirqStats> =
            PerCpuArray::try_from(m).map_err(map_err(map::SOFTIRQ_STATS))?;
        let values = arr.get(&0, 0).map_err(map_err(map::SOFTIRQ_STATS))?;
        Ok(self
            .guarded
            .iter()
            .filter_map(|cpu| values.get(cpu as usize).map(|v| (cpu, *v)))
            .collect())
    }

    /// NMIs on each guarded CPU: (count, ns).
    pub fn nmi_stats(&self) -> Result<BTreeMap<u32, (u64, u64)>, ProbeError> {
        let m = self
            .ebpf
            .map(map::NOISE)
            .ok_or(ProbeError::MissingMap(map::NOISE))?;
        let arr: Array<_, NoiseState> = Array::try_from(m).map_err(map_err(map::NOISE))?;
        Ok(self
            .guarded
            .iter()
            .filter_map(|cpu| {
                arr.get(&cpu, 0)
                    .ok()
                    .map(|n| (cpu, (n.nmi_count, n.nmi_ns)))
            })
            .collect())
    }

    /// Registers a guest process so its exit is reported.
    pub fn set_guest(&mut self, tgid: u32) -> Result<(), ProbeError> {
        self.hash::<u32, u32>(map::GUESTS)?
            .insert(tgid, 1, 0)
            .map_err(map_err(map::GUESTS))
    }

    pub fn remove_guest(&mut self, tgid: u32) -> Result<(), ProbeError> {
        ignore_missing(self.hash::<u32, u32>(map::GUESTS)?.remove(&tgid))
            .map_err(map_err(map::GUESTS))
    }

    /// Allows user thread `tid` on `cpu` (None: on every guarded CPU).
    pub fn set_allowed(&mut self, tid: u32, cpu: Option<u32>) -> Result<(), ProbeError> {
        self.update_task(tid, |t| t.allowed_cpu = cpu.unwrap_or(ANY_CPU))
    }

    pub fn remove_allowed(&mut self, tid: u32) -> Result<(), ProbeError> {
        self.update_task(tid, |t| t.allowed_cpu = NO_CPU)
    }

    pub fn allowed(&self) -> Result<Vec<u32>, ProbeError> {
        Ok(self
            .tasks()?
            .into_iter()
            .filter(|(_, t)| t.allowed_cpu != NO_CPU)
            .map(|(tid, _)| tid)
            .collect())
    }

    /// Class totals of every guarded CPU, as accumulated in the kernel.
    pub fn cpu_stats(&self) -> Result<BTreeMap<u32, CpuStats>, ProbeError> {
        let m = self
            .ebpf
            .map(map::CPU_STATS)
            .ok_or(ProbeError::MissingMap(map::CPU_STATS))?;
        let arr: PerCpuArray<_, CpuStats> =
            PerCpuArray::try_from(m).map_err(map_err(map::CPU_STATS))?;
        let values = arr.get(&0, 0).map_err(map_err(map::CPU_STATS))?;
        Ok(self
            .guarded
            .iter()
            .filter_map(|cpu| values.get(cpu as usize).map(|v| (cpu, *v)))
            .collect())
    }

    /// Per-thread intruder accounting.
    pub fn threads(&self) -> Result<Vec<(ThreadKey, ThreadStats)>, ProbeError> {
        let h = self.hash_ro::<ThreadKey, ThreadStats>(map::THREADS)?;
        // Entries can vanish between key and value lookups while the kernel runs; skip those.
        Ok(h.iter().filter_map(Result::ok).collect())
    }

    pub fn remove_thread(&mut self, key: ThreadKey) -> Result<(), ProbeError> {
        ignore_missing(
            self.hash::<ThreadKey, ThreadStats>(map::THREADS)?
                .remove(&key),
        )
        .map_err(map_err(map::THREADS))
    }

    pub fn counters(&self) -> Result<Counters, ProbeError> {
        let m = self
            .ebpf
            .map(map::COUNTERS)
            .ok_or(ProbeError::MissingMap(map::COUNTERS))?;
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(m).map_err(map_err(map::COUNTERS))?;
        let sum = |i: u32| -> Result<u64, ProbeError> {
            Ok(arr.get(&i, 0).map_err(map_err(map::COUNTERS))?.iter().sum())
        };
        Ok(Counters {
            events_lost: sum(counter::EVENTS_LOST)?,
            thread_map_full: sum(counter::THREAD_MAP_FULL)?,
            read_errors: sum(counter::READ_ERRORS)?,
        })
    }

    /// Takes the event ring buffer (once) for a reader task.
    pub fn take_events(&mut self) -> Result<EventReader, ProbeError> {
        let m = self
            .ebpf
            .take_map(map::EVENTS)
            .ok_or(ProbeError::MissingMap(map::EVENTS))?;
        let ring = RingBuf::try_from(m).map_err(map_err(map::EVENTS))?;
        Ok(EventReader { ring })
    }

    /// Run time and count of each attached program. Counted by the kernel only
    /// while BPF statistics are enabled (see [`StatsGuard`]).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.attached
            .iter()
            .filter_map(|name| {
                let info = self.ebpf.program_info(name)?;
                Some(ProgramStats {
                    name,
                    run_time: info.run_time(),
                    run_count: info.run_count(),
                })
            })
            .collect()
    }
}

/// Maps an adopted layout must have: every map this module reads or writes.
const PINNED_MAPS: &[&str] = &[
    map::GUARDED,
    map::TASKS,
    map::CPU_STATS,
    map::THREADS,
    map::COUNTERS,
    map::EVENTS,
    map::GUESTS,
    map::IRQ_STATS,
    map::SOFTIRQ_STATS,
    map::NOISE,
    map::WAIT_HIST,
    map::DAEMON_TGID,
];

fn interval_ns(config: &ProbeConfig) -> u64 {
    u64::try_from(config.event_interval.as_nanos()).unwrap_or(u64::MAX)
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

enum HookKind {
    TpBtf,
    RawTp,
    Tracepoint(&'static str),
}

fn hook_of(name: &str) -> (HookKind, &'static str) {
    match name {
        program::SWITCH_TP_BTF | program::EMPTY_TP_BTF => (HookKind::TpBtf, "sched_switch"),
        program::SWITCH_RAW_TP | program::EMPTY_RAW_TP => (HookKind::RawTp, "sched_switch"),
        program::SWITCH_TRACEPOINT | program::EMPTY_TRACEPOINT => {
            (HookKind::Tracepoint("sched"), "sched_switch")
        }
        program::MIGRATE_TP_BTF => (HookKind::TpBtf, "sched_migrate_task"),
        program::PROC_EXEC => (HookKind::TpBtf, "sched_process_exec"),
        program::PROC_EXIT => (HookKind::TpBtf, "sched_process_exit"),
        program::IRQ_ENTRY => (HookKind::TpBtf, "irq_handler_entry"),
        program::IRQ_EXIT => (HookKind::TpBtf, "irq_handler_exit"),
        program::SOFTIRQ_ENTRY => (HookKind::TpBtf, "softirq_entry"),
        program::SOFTIRQ_EXIT => (HookKind::TpBtf, "softirq_exit"),
        program::NMI => (HookKind::TpBtf, "nmi_handler"),
        program::WAKEUP => (HookKind::TpBtf, "sched_wakeup"),
        program::WAKEUP_NEW => (HookKind::TpBtf, "sched_wakeup_new"),
        program::SETAFFINITY_ENTER => (
            HookKind::Tracepoint("syscalls"),
            "sys_enter_sched_setaffinity",
        ),
        _ => (
            HookKind::Tracepoint("syscalls"),
            "sys_exit_sched_setaffinity",
        ),
    }
}

/// The guard state of each of `cpus`: guarded or not, the CPU's single owner,
/// if it has exactly one, and how waits are measured: a single owner watched
/// as a vCPU without a lookup (`OWNER_WATCHED`); any other watched thread (a
/// latency probe, vCPUs sharing a CPU) with a `TASKS` lookup per switch on
/// every guarded CPU (`TRACK_WAITS`), turned on only while one exists. A
/// single owner watched as a probe is not cached, so that its waits take that
/// general path.
fn guard_states(
    tasks: &std::collections::HashMap<u32, TaskInfo>,
    guarded: &CpuSet,
    cpus: &CpuSet,
    noise_events: bool,
) -> Vec<(u32, GuardState)> {
    let mut owners_of: BTreeMap<u32, Vec<(u32, &TaskInfo)>> = BTreeMap::new();
    for (tid, t) in tasks.iter().filter(|(_, t)| t.is_owner()) {
        owners_of.entry(t.owner_cpu).or_default().push((*tid, t));
    }
    // The CPU's cached owner, if it has one.
    let cached = |cpu: u32| match owners_of.get(&cpu).map(Vec::as_slice) {
        Some(&[(tid, t)]) if guarded.contains(cpu) && t.watch != watch::PROBE => Some((tid, t)),
        _ => None,
    };
    let track = if tasks.iter().any(|(tid, t)| {
        t.watch != 0
            && !(t.watch == watch::VCPU && cached(t.owner_cpu).is_some_and(|(c, _)| c == *tid))
    }) {
        guard::TRACK_WAITS
    } else {
        0
    };
    cpus.iter()
        .map(|cpu| {
            let mut state = GuardState::default();
            if guarded.contains(cpu) {
                state.bits = guard::GUARDED | track;
                if noise_events {
                    state.bits |= guard::NOISE_EVENTS;
                }
                if let Some((tid, t)) = cached(cpu) {
                    state.owner_tid = tid;
                    if t.watch == watch::VCPU {
                        state.bits |= guard::OWNER_WATCHED;
                    }
                }
            }
            (cpu, state)
        })
        .collect()
}

/// Every program name `load_only` accepts.
pub const PROGRAMS: &[&str] = &[
    program::SWITCH_TP_BTF,
    program::SWITCH_RAW_TP,
    program::SWITCH_TRACEPOINT,
    program::MIGRATE_TP_BTF,
    program::SETAFFINITY_ENTER,
    program::SETAFFINITY_EXIT,
    program::PROC_EXEC,
    program::PROC_EXIT,
    program::IRQ_ENTRY,
    program::IRQ_EXIT,
    program::SOFTIRQ_ENTRY,
    program::SOFTIRQ_EXIT,
    program::NMI,
    program::WAKEUP,
    program::WAKEUP_NEW,
    program::EMPTY_TP_BTF,
    program::EMPTY_RAW_TP,
    program::EMPTY_TRACEPOINT,
];

fn tracepoint_exists(category: &str, name: &str) -> bool {
    [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .iter()
    .any(|root| Path::new(root).join(category).join(name).is_dir())
        || std::fs::read_to_string("/proc/kallsyms")
            .map(|s| s.contains(&format!(" __tracepoint_{name}\n")))
            .unwrap_or(false)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memcg.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct; failure only matters on old kernels.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

/// Keeps kernel BPF run-time statistics enabled while alive (BPF_ENABLE_STATS).
/// The kernel disables them again when the last such fd closes, so nothing
/// needs restoring, even after a crash.
pub struct StatsGuard(#[allow(dead_code)] std::os::fd::OwnedFd);

impl StatsGuard {
    pub fn enable() -> Result<Self, io::Error> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(Self)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// Reads events from the ring buffer.
pub struct EventReader {
    ring: RingBuf<aya::maps::MapData>,
}

impl EventReader {
    /// Registers the ring buffer with the tokio reactor (needs a runtime).
    pub fn into_async(self) -> io::Result<tokio::io::unix::AsyncFd<EventReader>> {
        // SAFETY: the fd belongs to the ring buffer map owned by `self`, which the
        // AsyncFd owns from now on, so it stays open and unchanged while registered.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)
    }

    /// Drains every event currently in the buffer.
    pub fn drain(&mut self, mut f: impl FnMut(Result<KernelEvent, DecodeError>)) {
        while let Some(item) = self.ring.next() {
            f(decode(&item));
        }
    }

    /// Waits (async) until events are available, then drains them.
    pub async fn next_batch(
        fd: &mut tokio::io::unix::AsyncFd<EventReader>,
        f: impl FnMut(Result<KernelEvent, DecodeError>),
    ) -> io::Result<()> {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().drain(f);
        guard.clear_ready();
        Ok(())
    }
}

impl std::os::fd::AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// A task name as the kernel stores it: NUL-terminated, unless all 16 bytes are used.
pub fn comm_str(comm: &[u8; TASK_COMM_LEN]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(owner_cpu: u32, watch: u32) -> TaskInfo {
        TaskInfo {
            owner_cpu,
            watch,
            ..TaskInfo::EMPTY
        }
    }

    fn states(tasks: &[(u32, TaskInfo)], guarded: &str) -> Vec<(u32, GuardState)> {
        let guarded = CpuSet::parse(guarded).unwrap();
        guard_states(&tasks.iter().copied().collect(), &guarded, &guarded, false)
    }

    fn state(bits: u32, owner_tid: u32) -> GuardState {
        GuardState { bits, owner_tid }
    }

    const G: u32 = guard::GUARDED;

    #[test]
    fn a_watched_vcpu_per_cpu_needs_no_lookup_per_switch() {
        let s = states(
            &[(10, task(2, watch::VCPU)), (11, task(3, watch::VCPU))],
            "2-4",
        );
        assert_eq!(
            s,
            [
                (2, state(G | guard::OWNER_WATCHED, 10)),
                (3, state(G | guard::OWNER_WATCHED, 11)),
                (4, state(G, 0)),
            ]
        );
        // An owner not watched is still cached, for classification.
        assert_eq!(states(&[(10, task(2, 0))], "2"), [(2, state(G, 10))]);
    }

    #[test]
    fn other_watched_threads_turn_on_the_general_path_everywhere() {
        // Two vCPUs sharing CPU 2: no cached owner there, waits by lookup.
        let shared = [(10, task(2, watch::VCPU)), (11, task(2, watch::VCPU))];
        let s = states(&shared, "2-3");
        let track = G | guard::TRACK_WAITS;
        assert_eq!(s, [(2, state(track, 0)), (3, state(track, 0))]);
        // A latency probe (not an owner) beside a vCPU.
        let s = states(
            &[(10, task(2, watch::VCPU)), (20, task(NO_CPU, watch::PROBE))],
            "2-3",
        );
        assert_eq!(
            s,
            [
                (2, state(track | guard::OWNER_WATCHED, 10)),
                (3, state(track, 0))
            ]
        );
        // A probe that owns its CPU is not cached: its waits take the general path.
        assert_eq!(
            states(&[(20, task(2, watch::PROBE))], "2"),
            [(2, state(track, 0))]
        );
        // A watched vCPU whose CPU is not guarded cannot use a slot.
        assert_eq!(
            states(&[(10, task(5, watch::VCPU))], "2"),
            [(2, state(track, 0))]
        );
    }
}
