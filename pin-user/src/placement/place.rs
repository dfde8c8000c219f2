//! Moving one guest thread to its planned CPUs: directly, or through the
//! guest's manager (see [`crate::placement::libvirt`]) so that the manager
//! agrees and does not undo it.
use std::fs;

use crate::{
    guests::Manager,
    host::{
        affinity::{self, Affinities, AffinityError},
        cgroup::{CgroupOwner, Cgroups, Cpuset},
        cpulist::CpuSet,
    },
    placement::{
        libvirt::{self, Scope},
        plan::Entry,
    },
};

/// The guest thread to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub vm: &'a str,
    /// The guest's QEMU process.
    pub pid: u32,
    /// `None` for an emulator thread.
    pub vcpu: Option<u32>,
    pub tid: u32,
    pub manager: Manager,
}

impl Entry {
    pub fn target(&self) -> Target<'_> {
        Target {
            vm: &self.vm,
            pid: self.pid,
            vcpu: self.vcpu,
            tid: self.tid,
            manager: self.manager,
        }
    }
}

/// Affinities plus the placement of guest threads. The default places
/// every thread directly (unit-test fakes); [`Live`] goes through libvirt
/// for libvirt's domains.
pub trait Placement: Affinities {
    fn place(&mut self, t: &Target<'_>, cpus: &CpuSet) -> Result<(), AffinityError> {
        self.set(t.tid, cpus)
    }

    /// A plan starts: forget what the previous one changed besides affinities.
    fn begin_plan(&mut self) {}

    /// The plan is rolled back: put back what placing changed besides
    /// affinities (a cgroup it widened).
    fn undo_plan(&mut self) {}
}

/// The host: libvirt domains through `virsh`, every other guest with
/// `sched_setaffinity`.
#[derive(Debug, Clone, Default)]
pub struct Live {
    cgroups: Cgroups,
    /// Cgroups widened during the current plan: (directory, CPUs before).
    widened: Vec<(std::path::PathBuf, CpuSet)>,
}

impl Live {
    pub fn new() -> Self {
        Self {
            cgroups: Cgroups::read(),
            widened: Vec::new(),
        }
    }

    fn through_libvirt(&self, t: &Target<'_>, cpus: &CpuSet) -> Result<(), AffinityError> {
        // Emulator threads share one cgroup and one `emulatorpin`: the first
        // moved them all, the rest are already there.
        if t.vcpu.is_none() && affinity::get(t.tid)? == *cpus {
            return Ok(());
        }
        let asked = match t.vcpu {
            Some(i) => libvirt::vcpupin(t.vm, i, cpus, Scope::Live),
            None => libvirt::emulatorpin(t.vm, cpus, Scope::Live),
        };
        if let Err(e) = asked {
            // libvirtd down or refusing: the cpuset may still allow a direct
            // move, but libvirt's view (virsh vcpupin) then lags behind.
            return match affinity::apply_and_verify(t.tid, cpus) {
                Ok(()) => {
                    log::warn!(
                        "guest {} {}: libvirt did not pin it ({e}); pinned directly, so \
                         `virsh vcpupin`/`emulatorpin` do not show it",
                        t.vm,
                        role(t)
                    );
                    Ok(())
                }
                // The domain stopped meanwhile: its threads are gone, which
                // is the normal life of a host, not a failure.
                Err(direct) if direct.is_gone() => Err(direct),
                // The cpuset names the real cause (e.g. libvirt's `machine`
                // partition excludes the CPU): keep it, with libvirt's word.
                Err(direct @ AffinityError::Cpuset { .. }) => {
                    log::warn!("guest {} {}: libvirt: {e}", t.vm, role(t));
                    Err(direct)
                }
                Err(direct) => Err(AffinityError::Manager {
                    tid: t.tid,
                    detail: format!("guest {} {}: {e}; directly: {direct}", t.vm, role(t)),
                }),
            };
        }
        let now = affinity::get(t.tid)?;
        if now == *cpus {
            return Ok(());
        }
        if t.vcpu.is_none() {
            self.move_to_emulator_cgroup(t.tid)?;
            return affinity::apply_and_verify(t.tid, cpus);
        }
        Err(AffinityError::Mismatch {
            tid: t.tid,
            wanted: cpus.clone(),
            actual: now,
        }
        .explained(&self.cgroups))
    }

    /// A thread of the domain outside its emulator cgroup that `emulatorpin`
    /// does not reach: KVM's NX huge page recovery worker, created by a vCPU
    /// thread, lands in that vCPU's cgroup and would stay on the vCPU's
    /// guarded CPU. libvirt's own layout has a home for it, the domain's
    /// `emulator` cgroup; moving it there changes that guest only.
    fn move_to_emulator_cgroup(&self, tid: u32) -> Result<(), AffinityError> {
        let Some(cg) = self.cgroups.cpuset_of(tid) else {
            return Ok(());
        };
        if cg.owner != CgroupOwner::Libvirt {
            return Ok(());
        }
        let Some(domain_dir) = cg.dir.parent() else {
            return Ok(());
        };
        let emulator = domain_dir.join("emulator");
        if cg.dir == emulator || !emulator.is_dir() {
            return Ok(());
        }
        // v1 moves one thread with `tasks`, v2 (threaded) with `cgroup.threads`.
        let file = ["tasks", "cgroup.threads"]
            .into_iter()
            .map(|f| emulator.join(f))
            .find(|p| p.exists());
        if let Some(file) = file {
            match fs::write(&file, tid.to_string()) {
                Ok(()) => log::info!(
                    "moved thread {tid} from cgroup {} to the domain's emulator cgroup",
                    cg.path
                ),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    return Err(AffinityError::Gone { tid });
                }
                Err(e) => log::warn!("cannot move thread {tid} into {}: {e}", file.display()),
            }
        }
        Ok(())
    }
}

