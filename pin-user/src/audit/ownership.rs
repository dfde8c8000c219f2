//! Who owns which guarded CPU: the vCPUs of the plan, emulator threads placed there by design.
use std::collections::BTreeMap;

use crate::{
    host::cpulist::CpuSet,
    placement::plan::{Plan, Role},
};

/// A vCPU thread and the guarded CPU the plan gives it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VcpuOwner {
    pub vm: String,
    /// The guest's QEMU process.
    pub pid: u32,
    /// QEMU's cpu-index.
    pub vcpu: u32,
    pub tid: u32,
    /// The guarded CPU this vCPU owns.
    pub cpu: u32,
    /// Another vCPU is assigned the same CPU (more vCPUs than guarded CPUs).
    pub shared: bool,
}

/// Who owns what: vCPU threads by CPU, and every thread that belongs to a guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// vCPU tid -> its assignment.
    vcpus: BTreeMap<u32, VcpuOwner>,
    /// Guest process -> guest name: any of its threads that is not a vCPU is an emulator thread.
    guests: BTreeMap<u32, String>,
    /// Emulator threads outside the guest process (vhost kernel workers) -> (guest name, guest pid).
    emulators: BTreeMap<u32, (String, u32)>,
    /// Emulator thread -> the CPUs the emulator policy gives it (guarded ones
    /// too with `with-vcpu0` or an explicit list: placed there by design).
    placed: BTreeMap<u32, CpuSet>,
    /// Guarded CPUs assigned to more than one vCPU.
    shared: CpuSet,
    /// KVM guests whose vCPUs could not be told apart: pid -> name.
    unidentified: BTreeMap<u32, String>,
}

impl Ownership {
    /// The ownership a placement plan describes (vCPU entries own the CPU they go to).
    pub fn from_plan(plan: &Plan) -> Self {
        let mut own = Self {
            shared: plan.shared_cpus.clone(),
            ..Self::default()
        };
        for e in &plan.entries {
            own.guests.insert(e.pid, e.vm.clone());
            match (e.role, e.vcpu, e.to.first()) {
                (Role::Vcpu, Some(vcpu), Some(cpu)) => {
                    own.vcpus.insert(
                        e.tid,
                        VcpuOwner {
                            vm: e.vm.clone(),
                            pid: e.pid,
                            vcpu,
                            tid: e.tid,
                            cpu,
                            shared: e.shared,
                        },
                    );
                }
                _ => {
                    own.emulators.insert(e.tid, (e.vm.clone(), e.pid));
                    own.placed.insert(e.tid, e.to.clone());
                }
            }
        }
        own
    }

    #[cfg(test)]
    /// Adds one vCPU assignment (tests, or callers without a plan).
    pub fn add_vcpu(&mut self, owner: VcpuOwner) {
        self.guests.insert(owner.pid, owner.vm.clone());
        if self.vcpus.values().any(|o| o.cpu == owner.cpu) {
            self.shared.insert(owner.cpu);
        }
        self.vcpus.insert(owner.tid, owner);
    }

    #[cfg(test)]
    /// Adds an emulator thread of another process (a vhost kernel worker).
    pub fn add_emulator(&mut self, tid: u32, vm: &str, pid: u32) {
        self.emulators.insert(tid, (vm.to_string(), pid));
    }

    pub fn vcpu(&self, tid: u32) -> Option<&VcpuOwner> {
        self.vcpus.get(&tid)
    }

    /// Every vCPU assignment, by tid.
    pub fn vcpus(&self) -> impl Iterator<Item = &VcpuOwner> {
        self.vcpus.values()
    }

    /// The vCPUs that own `cpu`.
    pub fn owners_of(&self, cpu: u32) -> Vec<VcpuOwner> {
        let mut v: Vec<VcpuOwner> = self
            .vcpus
            .values()
            .filter(|o| o.cpu == cpu)
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.vm, a.vcpu).cmp(&(&b.vm, b.vcpu)));
        v
    }

    /// The guest a non-vCPU thread belongs to, if any.
    pub fn emulator_of(&self, tid: u32, tgid: u32) -> Option<&str> {
        if self.vcpus.contains_key(&tid) {
            return None;
        }
        self.guests
            .get(&tgid)
            .map(String::as_str)
            .or_else(|| self.emulators.get(&tid).map(|(vm, _)| vm.as_str()))
    }

    /// Records a KVM guest whose vCPU threads could not be told apart.
    pub fn add_unidentified(&mut self, pid: u32, name: &str) {
        self.unidentified.insert(pid, name.to_string());
    }

    /// The unidentified guest a thread belongs to, if any.
    pub fn unidentified_guest(&self, tgid: u32) -> Option<&str> {
        self.unidentified.get(&tgid).map(String::as_str)
    }

    /// Whether the emulator policy puts emulator thread `tid` on exactly
    /// `allowed` (e.g. with vCPU 0, on a guarded CPU): then it is there by
    /// design, not by accident.
    pub fn emulator_placed(&self, tid: u32, allowed: &CpuSet) -> bool {
        self.placed.get(&tid).is_some_and(|p| p == allowed)
    }

    pub fn shared_cpus(&self) -> &CpuSet {
        &self.shared
    }
}
