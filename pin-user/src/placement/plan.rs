//! Placement: which CPU each vCPU and emulator thread of each guest goes to.
//!
//! Pure logic over a [`Topology`], the guarded/housekeeping split, the
//! discovered guests and their threads' current affinities. Rules, in order:
//! 1. an explicit `--vm NAME=CPULIST` map wins (one CPU per vCPU in order);
//! 2. a vCPU already pinned to exactly one guarded CPU that nobody else
//!    claimed keeps it, so repeated runs change nothing;
//! 3. the rest get a free guarded CPU each, one guest's vCPUs on one NUMA
//!    node where possible, SMT siblings filled or left free per [`SmtPolicy`];
//! 4. if CPUs run out: an error, or with `allow_shared` the leftover vCPUs
//!    share CPUs (round-robin, least loaded first) and those CPUs are flagged;
//! 5. emulator threads go to housekeeping CPUs, an explicit list, or
//!    vCPU 0's CPU ([`EmulatorPolicy`]).
use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

use crate::{
    guests::{Guest, Manager},
    host::cpulist::{CpuSeq, CpuSet},
    host::topology::{Guard, Topology},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmtPolicy {
    /// Place one guest's vCPUs on SMT siblings of the same core.
    #[default]
    PreferSiblings,
    /// Use one thread per core and keep its sibling free (no SMT noise between vCPUs).
    KeepSiblingsFree,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum EmulatorPolicy {
    Housekeeping,
    WithVcpu0,
    Cpus(CpuSet),
}

impl std::str::FromStr for EmulatorPolicy {
    type Err = String;

    /// "housekeeping", "with-vcpu0" or a CPU list.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "housekeeping" => Ok(Self::Housekeeping),
            "with-vcpu0" => Ok(Self::WithVcpu0),
            list => match CpuSet::parse(list) {
                Ok(cpus) if !cpus.is_empty() => Ok(Self::Cpus(cpus)),
                Ok(_) => Err(
                    "expected housekeeping, with-vcpu0 or a CPU list (the CPU list is empty)"
                        .into(),
                ),
                Err(e) => Err(format!(
                    "expected housekeeping, with-vcpu0 or a CPU list ({e})"
                )),
            },
        }
    }
}

/// How to place (the `pin` flags, or the daemon's configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOptions {
    /// Explicit placements: guest name -> one CPU per vCPU, in order (a
    /// CPU listed twice is shared, with `allow_shared`).
    pub vm: Vec<(String, CpuSeq)>,
    pub emulator: EmulatorPolicy,
    pub smt: SmtPolicy,
    /// Let vCPUs share guarded CPUs when there are not enough.
    pub allow_shared: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            vm: Vec::new(),
            emulator: EmulatorPolicy::Housekeeping,
            smt: SmtPolicy::default(),
            allow_shared: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Vcpu,
    Emulator,
}

/// One thread's placement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Guest name.
    pub vm: String,
    /// The guest's QEMU process.
    pub pid: u32,
    /// vCPU index; `None` for emulator threads.
    pub vcpu: Option<u32>,
    pub tid: u32,
    pub role: Role,
    /// Current affinity.
    pub from: CpuSet,
    /// Planned affinity.
    pub to: CpuSet,
    /// Whether applying the plan changes this thread.
    pub change: bool,
    /// This vCPU shares its CPU with another vCPU (`allow_shared`).
    pub shared: bool,
    /// Through whom the thread is placed.
    pub manager: Manager,
}

/// The placement of every managed thread.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// Per guest (sorted by name, pid): vCPUs by index, then emulator threads by tid.
    pub entries: Vec<Entry>,
    /// Guarded CPUs that run more than one vCPU.
    pub shared_cpus: CpuSet,
    /// Placement compromises worth telling the operator (NUMA spread, sharing).
    pub warnings: Vec<String>,
}