impl Live {
    /// Lets a guest's own cgroup onto `cpus`: only a cgroup no known manager
    /// writes (a manager would undo it; the error names its fix instead),
    /// holding nothing but this guest's process, under a parent that
    /// allows the CPUs. The kind a container-shaped guest started by hand
    /// runs in (e.g. `unshare` in a cgroup of its own).
    fn widen(&mut self, t: &Target<'_>, cg: &Cpuset, cpus: &CpuSet) -> bool {
        if cg.owner != CgroupOwner::Unknown {
            return false;
        }
        let procs = fs::read_to_string(cg.dir.join("cgroup.procs")).unwrap_or_default();
        let only_guest = procs.lines().all(|p| p.trim() == t.pid.to_string());
        let parent_allows = cg
            .dir
            .parent()
            .and_then(|p| {
                ["cpuset.effective_cpus", "cpuset.cpus.effective"]
                    .iter()
                    .find_map(|f| fs::read_to_string(p.join(f)).ok())
            })
            .and_then(|s| CpuSet::parse(s.trim()).ok())
            .is_some_and(|parent| cpus.is_subset(&parent));
        if procs.trim().is_empty() || !only_guest || !parent_allows {
            return false;
        }
        let wider = cg.cpus.union(cpus);
        // cgroup v1 resets the affinity of every thread in a cpuset whose
        // CPUs change: take them now and put them back after.
        let threads: Vec<(u32, CpuSet)> = ["tasks", "cgroup.threads"]
            .iter()
            .find_map(|f| fs::read_to_string(cg.dir.join(f)).ok())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter_map(|tid| Some((tid, affinity::get(tid).ok()?)))
            .collect();
        match fs::write(cg.dir.join("cpuset.cpus"), wider.to_string()) {
            Ok(()) => {
                self.widened.push((cg.dir.clone(), cg.cpus.clone()));
                for (tid, was) in &threads {
                    if affinity::get(*tid).is_ok_and(|now| now != *was) {
                        // Gone meanwhile, or refused: nothing more to do.
                        let _ = affinity::set(*tid, was);
                    }
                }
                log::info!(
                    "guest {}: widened the cpuset of its own cgroup {} from CPUs {} to {wider} \
                     (it holds this guest only)",
                    t.vm,
                    cg.path,
                    cg.cpus
                );
                true
            }
            Err(e) => {
                log::warn!("guest {}: cannot widen cgroup {}: {e}", t.vm, cg.path);
                false
            }
        }
    }
}

fn role(t: &Target<'_>) -> String {
    match t.vcpu {
        Some(i) => format!("vCPU {i} (thread {})", t.tid),
        None => format!("emulator thread {}", t.tid),
    }
}

impl Affinities for Live {
    fn get(&self, tid: u32) -> Result<CpuSet, AffinityError> {
        affinity::get(tid)
    }

    fn set(&mut self, tid: u32, cpus: &CpuSet) -> Result<(), AffinityError> {
        affinity::apply_and_verify(tid, cpus)
    }
}

impl Placement for Live {
    fn begin_plan(&mut self) {
        self.widened.clear();
    }

    fn undo_plan(&mut self) {
        // Newest first; the affinities were put back before, so narrowing
        // (which cgroup v1 applies to every thread inside) moves none of them.
        for (dir, cpus) in self.widened.drain(..).rev() {
            match fs::write(dir.join("cpuset.cpus"), cpus.to_string()) {
                Ok(()) => log::info!("narrowed cgroup {} back to CPUs {cpus}", dir.display()),
                Err(e) => log::warn!(
                    "cannot narrow cgroup {} back to CPUs {cpus}: {e}; it stays widened",
                    dir.display()
                ),
            }
        }
    }

    fn place(&mut self, t: &Target<'_>, cpus: &CpuSet) -> Result<(), AffinityError> {
        match t.manager {
            Manager::Libvirt => self.through_libvirt(t, cpus),
            Manager::None => {
                let r = affinity::apply_and_verify(t.tid, cpus);
                let widened = match &r {
                    Err(AffinityError::Cpuset { cgroup, .. }) => {
                        let cg = (**cgroup).clone();
                        self.widen(t, &cg, cpus)
                    }
                    _ => false,
                };
                if widened {
                    affinity::apply_and_verify(t.tid, cpus)
                } else {
                    r
                }
            }
        }
    }
}

#[cfg(test)]
impl Placement for crate::host::affinity::fake::Table {}
