//! The one placement policy every command shares (the config file, flags on
//! top), and what `pin` would plan now under it: `audit`, `watch` and
//! `latency` judge the guarded CPUs against that plan, so a placement the
//! policy intends (`emulator = "with-vcpu0"`) is never called an intrusion.
use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, bail};

use crate::{
    bpf::probe::Probe,
    cli::{DiscoverArgs, GuardArgs, PolicyArgs},
    config::{Config, Overrides},
    guests::{DiscoverOptions, Discoverer, Unidentified},
    host::{
        cpulist::CpuSet,
        procfs::{Proc, ThreadInfo},
        topology::{Guard, Topology},
    },
    placement::plan::{self, Plan, PlanOptions, Role},
};

/// The configuration file's policy (`--config`, else the default file if it exists).
pub fn load(args: &PolicyArgs) -> anyhow::Result<Config> {
    Ok(Config::load(&Overrides::from(args))?)
}

/// The guarded CPUs: `--guard`, else the config file's `guard`, else isolcpus.
pub fn guard(topo: &Topology, args: &GuardArgs, config: &Config) -> anyhow::Result<Guard> {
    Ok(topo.guard(args.guard.as_ref().or(config.guard.as_ref()))?)
}

/// What `pin` would do now.
#[derive(Debug, Default)]
pub struct Now {
    pub plan: Plan,
    /// Every thread on the host, read after discovery.
    pub threads: Vec<ThreadInfo>,
    /// KVM guests whose vCPU threads could not be told apart.
    pub unidentified: Vec<Unidentified>,
}

/// Discovers the guests and plans their placement as `pin` would under
/// `opts` (nothing is changed), and reads every thread on the host (the
/// snapshot the plan is judged against). `doing` ends the error message
/// when an explicit QMP socket fails.
pub fn plan_now(
    topo: &Topology,
    guard: &Guard,
    proc: &Proc,
    args: &DiscoverArgs,
    opts: &PlanOptions,
    doing: &str,
) -> anyhow::Result<Now> {
    let mut discoverer = Discoverer::new(proc.clone(), DiscoverOptions::from(args));
    let discovery = discoverer.scan()?;
    for w in &discovery.warnings {
        log::warn!("{w}");
    }
    if !discovery.errors.is_empty() {
        let msgs: Vec<String> = discovery.errors.iter().map(|e| e.to_string()).collect();
        bail!(
            "{}\ncould not {doing}: without that guest's vCPU map its threads cannot be told from intruders",
            msgs.join("\n")
        );
    }
    // Listed after discovery, so every vCPU still running is in the listing.
    let threads = proc
        .all_threads()
        .with_context(|| format!("cannot list threads in {}", proc.root().display()))?;
    let by_tid: HashMap<u32, &ThreadInfo> = threads.iter().map(|t| (t.tid, t)).collect();
    let mut current: BTreeMap<u32, CpuSet> = BTreeMap::new();
    let mut guests = Vec::new();
    for mut g in discovery.guests {
        // Threads that exited since discovery cannot own anything.
        g.vcpus
            .retain(|v| by_tid.get(&v.tid).is_some_and(|t| t.tgid == g.pid));
        g.emulator_tids.retain(|t| by_tid.contains_key(t));
        if g.vcpus.is_empty() {
            continue;
        }
        for tid in g.tids() {
            current.insert(tid, by_tid[&tid].allowed.clone());
        }
        guests.push(g);
    }
    // Sharing is allowed so that a host with more vCPUs than guarded CPUs can
    // still be judged; the reports warn about shared CPUs. A `vm` map of
    // the policy applies to the guests running now.
    let names: Vec<&str> = guests.iter().map(|g| g.name.as_str()).collect();
    let mut opts = opts.clone();
    opts.allow_shared = true;
    opts.vm.retain(|(n, _)| names.contains(&n.as_str()));
    let plan = plan::plan(topo, guard, &guests, &current, &opts)
        .context("cannot work out which vCPU owns which guarded CPU")?;
    Ok(Now {
        plan,
        threads,
        unidentified: discovery.unidentified,
    })
}

/// Tells the probe what the plan intends on the guarded CPUs: each vCPU
/// owns its CPU (the kernel then calls it `vcpu`, not an intruder), and an
/// emulator thread the policy puts on a guarded CPU is allowed there.
pub fn register(probe: &mut Probe, plan: &Plan, guarded: &CpuSet) -> anyhow::Result<()> {
    for e in &plan.entries {
        let on_guarded = e.to.intersection(guarded);
        match e.role {
            Role::Vcpu => {
                if let (Some(cpu), 1) = (on_guarded.first(), on_guarded.len()) {
                    probe.set_owner(e.tid, cpu)?;
                }
            }
            Role::Emulator if !on_guarded.is_empty() => {
                let cpu = (on_guarded.len() == 1)
                    .then(|| on_guarded.first())
                    .flatten();
                probe.set_allowed(e.tid, cpu)?;
            }
            Role::Emulator => {}
        }
    }
    Ok(())
}

/// The plan for every guest running now under the configured policy, for
/// `watch` and `latency` (which take no `--qmp`): logged, and empty when
/// it cannot be made (their measurement does not depend on it).
pub fn plan_for_observers(topo: &Topology, guard: &Guard, config: &Config) -> Plan {
    match plan_now(
        topo,
        guard,
        &Proc::default(),
        &DiscoverArgs::default(),
        &config.plan_options(),
        "name the vCPUs",
    ) {
        Ok(now) => now.plan,
        Err(e) => {
            log::warn!("{e:#}; vCPU threads will not be told from intruders");
            Plan::default()
        }
    }
}