impl Plan {
    #[cfg(test)]
    /// Entries whose affinity must change.
    pub fn changes(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.change)
    }

    #[cfg(test)]
    /// Guarded CPU -> the vCPU threads planned on it: who owns each CPU.
    pub fn owners(&self) -> BTreeMap<u32, Vec<u32>> {
        let mut out: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for e in self.entries.iter().filter(|e| e.role == Role::Vcpu) {
            for cpu in e.to.iter() {
                out.entry(cpu).or_default().push(e.tid);
            }
        }
        out
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlanError {
    #[error("--vm {name}=...: no running guest is named {name:?} ({known})")]
    UnknownVm { name: String, known: String },
    #[error(
        "--vm {name}=...: {count} running guests are named {name:?} (pids {pids}); give them distinct -name values"
    )]
    AmbiguousVm {
        name: String,
        count: usize,
        pids: String,
    },
    #[error("--vm {name} is given more than once")]
    DuplicateVm { name: String },
    #[error("--vm {name}={cpus}: CPU {cpu} is not online (online CPUs: {online})")]
    CpuOffline {
        name: String,
        cpus: CpuSeq,
        cpu: u32,
        online: CpuSet,
    },
    #[error(
        "--vm {name}={cpus}: CPU {cpu} is not guarded (guarded CPUs: {guarded}); vCPUs are only \
         pinned to guarded CPUs, widen --guard to include it"
    )]
    CpuNotGuarded {
        name: String,
        cpus: CpuSeq,
        cpu: u32,
        guarded: CpuSet,
    },
    #[error(
        "--vm {name}={cpus} lists {given} CPU(s) but guest {name} has {vcpus} vCPU(s): give exactly one CPU per vCPU"
    )]
    WrongCount {
        name: String,
        cpus: CpuSeq,
        given: usize,
        vcpus: usize,
    },
    #[error(
        "--vm {first}={first_cpus} and --vm {second}={second_cpus} both claim CPU {overlap}: \
         a guarded CPU belongs to one vCPU (--allow-shared lets them share it)"
    )]
    Overlap {
        first: String,
        first_cpus: CpuSeq,
        second: String,
        second_cpus: CpuSeq,
        overlap: CpuSet,
    },
    #[error(
        "--vm {name}={cpus} puts more than one vCPU on CPU {repeated}: vCPUs would share it \
         and contend; pass --allow-shared if that is intended"
    )]
    Repeated {
        name: String,
        cpus: CpuSeq,
        repeated: CpuSet,
    },
    #[error(
        "{needed} vCPU(s) need a guarded CPU each but only {free} {what} free (guarded CPUs: {guarded}). \
         Guard more CPUs with --guard, or pass --allow-shared to let vCPUs share CPUs (they will contend)"
    )]
    NotEnoughCpus {
        needed: usize,
        free: usize,
        /// "guarded CPU(s) are", or the SMT-policy wording.
        what: String,
        guarded: CpuSet,
    },
    #[error("--emulator {cpus}: CPU {cpu} is not online (online CPUs: {online})")]
    EmulatorCpusOffline {
        cpus: CpuSet,
        cpu: u32,
        online: CpuSet,
    },
}

/// Computes the placement. `current` holds each thread's affinity now;
/// a thread missing from it is treated as unpinned.
pub fn plan(
    topo: &Topology,
    guard: &Guard,
    guests: &[Guest],
    current: &BTreeMap<u32, CpuSet>,
    opts: &PlanOptions,
) -> Result<Plan, PlanError> {
    let mut order: Vec<&Guest> = guests.iter().collect();
    order.sort_by(|a, b| (&a.name, a.pid).cmp(&(&b.name, b.pid)));
    // vCPUs by index, whatever order discovery produced.
    let vcpus: HashMap<u32, Vec<(u32, u32)>> = order
        .iter()
        .map(|g| {
            let mut v: Vec<(u32, u32)> = g.vcpus.iter().map(|v| (v.index, v.tid)).collect();
            v.sort_unstable();
            (g.pid, v)
        })
        .collect();

    let explicit = validate_maps(topo, guard, &order, opts)?;
    if let EmulatorPolicy::Cpus(cpus) = &opts.emulator
        && let Some(cpu) = cpus.iter().find(|c| !topo.online.contains(*c))
    {
        return Err(PlanError::EmulatorCpusOffline {
            cpus: cpus.clone(),
            cpu,
            online: topo.online.clone(),
        });
    }

    let mut p = Placer::new(topo, &guard.guarded, opts.smt);
    let mut warnings = Vec::new();

    // 1. Explicit maps.
    for g in &order {
        if let Some(cpus) = explicit.get(&g.pid) {
            for (&(_, tid), cpu) in vcpus[&g.pid].iter().zip(cpus.iter()) {
                p.claim(g.pid, tid, cpu);
            }
        }
    }
    // 2. Existing valid pins.
    for g in order.iter().filter(|g| !explicit.contains_key(&g.pid)) {
        for &(_, tid) in &vcpus[&g.pid] {
            if let Some(cur) = current.get(&tid)
                && cur.len() == 1
                && let Some(cpu) = cur.first()
                && p.is_free(cpu)
            {
                p.claim(g.pid, tid, cpu);
            }
        }
    }
    // 3. Dedicated CPUs for the rest, largest guests first (they are the
    //    hardest to fit on one node).
    let mut pending: Vec<(&Guest, Vec<u32>)> = order
        .iter()
        .map(|g| {
            let tids: Vec<u32> = vcpus[&g.pid]
                .iter()
                .map(|&(_, tid)| tid)
                .filter(|tid| !p.assign.contains_key(tid))
                .collect();
            (*g, tids)
        })
        .filter(|(_, tids)| !tids.is_empty())
        .collect();
    pending.sort_by_key(|(_, tids)| std::cmp::Reverse(tids.len()));
    let needed: usize = pending.iter().map(|(_, t)| t.len()).sum();
    let capacity = p.capacity();
    if needed > capacity && !opts.allow_shared {
        return Err(PlanError::NotEnoughCpus {
            needed,
            free: capacity,
            what: match opts.smt {
                SmtPolicy::PreferSiblings => "guarded CPU(s) are".into(),
                SmtPolicy::KeepSiblingsFree => {
                    "core(s) are (--smt keep-siblings-free uses one thread per core; \
                     --smt prefer-siblings uses both)"
                        .into()
                }
            },
            guarded: guard.guarded.clone(),
        });
    }
    let mut overflow: Vec<(&Guest, u32)> = Vec::new();
    for (g, tids) in &pending {
        let cpus = p.pick(g, tids.len(), &mut warnings);
        for (i, &tid) in tids.iter().enumerate() {
            match cpus.get(i) {
                Some(&cpu) => p.claim(g.pid, tid, cpu),
                None => overflow.push((g, tid)),
            }
        }
    }
    // 4. Sharing (only reachable with allow_shared).
    for (g, tid) in overflow {
        let cpu = p.least_loaded(g.pid, current.get(&tid));
        p.claim(g.pid, tid, cpu);
    }
    let shared_cpus: CpuSet = p
        .load
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(c, _)| *c)
        .collect();
    if !shared_cpus.is_empty() {
        warnings.push(format!(
            "CPUs {shared_cpus} each run more than one vCPU (--allow-shared): those vCPUs contend for them"
        ));
    }

    // 5. Entries.
    let from = |tid: u32| current.get(&tid).cloned().unwrap_or_default();
    let mut entries = Vec::new();
    for g in &order {
        let mut vcpu0 = None;
        for &(index, tid) in &vcpus[&g.pid] {
            let cpu = p.assign[&tid];
            vcpu0.get_or_insert(cpu);
            let to = CpuSet::single(cpu);
            let from = from(tid);
            entries.push(Entry {
                vm: g.name.clone(),
                pid: g.pid,
                vcpu: Some(index),
                tid,
                role: Role::Vcpu,
                change: from != to,
                from,
                to,
                shared: shared_cpus.contains(cpu),
                manager: g.manager,
            });
        }
        let emulator_to = match (&opts.emulator, vcpu0) {
            (EmulatorPolicy::Cpus(cpus), _) => cpus.clone(),
            (EmulatorPolicy::WithVcpu0, Some(cpu)) => CpuSet::single(cpu),
            (EmulatorPolicy::Housekeeping, _) | (EmulatorPolicy::WithVcpu0, None) => {
                guard.housekeeping.clone()
            }
        };
        let mut emu = g.emulator_tids.clone();
        emu.sort_unstable();
        emu.dedup();
        for tid in emu {
            let from = from(tid);
            entries.push(Entry {
                vm: g.name.clone(),
                pid: g.pid,
                vcpu: None,
                tid,
                role: Role::Emulator,
                change: from != emulator_to,
                from,
                to: emulator_to.clone(),
                shared: false,
                manager: g.manager,
            });
        }
    }
    Ok(Plan {
        entries,
        shared_cpus,
        warnings,
    })
}

/// Checks every `--vm` map; returns pid -> CPUs.
fn validate_maps(
    topo: &Topology,
    guard: &Guard,
    order: &[&Guest],
    opts: &PlanOptions,
) -> Result<HashMap<u32, CpuSeq>, PlanError> {
    let mut out = HashMap::new();
    let mut seen: Vec<(&str, &CpuSeq)> = Vec::new();
    for (name, cpus) in &opts.vm {
        if seen.iter().any(|(n, _)| n == name) {
            return Err(PlanError::DuplicateVm { name: name.clone() });
        }
        let matching: Vec<&&Guest> = order.iter().filter(|g| &g.name == name).collect();
        let g = match matching.as_slice() {
            [g] => **g,
            [] => {
                let known = if order.is_empty() {
                    "no QEMU guests are running".to_string()
                } else {
                    let names: Vec<&str> = order.iter().map(|g| g.name.as_str()).collect();
                    format!("running guests: {}", names.join(", "))
                };
                return Err(PlanError::UnknownVm {
                    name: name.clone(),
                    known,
                });
            }
            many => {
                let pids: Vec<String> = many.iter().map(|g| g.pid.to_string()).collect();
                return Err(PlanError::AmbiguousVm {
                    name: name.clone(),
                    count: many.len(),
                    pids: pids.join(", "),
                });
            }
        };
        if let Some(cpu) = cpus.iter().find(|c| !topo.online.contains(*c)) {
            return Err(PlanError::CpuOffline {
                name: name.clone(),
                cpus: cpus.clone(),
                cpu,
                online: topo.online.clone(),
            });
        }
        if let Some(cpu) = cpus.iter().find(|c| !guard.guarded.contains(*c)) {
            return Err(PlanError::CpuNotGuarded {
                name: name.clone(),
                cpus: cpus.clone(),
                cpu,
                guarded: guard.guarded.clone(),
            });
        }
        if cpus.len() != g.vcpus.len() {
            return Err(PlanError::WrongCount {
                name: name.clone(),
                cpus: cpus.clone(),
                given: cpus.len(),
                vcpus: g.vcpus.len(),
            });
        }
        let repeated = cpus.repeated();
        if !repeated.is_empty() && !opts.allow_shared {
            return Err(PlanError::Repeated {
                name: name.clone(),
                cpus: cpus.clone(),
                repeated,
            });
        }
        if let Some((other, other_cpus)) = seen
            .iter()
            .find(|(_, c)| c.to_set().intersects(&cpus.to_set()))
            && !opts.allow_shared
        {
            return Err(PlanError::Overlap {
                first: other.to_string(),
                first_cpus: (*other_cpus).clone(),
                second: name.clone(),
                second_cpus: cpus.clone(),
                overlap: other_cpus.to_set().intersection(&cpus.to_set()),
            });
        }
        seen.push((name, cpus));
        out.insert(g.pid, cpus.clone());
    }
    Ok(out)
}

/// Placement state: which vCPU thread is on which guarded CPU.
struct Placer<'a> {
    topo: &'a Topology,
    guarded: &'a CpuSet,
    smt: SmtPolicy,
    /// vCPUs per guarded CPU.
    load: BTreeMap<u32, usize>,
    /// vCPU tid -> CPU.
    assign: HashMap<u32, u32>,
    /// CPU -> guest pids with a vCPU on it.
    guests_on: BTreeMap<u32, Vec<u32>>,
}

impl<'a> Placer<'a> {
    fn new(topo: &'a Topology, guarded: &'a CpuSet, smt: SmtPolicy) -> Self {
        Self {
            topo,
            guarded,
            smt,
            load: guarded.iter().map(|c| (c, 0)).collect(),
            assign: HashMap::new(),
            guests_on: BTreeMap::new(),
        }
    }

    fn claim(&mut self, pid: u32, tid: u32, cpu: u32) {
        *self.load.entry(cpu).or_default() += 1;
        self.assign.insert(tid, cpu);
        self.guests_on.entry(cpu).or_default().push(pid);
    }

    fn loaded(&self, cpu: u32) -> bool {
        self.load.get(&cpu).is_some_and(|n| *n > 0)
    }

    /// A guarded CPU nobody uses (and, keeping siblings free, whose SMT siblings nobody uses).
    fn is_free(&self, cpu: u32) -> bool {
        self.guarded.contains(cpu)
            && !self.loaded(cpu)
            && match self.smt {
                SmtPolicy::PreferSiblings => true,
                SmtPolicy::KeepSiblingsFree => {
                    self.topo.siblings(cpu).iter().all(|s| !self.loaded(s))
                }
            }
    }

    /// Free CPUs grouped by core, per NUMA node. Keeping siblings free, a
    /// core offers only its first free CPU.
    fn free_cores(&self) -> BTreeMap<u32, Vec<CpuSet>> {
        let mut cores: BTreeMap<CpuSet, CpuSet> = BTreeMap::new();
        for cpu in self.guarded.iter().filter(|c| self.is_free(*c)) {
            cores
                .entry(self.topo.siblings(cpu))
                .or_default()
                .insert(cpu);
        }
        let mut by_node: BTreeMap<u32, Vec<CpuSet>> = BTreeMap::new();
        for (_, mut free) in cores {
            if self.smt == SmtPolicy::KeepSiblingsFree {
                free = free.first().map(CpuSet::single).unwrap_or_default();
            }
            if let Some(first) = free.first() {
                by_node
                    .entry(self.topo.node_of(first))
                    .or_default()
                    .push(free);
            }
        }
        by_node
    }

    fn capacity(&self) -> usize {
        self.free_cores().values().flatten().map(CpuSet::len).sum()
    }

    /// Up to `k` free CPUs for one guest: on one node if any node has room
    /// (preferring the node its other vCPUs are on, else the tightest fit),
    /// else spread with a warning.
    fn pick(&self, g: &Guest, k: usize, warnings: &mut Vec<String>) -> Vec<u32> {
        let nodes = self.free_cores();
        let cap = |n: &u32| nodes.get(n).map_or(0, |c| c.iter().map(CpuSet::len).sum());
        let mine: Vec<u32> = self
            .guests_on
            .iter()
            .filter(|(_, pids)| pids.contains(&g.pid))
            .map(|(cpu, _)| *cpu)
            .collect();
        let mut home_votes: BTreeMap<u32, usize> = BTreeMap::new();
        for cpu in &mine {
            *home_votes.entry(self.topo.node_of(*cpu)).or_default() += 1;
        }
        let home = home_votes
            .iter()
            .max_by_key(|(n, v)| (**v, std::cmp::Reverse(**n)))
            .map(|(n, _)| *n);
        let node = home.filter(|h| cap(h) >= k).or_else(|| {
            nodes
                .keys()
                .filter(|n| cap(n) >= k)
                .min_by_key(|n| (cap(n), **n))
                .copied()
        });
        let mine = CpuSet::from_cpus(mine);
        if let Some(n) = node {
            return self.take(&nodes[&n], k, &mine);
        }
        // No single node has room: home node first, then the roomiest.
        let mut spread: Vec<u32> = nodes.keys().copied().collect();
        spread.sort_by_key(|n| (Some(*n) != home, std::cmp::Reverse(cap(n)), *n));
        let mut out = Vec::new();
        let mut used = Vec::new();
        for n in spread {
            if out.len() >= k {
                break;
            }
            let got = self.take(&nodes[&n], k - out.len(), &mine);
            if !got.is_empty() {
                used.push(n.to_string());
            }
            out.extend(got);
        }
        if used.len() > 1 {
            warnings.push(format!(
                "guest {}: no NUMA node has {k} free guarded CPUs; its vCPUs span nodes {}",
                g.name,
                used.join(", ")
            ));
        }
        out
    }

    /// Up to `k` CPUs from `cores` (free CPUs per core). Preferring
    /// siblings: first the free siblings of CPUs the guest already has,
    /// then whole cores, then the core that fits the remainder best so
    /// that other cores stay whole.
    fn take(&self, cores: &[CpuSet], k: usize, mine: &CpuSet) -> Vec<u32> {
        let mut cores: Vec<CpuSet> = cores.to_vec();
        let mut out = Vec::new();
        if self.smt == SmtPolicy::PreferSiblings {
            let near: CpuSet = mine
                .iter()
                .flat_map(|c| self.topo.siblings(c).iter().collect::<Vec<_>>())
                .collect();
            for core in cores.iter_mut() {
                for cpu in core.intersection(&near).iter() {
                    if out.len() < k {
                        out.push(cpu);
                        core.remove(cpu);
                    }
                }
            }
            cores.retain(|c| !c.is_empty());
        }
        while out.len() < k && !cores.is_empty() {
            let need = k - out.len();
            let best = cores
                .iter()
                .enumerate()
                .filter(|(_, c)| c.len() >= need)
                .min_by_key(|(_, c)| (c.len(), c.first()))
                .or_else(|| {
                    cores
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, c)| (c.len(), std::cmp::Reverse(c.first())))
                })
                .map(|(i, _)| i);
            let Some(i) = best else { break };
            let core = cores.remove(i);
            out.extend(core.iter().take(need));
        }
        out
    }

    /// A CPU for a vCPU that must share: away from its own guest's other
    /// vCPUs, least loaded, on the guest's node, staying where it is on ties.
    fn least_loaded(&self, pid: u32, current: Option<&CpuSet>) -> u32 {
        let home = self
            .guests_on
            .iter()
            .find(|(_, pids)| pids.contains(&pid))
            .map(|(cpu, _)| self.topo.node_of(*cpu));
        let here = current.filter(|c| c.len() == 1).and_then(CpuSet::first);
        self.guarded
            .iter()
            .min_by_key(|&cpu| {
                let same_guest = self
                    .guests_on
                    .get(&cpu)
                    .map_or(0, |p| p.iter().filter(|p| **p == pid).count());
                let load = self.load.get(&cpu).copied().unwrap_or(0);
                let off_node = home.is_some_and(|h| h != self.topo.node_of(cpu));
                (same_guest, load, off_node, Some(cpu) != here, cpu)
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{guests::Source, guests::Vcpu, host::topology::CpuInfo};

    /// A topology from (cpu, node, core) triples; SMT siblings share (node, core).
    fn topo(cpus: &[(u32, u32, u32)]) -> Topology {
        let mut info = BTreeMap::new();
        let mut nodes: BTreeMap<u32, CpuSet> = BTreeMap::new();
        for &(cpu, node, core) in cpus {
            let siblings = cpus
                .iter()
                .filter(|(_, n, c)| *n == node && *c == core)
                .map(|(c, _, _)| *c)
                .collect();
            info.insert(
                cpu,
                CpuInfo {
                    cpu,
                    core_id: core,
                    package_id: node,
                    node,
                    siblings,
                },
            );
            nodes.entry(node).or_default().insert(cpu);
        }
        Topology {
            online: cpus.iter().map(|c| c.0).collect(),
            isolated: CpuSet::new(),
            nohz_full: CpuSet::new(),
            cpus: info,
            nodes,
        }
    }

    /// `n` CPUs, one node, no SMT.
    fn flat(n: u32) -> Topology {
        topo(&(0..n).map(|c| (c, 0, c)).collect::<Vec<_>>())
    }

    fn guard(t: &Topology, guarded: &str) -> Guard {
        t.guard(Some(&CpuSet::parse(guarded).unwrap())).unwrap()
    }

    /// Guest `name` with pid `pid`: vCPU i is tid pid+10+i; emulator tids pid, pid+1.
    fn guest(name: &str, pid: u32, vcpus: u32) -> Guest {
        Guest {
            name: name.into(),
            pid,
            vcpus: (0..vcpus)
                .map(|i| Vcpu {
                    index: i,
                    tid: pid + 10 + i,
                })
                .collect(),
            emulator_tids: vec![pid, pid + 1],
            source: Source::Qmp,
            manager: Default::default(),
        }
    }

    /// Every thread of the guests allowed on all online CPUs (fresh QEMU).
    fn unpinned(t: &Topology, guests: &[Guest]) -> BTreeMap<u32, CpuSet> {
        guests
            .iter()
            .flat_map(|g| g.tids().collect::<Vec<_>>())
            .map(|tid| (tid, t.online.clone()))
            .collect()
    }

    fn after(plan: &Plan) -> BTreeMap<u32, CpuSet> {
        plan.entries.iter().map(|e| (e.tid, e.to.clone())).collect()
    }

    fn vcpu_cpus(plan: &Plan, vm: &str) -> Vec<u32> {
        plan.entries
            .iter()
            .filter(|e| e.vm == vm && e.role == Role::Vcpu)
            .map(|e| e.to.first().unwrap())
            .collect()
    }

    fn opts() -> PlanOptions {
        PlanOptions::default()
    }

    fn cs(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

    #[test]
    fn emulator_policies_parse() {
        assert_eq!("with-vcpu0".parse(), Ok(EmulatorPolicy::WithVcpu0));
        assert_eq!("0".parse(), Ok(EmulatorPolicy::Cpus(CpuSet::single(0))));
        assert!(
            "nowhere"
                .parse::<EmulatorPolicy>()
                .unwrap_err()
                .contains("with-vcpu0")
        );
        assert!("".parse::<EmulatorPolicy>().is_err());
    }

    #[test]
    fn one_cpu_per_vcpu_emulators_to_housekeeping_and_stable() {
        let t = flat(4);
        let g = guard(&t, "1-3");
        let guests = [guest("g1", 100, 2)];
        let cur = unpinned(&t, &guests);
        let p = plan(&t, &g, &guests, &cur, &opts()).unwrap();
        assert_eq!(vcpu_cpus(&p, "g1"), vec![1, 2]);
        let emu: Vec<&Entry> = p
            .entries
            .iter()
            .filter(|e| e.role == Role::Emulator)
            .collect();
        assert_eq!(emu.len(), 2);
        assert!(
            emu.iter()
                .all(|e| e.to == cs("0") && e.change && e.vcpu.is_none())
        );
        assert!(p.entries.iter().all(|e| e.change && e.from == cs("0-3")));
        assert_eq!(p.changes().count(), 4);
        assert_eq!(p.owners(), BTreeMap::from([(1, vec![110]), (2, vec![111])]));
        assert!(p.shared_cpus.is_empty() && p.warnings.is_empty());

        // Run again on the result: nothing to do.
        let again = plan(&t, &g, &guests, &after(&p), &opts()).unwrap();
        assert_eq!(again.changes().count(), 0, "{again:#?}");
        assert_eq!(after(&again), after(&p));
    }

    #[test]
    fn existing_valid_pins_are_kept() {
        let t = flat(6);
        let g = guard(&t, "1-5");
        let guests = [guest("a", 100, 2), guest("b", 200, 1)];
        let mut cur = unpinned(&t, &guests);
        cur.insert(111, cs("4")); // a/vCPU1 on 4: keeps it
        cur.insert(110, cs("0")); // a/vCPU0 on a housekeeping CPU: moves
        cur.insert(210, cs("4")); // b/vCPU0 also on 4: "a" claimed it first
        let p = plan(&t, &g, &guests, &cur, &opts()).unwrap();
        assert_eq!(vcpu_cpus(&p, "a"), vec![1, 4]);
        assert_eq!(vcpu_cpus(&p, "b"), vec![2]);
        let kept = p.entries.iter().find(|e| e.tid == 111).unwrap();
        assert!(!kept.change);
        // A pin to two CPUs is not a valid pin.
        cur.insert(210, cs("3,5"));
        let p = plan(&t, &g, &guests, &cur, &opts()).unwrap();
        assert_eq!(vcpu_cpus(&p, "b"), vec![2]);
    }

    #[test]
    fn guests_stay_on_one_numa_node() {
        // Two nodes of 4 CPUs; CPU 0 and 4 are housekeeping.
        let t = topo(&(0..8).map(|c| (c, c / 4, c)).collect::<Vec<_>>());
        let g = guard(&t, "1-3,5-7");
        let guests = [guest("a", 100, 3), guest("b", 200, 3)];
        let p = plan(&t, &g, &guests, &unpinned(&t, &guests), &opts()).unwrap();
        let node = |cpus: Vec<u32>| cpus.iter().map(|c| c / 4).collect::<Vec<_>>();
        let (a, b) = (vcpu_cpus(&p, "a"), vcpu_cpus(&p, "b"));
        assert!(node(a.clone()).windows(2).all(|w| w[0] == w[1]), "{a:?}");
        assert!(node(b.clone()).windows(2).all(|w| w[0] == w[1]), "{b:?}");
        assert_ne!(a[0] / 4, b[0] / 4);

        // A 2-vCPU and a 3-vCPU guest when node 0 has 2 free CPUs and node 1 has 3:
        // the big one goes first and takes node 1; the small one fits node 0.
        let guests = [guest("small", 100, 2), guest("big", 200, 3)];
        let g2 = guard(&t, "2-3,5-7");
        let p = plan(&t, &g2, &guests, &unpinned(&t, &guests), &opts()).unwrap();
        assert_eq!(vcpu_cpus(&p, "big"), vec![5, 6, 7]);
        assert_eq!(vcpu_cpus(&p, "small"), vec![2, 3]);

        // A guest bigger than any node spreads, with a warning.
        let guests = [guest("huge", 100, 5)];
        let p = plan(&t, &g, &guests, &unpinned(&t, &guests), &opts()).unwrap();
        assert_eq!(vcpu_cpus(&p, "huge").len(), 5);
        assert!(p.warnings[0].contains("span nodes"), "{:?}", p.warnings);

        // A guest with one vCPU kept on node 1 gets the rest there too.
        let guests = [guest("a", 100, 2)];
        let mut cur = unpinned(&t, &guests);
        cur.insert(110, cs("6"));
        let p = plan(&t, &g, &guests, &cur, &opts()).unwrap();
        assert_eq!(vcpu_cpus(&p, "a"), vec![6, 5]);
    }

    /// 4 cores x 2 threads, Linux numbering: CPU c and c+4 are siblings.
    fn smt4x2() -> Topology {
        topo(&(0..8).map(|c| (c, 0, c % 4)).collect::<Vec<_>>())
    }

    #[test]
    fn smt_prefer_siblings_fills_cores() {
        let t = smt4x2();
        let g = guard(&t, "1-3,5-7");
        let guests = [guest("a", 100, 2), guest("b", 200, 1), guest("c", 300, 1)];
        let p = plan(&t, &g, &guests, &unpinned(&t, &guests), &opts()).unwrap();
        // "a" gets a whole core; "b" and "c" share the next core's two threads
        // rather than each breaking a whole core.
        assert_eq!(vcpu_cpus(&p, "a"), vec![1, 5]);
        let (b, c) = (vcpu_cpus(&p, "b")[0], vcpu_cpus(&p, "c")[0]);
        assert_eq!((b % 4), (c % 4), "b on {b}, c on {c}");
        // A 3-vCPU guest: one whole core, plus one thread.
        let guests = [guest("a", 100, 3)];
        let p = plan(&t, &g, &guests, &unpinned(&t, &guests), &opts()).unwrap();
        assert_eq!(vcpu_cpus(&p, "a"), vec![1, 5, 2]);
        // The sibling of a kept vCPU is preferred for the guest's next vCPU.
        let guests = [guest("a", 100, 2)];
        let mut cur = unpinned(&t, &guests);
        cur.insert(110, cs("3"));
        let p = plan(&t, &g, &guests, &cur, &opts()).unwrap();
        assert_eq!(vcpu_cpus(&p, "a"), vec![3, 7]);
    }

    #[test]
    fn smt_keep_siblings_free() {
        let t = smt4x2();
        let g = guard(&t, "1-3,5-7");
        let o = PlanOptions {
            smt: SmtPolicy::KeepSiblingsFree,
            ..opts()
        };
        let guests = [guest("a", 100, 2), guest("b", 200, 1)];
        let p = plan(&t, &g, &guests, &unpinned(&t, &guests), &o).unwrap();
        let mut cores: Vec<u32> = ["a", "b"]
            .iter()
            .flat_map(|vm| vcpu_cpus(&p, vm))
            .map(|c| c % 4)
            .collect();
        cores.sort();
        assert_eq!(cores, vec![1, 2, 3]);
        // A kept pin on a sibling of another kept pin is not valid.
        let guests = [guest("a", 100, 2)];
        let mut cur = unpinned(&t, &guests);
        cur.insert(110, cs("1"));
        cur.insert(111, cs("5"));
        let p = plan(&t, &g, &guests, &cur, &o).unwrap();
        assert_eq!(vcpu_cpus(&p, "a")[0], 1);
        assert_ne!(vcpu_cpus(&p, "a")[1] % 4, 1);
        // 3 cores, 4 vCPUs: an error that names the policy.
        let guests = [guest("a", 100, 4)];
        let e = plan(&t, &g, &guests, &unpinned(&t, &guests), &o).unwrap_err();
        assert!(matches!(
            e,
            PlanError::NotEnoughCpus {
                needed: 4,
                free: 3,
                ..
            }
        ));
        assert!(e.to_string().contains("keep-siblings-free"), "{e}");
        // The same with prefer-siblings fits.
        assert!(plan(&t, &g, &guests, &unpinned(&t, &guests), &opts()).is_ok());
    }

    fn seq(s: &str) -> CpuSeq {
        CpuSeq::parse(s).unwrap()
    }

    #[test]
    fn a_cpu_repeated_in_a_map_is_shared_only_when_allowed() {
        let t = flat(2);
        let g = guard(&t, "1");
        let guests = [guest("g1", 100, 2)];
        let cur = unpinned(&t, &guests);
        let mut o = PlanOptions {
            vm: vec![("g1".into(), seq("1,1"))],
            ..opts()
        };
        let e = plan(&t, &g, &guests, &cur, &o).unwrap_err().to_string();
        assert!(
            e.contains("--vm g1=1,1 puts more than one vCPU on CPU 1")
                && e.contains("--allow-shared"),
            "{e}"
        );
        o.allow_shared = true;
        let p = plan(&t, &g, &guests, &cur, &o).unwrap();
        assert_eq!(vcpu_cpus(&p, "g1"), vec![1, 1]);
        assert_eq!(p.shared_cpus, cs("1"));
    }

    #[test]
    fn explicit_maps_win() {
        let t = flat(6);
        let g = guard(&t, "1-5");
        let guests = [guest("a", 100, 2), guest("b", 200, 1)];
        let mut cur = unpinned(&t, &guests);
        cur.insert(210, cs("4")); // b sits where a is sent: b moves
        let o = PlanOptions {
            vm: vec![("a".into(), seq("4-5"))],
            ..opts()
        };
        let p = plan(&t, &g, &guests, &cur, &o).unwrap();
        assert_eq!(vcpu_cpus(&p, "a"), vec![4, 5]);
        assert_eq!(vcpu_cpus(&p, "b"), vec![1]);
        let again = plan(&t, &g, &guests, &after(&p), &o).unwrap();
        assert_eq!(again.changes().count(), 0);
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let t = flat(4);
        let g = guard(&t, "1-2");
        let guests = [guest("g1", 100, 1), guest("g2", 200, 1)];
        let cur = unpinned(&t, &guests);
        let run = |vm: Vec<(&str, &str)>| {
            let o = PlanOptions {
                vm: vm
                    .into_iter()
                    .map(|(n, c)| (n.to_string(), seq(c)))
                    .collect(),
                ..opts()
            };
            plan(&t, &g, &guests, &cur, &o).unwrap_err().to_string()
        };
        assert_eq!(
            run(vec![("nope", "1")]),
            "--vm nope=...: no running guest is named \"nope\" (running guests: g1, g2)"
        );
        assert_eq!(
            run(vec![("g1", "7")]),
            "--vm g1=7: CPU 7 is not online (online CPUs: 0-3)"
        );
        assert!(
            run(vec![("g1", "3")])
                .starts_with("--vm g1=3: CPU 3 is not guarded (guarded CPUs: 1-2)")
        );
        assert!(run(vec![("g1", "1-2")]).contains("lists 2 CPU(s) but guest g1 has 1 vCPU(s)"));
        assert_eq!(
            run(vec![("g1", "1"), ("g2", "1")]),
            "--vm g1=1 and --vm g2=1 both claim CPU 1: a guarded CPU belongs to one vCPU \
             (--allow-shared lets them share it)"
        );
        assert_eq!(
            run(vec![("g1", "1"), ("g1", "2")]),
            "--vm g1 is given more than once"
        );

        let twins = [guest("same", 100, 1), guest("same", 200, 1)];
        let o = PlanOptions {
            vm: vec![("same".into(), seq("1"))],
            ..opts()
        };
        let e = plan(&t, &g, &twins, &cur, &o).unwrap_err();
        assert!(matches!(e, PlanError::AmbiguousVm { count: 2, .. }), "{e}");
        let e = plan(&t, &g, &[], &cur, &o).unwrap_err();
        assert!(e.to_string().contains("no QEMU guests are running"), "{e}");

        let o = PlanOptions {
            emulator: EmulatorPolicy::Cpus(cs("0,9")),
            ..opts()
        };
        let e = plan(&t, &g, &guests, &cur, &o).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--emulator 0,9: CPU 9 is not online (online CPUs: 0-3)"
        );
    }

    #[test]
    fn not_enough_cpus_unless_shared() {
        let t = flat(2);
        let g = guard(&t, "1");
        let guests = [guest("g1", 100, 1), guest("g2", 200, 1)];
        let cur = unpinned(&t, &guests);
        let e = plan(&t, &g, &guests, &cur, &opts()).unwrap_err();
        assert!(
            matches!(
                e,
                PlanError::NotEnoughCpus {
                    needed: 2,
                    free: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("--allow-shared"), "{e}");

        let o = PlanOptions {
            allow_shared: true,
            ..opts()
        };
        let p = plan(&t, &g, &guests, &cur, &o).unwrap();
        assert_eq!(vcpu_cpus(&p, "g1"), vec![1]);
        assert_eq!(vcpu_cpus(&p, "g2"), vec![1]);
        assert_eq!(p.shared_cpus, cs("1"));
        assert!(
            p.entries
                .iter()
                .filter(|e| e.role == Role::Vcpu)
                .all(|e| e.shared)
        );
        assert!(p.warnings.iter().any(|w| w.contains("--allow-shared")));
        let again = plan(&t, &g, &guests, &after(&p), &o).unwrap();
        assert_eq!(again.changes().count(), 0);
    }

    #[test]
    fn sharing_is_round_robin_and_avoids_own_guest() {
        let t = flat(3);
        let g = guard(&t, "1-2");
        let guests = [guest("a", 100, 3), guest("b", 200, 1)];
        let o = PlanOptions {
            allow_shared: true,
            ..opts()
        };
        let p = plan(&t, &g, &guests, &unpinned(&t, &guests), &o).unwrap();
        let mut all: Vec<u32> = vcpu_cpus(&p, "a");
        all.extend(vcpu_cpus(&p, "b"));
        // 4 vCPUs on 2 CPUs: two each.
        assert_eq!(all.iter().filter(|c| **c == 1).count(), 2, "{all:?}");
        assert_eq!(p.shared_cpus, cs("1-2"));
        let again = plan(&t, &g, &guests, &after(&p), &o).unwrap();
        assert_eq!(again.changes().count(), 0, "{again:#?}");
    }

    #[test]
    fn emulator_policies() {
        let t = flat(4);
        let g = guard(&t, "2-3");
        let guests = [guest("g1", 100, 2)];
        let cur = unpinned(&t, &guests);
        let emu_to = |o: &PlanOptions| {
            let p = plan(&t, &g, &guests, &cur, o).unwrap();
            let tos: Vec<CpuSet> = p
                .entries
                .iter()
                .filter(|e| e.role == Role::Emulator)
                .map(|e| e.to.clone())
                .collect();
            assert_eq!(tos.len(), 2);
            tos[0].clone()
        };
        assert_eq!(emu_to(&opts()), cs("0-1"));
        let with0 = PlanOptions {
            emulator: EmulatorPolicy::WithVcpu0,
            ..opts()
        };
        assert_eq!(emu_to(&with0), cs("2"));
        let list = PlanOptions {
            emulator: EmulatorPolicy::Cpus(cs("1")),
            ..opts()
        };
        assert_eq!(emu_to(&list), cs("1"));
    }

    #[test]
    fn serializes_for_json_output() {
        let t = flat(2);
        let g = guard(&t, "1");
        let guests = [guest("g1", 100, 1)];
        let p = plan(&t, &g, &guests, &unpinned(&t, &guests), &opts()).unwrap();
        let v = serde_json::to_value(&p).unwrap();
        let e = &v["entries"];
        assert_eq!(e[0]["vm"], "g1");
        assert_eq!(e[0]["vcpu"], 0);
        assert_eq!(e[0]["role"], "vcpu");
        assert_eq!(e[0]["from"], "0-1");
        assert_eq!(e[0]["to"], "1");
        assert_eq!(e[0]["change"], true);
        assert_eq!(e[1]["vcpu"], serde_json::Value::Null);
        assert_eq!(e[1]["role"], "emulator");
        assert_eq!(e[1]["to"], "0");
        assert_eq!(v["shared_cpus"], "");
    }
}
