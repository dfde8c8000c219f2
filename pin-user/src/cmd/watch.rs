//! `pinguard watch`: attach the observer and stream what runs on guarded CPUs.
use crate::units::fmt_ns;
use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Write as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    bpf::{
        class::ThreadClass,
        events::{KernelEvent, Thread},
        probe::{EventReader, Probe, ProbeConfig, comm_str},
    },
    cli::WatchArgs,
    cmd::{check_owners, move_self_to, policy, runtime, wait_for_stop},
    exit,
    host::topology::Topology,
    placement::plan::Plan,
};

pub fn run(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let topo = Topology::read()?;
    let policy_config = policy::load(&args.policy)?;
    let guard = policy::guard(&topo, &args.guard, &policy_config)?;
    check_owners(&guard.guarded, &args.owners)?;
    // Without --owner, the owners are the vCPUs of the plan `pin` makes
    // under the configured policy.
    let plan = if args.owners.is_empty() {
        policy::plan_for_observers(&topo, &guard, &policy_config)
    } else {
        Default::default()
    };
    move_self_to(&guard.housekeeping)?;
    let mut config = ProbeConfig::new(guard.guarded.clone());
    config.hook = args.hook;
    config.event_interval = args.event_interval;
    // An interactive session names who changes a vCPU's affinity; only the
    // daemon, which runs for months, leaves the syscall tracepoints off.
    config.affinity = true;
    runtime()?.block_on(async move {
        let mut probe = Probe::load(&config)?;
        for &(cpu, tid) in &args.owners {
            probe.set_owner(tid, cpu)?;
        }
        policy::register(&mut probe, &plan, &guard.guarded)?;
        let mut events = probe.take_events()?.into_async().context("polling the event ring buffer")?;
        // Watching starts now that the owners are known: what the programs
        // sent before (a vCPU slice that ended while they were being
        // registered) would misname them.
        events.get_mut().drain(|_| {});
        eprintln!(
            "pinguard: watching CPUs {} (housekeeping {}); {}",
            guard.guarded,
            guard.housekeeping,
            match args.duration {
                Some(d) => format!("for {d:?}"),
                None => "Ctrl-C to stop".into(),
            }
        );
        let deadline = tokio::time::sleep(args.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
        tokio::pin!(deadline);
        let stop = wait_for_stop();
        tokio::pin!(stop);
        let mut decode_errors = 0u64;
        let mut print = |r: Result<KernelEvent, _>| match r {
            Ok(ev) => print_event(&ev, args.json),
            Err(e) => {
                decode_errors += 1;
                log::warn!("undecodable event: {e}");
            }
        };
        loop {
            tokio::select! {
                r = EventReader::next_batch(&mut events, &mut print) => r.context("reading events")?,
                _ = &mut deadline => break,
                r = &mut stop => { r?; break }
            }
        }
        // Events already in the buffer still belong to the window.
        events.get_mut().drain(&mut print);
        print_summary(&probe, args.top, args.json, decode_errors, &plan)?;
        Ok(ExitCode::from(exit::OK))
    })
}

fn print_event(ev: &KernelEvent, json: bool) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}", render(ev, json));
    let _ = out.flush();
}

/// One event as one line of output, JSON or text.
fn render(ev: &KernelEvent, json: bool) -> String {
    let line = Line::of(ev);
    if json {
        serde_json::to_string(&line).unwrap_or_default()
    } else {
        let extra = match ev {
            KernelEvent::Intrusion(i) => format!(
                "class={} run={} total={} slices={}",
                i.class,
                fmt_ns(i.run_ns),
                fmt_ns(i.total_ns),
                i.slices
            ),
            KernelEvent::MigrateIn(m) => format!("from_cpu={}", m.from_cpu),
            KernelEvent::OwnerAway(m) => format!("to_cpu={}", m.to_cpu),
            KernelEvent::AffinityChange(c) => {
                format!("vcpu_tid={} new_affinity={}", c.target_tid, c.mask)
            }
            KernelEvent::Exec(_)
            | KernelEvent::Exit(_)
            | KernelEvent::Episode(_)
            | KernelEvent::Irq(_)
            | KernelEvent::Softirq(_) => String::new(),
        };
        format!(
            "{:<16} cpu={} tid={} tgid={} comm={:?} {}",
            line.event, line.cpu, line.tid, line.tgid, line.comm, extra
        )
    }
}

/// One event as `watch` prints it. Scripts and the integration tests parse
/// these lines, so they keep the shape they had when the kernel sent one
/// record for every kind: every kind has the common fields, zero where it
/// has nothing to say (and `class` "idle", the class numbered 0), and the
/// optional ones that belong to it.
#[derive(Debug, serde::Serialize)]
struct Line<'a> {
    event: &'static str,
    kind: u32,
    cpu: u32,
    tid: u32,
    tgid: u32,
    comm: &'a str,
    cgroup_id: u64,
    /// The event's time: an intrusion's slice start, a probe's wake-up, a
    /// handler's entry, else when the kernel saw it.
    start_ns: u64,
    /// An intrusion's slice, a probe's wait, a handler's run.
    run_ns: u64,
    /// An intrusion's totals on this CPU; an episode's IRQ and softirq time.
    total_ns: u64,
    slices: u64,
    class: ThreadClass,
    /// MIGRATE_IN: origin CPU; OWNER_AWAY: destination CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    other_cpu: Option<u32>,
    /// AFFINITY_CHANGE: the vCPU thread whose affinity was changed, and the new mask.
    #[serde(skip_serializing_if = "Option::is_none")]
    target_tid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<String>,
    /// IRQ: the IRQ number; SOFTIRQ: the vector.
    #[serde(skip_serializing_if = "Option::is_none")]
    number: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    episode: Option<EpisodeLine<'a>>,
}

/// What happened on the CPU while a watched probe thread waited.
#[derive(Debug, serde::Serialize)]
struct EpisodeLine<'a> {
    wake_ns: u64,
    wait_ns: u64,
    irq_ns: u64,
    softirq_ns: u64,
    nmis: u32,
    prev_tid: u32,
    prev_comm: &'a str,
    prev_run_ns: u64,
}

impl<'a> Line<'a> {
    fn of(ev: &'a KernelEvent) -> Self {
        let mut line = Line {
            event: ev.name(),
            kind: ev.kind(),
            cpu: 0,
            tid: 0,
            tgid: 0,
            comm: "",
            cgroup_id: 0,
            start_ns: 0,
            run_ns: 0,
            total_ns: 0,
            slices: 0,
            class: ThreadClass::Idle,
            other_cpu: None,
            target_tid: None,
            mask: None,
            number: None,
            episode: None,
        };
        match ev {
            KernelEvent::Intrusion(i) => {
                line.thread(&i.thread);
                line.cpu = i.cpu;
                line.cgroup_id = i.cgroup_id;
                line.start_ns = i.start_ns;
                line.run_ns = i.run_ns;
                line.total_ns = i.total_ns;
                line.slices = i.slices;
                line.class = i.class;
            }
            KernelEvent::MigrateIn(m) => {
                line.thread(&m.thread);
                line.cpu = m.to_cpu;
                line.other_cpu = Some(m.from_cpu);
                line.start_ns = m.at_ns;
            }
            KernelEvent::OwnerAway(m) => {
                line.thread(&m.thread);
                line.cpu = m.from_cpu;
                line.other_cpu = Some(m.to_cpu);
                line.start_ns = m.at_ns;
            }
            KernelEvent::AffinityChange(c) => {
                line.thread(&c.caller);
                line.cpu = c.cpu;
                line.start_ns = c.at_ns;
                line.target_tid = Some(c.target_tid);
                line.mask = Some(c.mask.to_string());
            }
            KernelEvent::Exec(p) | KernelEvent::Exit(p) => {
                line.thread(&p.thread);
                line.start_ns = p.at_ns;
            }
            KernelEvent::Episode(e) => {
                line.cpu = e.cpu;
                line.tid = e.tid;
                line.comm = &e.prev_comm;
                line.start_ns = e.wake_ns;
                line.run_ns = e.wait_ns;
                line.total_ns = e.irq_ns;
                line.slices = e.softirq_ns;
                line.episode = Some(EpisodeLine {
                    wake_ns: e.wake_ns,
                    wait_ns: e.wait_ns,
                    irq_ns: e.irq_ns,
                    softirq_ns: e.softirq_ns,
                    nmis: e.nmis,
                    prev_tid: e.prev_tid,
                    prev_comm: &e.prev_comm,
                    prev_run_ns: e.prev_run_ns,
                });
            }
            KernelEvent::Irq(n) | KernelEvent::Softirq(n) => {
                line.cpu = n.cpu;
                line.number = Some(n.number);
                line.start_ns = n.start_ns;
                line.run_ns = n.run_ns;
            }
        }
        line
    }

    fn thread(&mut self, t: &'a Thread) {
        self.tid = t.tid;
        self.tgid = t.tgid;
        self.comm = &t.comm;
    }
}

#[derive(Debug, serde::Serialize)]
struct CpuSummary {
    cpu: u32,
    /// Nanoseconds by class (idle, vcpu, kernel, allowed, intruder_user, intruder_kthread).
    run_ns: BTreeMap<&'static str, u64>,
    slices: BTreeMap<&'static str, u64>,
    owner_ns: u64,
    allowed_ns: u64,
    other_ns: u64,
    top_intruders: Vec<Intruder>,
}

#[derive(Debug, serde::Serialize)]
struct Intruder {
    tid: u32,
    tgid: u32,
    comm: String,
    class: ThreadClass,
    /// "vm/vcpuN" when the plan names this thread a vCPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    vcpu: Option<String>,
    run_ns: u64,
    slices: u64,
    max_slice_ns: u64,
}

fn print_summary(
    probe: &Probe,
    top: usize,
    json: bool,
    decode_errors: u64,
    plan: &Plan,
) -> anyhow::Result<()> {
    let vcpus: HashMap<u32, String> = plan
        .entries
        .iter()
        .filter_map(|e| Some((e.tid, format!("{}/vcpu{}", e.vm, e.vcpu?))))
        .collect();
    let stats = probe.cpu_stats()?;
    let threads = probe.threads()?;
    let counters = probe.counters()?;
    let mut cpus = Vec::new();
    for (cpu, s) in &stats {
        let by = |c: ThreadClass| s.run_ns[c.index()];
        let mut intruders: Vec<Intruder> = threads
            .iter()
            .filter(|(k, _)| k.cpu == *cpu)
            .filter_map(|(k, t)| {
                Some(Intruder {
                    tid: k.tid,
                    tgid: t.tgid,
                    comm: comm_str(&t.comm),
                    class: ThreadClass::from_raw(t.class)?,
                    vcpu: vcpus.get(&k.tid).cloned(),
                    run_ns: t.run_ns,
                    slices: t.slices,
                    max_slice_ns: t.max_slice_ns,
                })
            })
            .collect();
        intruders.sort_by_key(|i| std::cmp::Reverse(i.run_ns));
        intruders.truncate(top);
        cpus.push(CpuSummary {
            cpu: *cpu,
            run_ns: ThreadClass::ALL
                .iter()
                .map(|&c| (c.as_str(), by(c)))
                .collect(),
            slices: ThreadClass::ALL
                .iter()
                .map(|&c| (c.as_str(), s.slices[c.index()]))
                .collect(),
            owner_ns: by(ThreadClass::Vcpu),
            allowed_ns: by(ThreadClass::Kernel) + by(ThreadClass::Allowed),
            other_ns: by(ThreadClass::IntruderUser) + by(ThreadClass::IntruderKthread),
            top_intruders: intruders,
        });
    }
    let mut out = io::stdout().lock();
    if json {
        let summary = serde_json::json!({
            "event": "summary",
            "cpus": cpus,
            "events_lost": counters.events_lost,
            "thread_map_full": counters.thread_map_full,
            "read_errors": counters.read_errors,
            "decode_errors": decode_errors,
        });
        writeln!(out, "{summary}")?;
    } else {
        writeln!(out, "\nsummary (since attach):")?;
        for c in &cpus {
            writeln!(
                out,
                "cpu {}: owner {}  allowed {}  other {}  idle {}",
                c.cpu,
                fmt_ns(c.owner_ns),
                fmt_ns(c.allowed_ns),
                fmt_ns(c.other_ns),
                fmt_ns(c.run_ns.get("idle").copied().unwrap_or_default())
            )?;
            for i in &c.top_intruders {
                writeln!(
                    out,
                    "    {:>8} {:<16} tid={} tgid={} slices={} longest={} ({})",
                    fmt_ns(i.run_ns),
                    i.comm,
                    i.tid,
                    i.tgid,
                    i.slices,
                    fmt_ns(i.max_slice_ns),
                    i.vcpu.as_deref().unwrap_or(i.class.as_str())
                )?;
            }
        }
        if counters.events_lost + counters.thread_map_full + decode_errors > 0 {
            writeln!(
                out,
                "lost events: {}, threads not tracked (map full): {}, undecodable: {}",
                counters.events_lost, counters.thread_map_full, decode_errors
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bpf::events::{AffinityChange, Episode, Intrusion, Migration, Noise, Process},
        host::cpulist::CpuSet,
    };

    fn thread(tid: u32, tgid: u32, comm: &str) -> Thread {
        Thread {
            tid,
            tgid,
            comm: comm.into(),
        }
    }

    fn migration() -> Migration {
        Migration {
            thread: thread(700, 600, "worker"),
            from_cpu: 0,
            to_cpu: 2,
            at_ns: 55,
        }
    }

    /// Every kind, with the JSON line and the text line `watch` printed for
    /// it when the kernel sent one record for all kinds.
    fn cases() -> Vec<(KernelEvent, &'static str, &'static str)> {
        vec![
            (
                KernelEvent::Intrusion(Intrusion {
                    cpu: 1,
                    thread: thread(4243, 4242, "stress"),
                    cgroup_id: 9,
                    start_ns: 100,
                    run_ns: 200_000,
                    total_ns: 300_000,
                    slices: 2,
                    class: ThreadClass::IntruderUser,
                }),
                r#"{"event":"intrusion","kind":1,"cpu":1,"tid":4243,"tgid":4242,"comm":"stress","cgroup_id":9,"start_ns":100,"run_ns":200000,"total_ns":300000,"slices":2,"class":"intruder_user"}"#,
                r#"intrusion        cpu=1 tid=4243 tgid=4242 comm="stress" class=intruder_user run=200.0µs total=300.0µs slices=2"#,
            ),
            (
                KernelEvent::MigrateIn(migration()),
                r#"{"event":"migrate_in","kind":2,"cpu":2,"tid":700,"tgid":600,"comm":"worker","cgroup_id":0,"start_ns":55,"run_ns":0,"total_ns":0,"slices":0,"class":"idle","other_cpu":0}"#,
                r#"migrate_in       cpu=2 tid=700 tgid=600 comm="worker" from_cpu=0"#,
            ),
            (
                // The owner of CPU 2 left for CPU 0.
                KernelEvent::OwnerAway(Migration {
                    from_cpu: 2,
                    to_cpu: 0,
                    ..migration()
                }),
                r#"{"event":"owner_away","kind":3,"cpu":2,"tid":700,"tgid":600,"comm":"worker","cgroup_id":0,"start_ns":55,"run_ns":0,"total_ns":0,"slices":0,"class":"idle","other_cpu":0}"#,
                r#"owner_away       cpu=2 tid=700 tgid=600 comm="worker" to_cpu=0"#,
            ),
            (
                KernelEvent::AffinityChange(AffinityChange {
                    cpu: 3,
                    caller: thread(55, 54, "taskset"),
                    target_tid: 77,
                    mask: CpuSet::from_cpus([0, 2]),
                    at_ns: 7,
                }),
                r#"{"event":"affinity_change","kind":4,"cpu":3,"tid":55,"tgid":54,"comm":"taskset","cgroup_id":0,"start_ns":7,"run_ns":0,"total_ns":0,"slices":0,"class":"idle","target_tid":77,"mask":"0,2"}"#,
                r#"affinity_change  cpu=3 tid=55 tgid=54 comm="taskset" vcpu_tid=77 new_affinity=0,2"#,
            ),
            (
                KernelEvent::Exec(Process {
                    thread: thread(900, 900, "qemu-system-x86"),
                    at_ns: 1,
                }),
                r#"{"event":"exec","kind":5,"cpu":0,"tid":900,"tgid":900,"comm":"qemu-system-x86","cgroup_id":0,"start_ns":1,"run_ns":0,"total_ns":0,"slices":0,"class":"idle"}"#,
                r#"exec             cpu=0 tid=900 tgid=900 comm="qemu-system-x86" "#,
            ),
            (
                KernelEvent::Exit(Process {
                    thread: thread(901, 900, "CPU 0/KVM"),
                    at_ns: 2,
                }),
                r#"{"event":"exit","kind":6,"cpu":0,"tid":901,"tgid":900,"comm":"CPU 0/KVM","cgroup_id":0,"start_ns":2,"run_ns":0,"total_ns":0,"slices":0,"class":"idle"}"#,
                r#"exit             cpu=0 tid=901 tgid=900 comm="CPU 0/KVM" "#,
            ),
            (
                KernelEvent::Episode(Episode {
                    cpu: 1,
                    tid: 501,
                    wake_ns: 1_000,
                    wait_ns: 50_000,
                    irq_ns: 3_000,
                    softirq_ns: 4_000,
                    nmis: 1,
                    prev_tid: 77,
                    prev_comm: "kworker/1:1".into(),
                    prev_run_ns: 40_000,
                }),
                r#"{"event":"episode","kind":7,"cpu":1,"tid":501,"tgid":0,"comm":"kworker/1:1","cgroup_id":0,"start_ns":1000,"run_ns":50000,"total_ns":3000,"slices":4000,"class":"idle","episode":{"wake_ns":1000,"wait_ns":50000,"irq_ns":3000,"softirq_ns":4000,"nmis":1,"prev_tid":77,"prev_comm":"kworker/1:1","prev_run_ns":40000}}"#,
                r#"episode          cpu=1 tid=501 tgid=0 comm="kworker/1:1" "#,
            ),
            (
                KernelEvent::Irq(Noise {
                    cpu: 1,
                    number: 24,
                    start_ns: 10,
                    run_ns: 2_000,
                }),
                r#"{"event":"irq","kind":8,"cpu":1,"tid":0,"tgid":0,"comm":"","cgroup_id":0,"start_ns":10,"run_ns":2000,"total_ns":0,"slices":0,"class":"idle","number":24}"#,
                r#"irq              cpu=1 tid=0 tgid=0 comm="" "#,
            ),
            (
                KernelEvent::Softirq(Noise {
                    cpu: 1,
                    number: 3,
                    start_ns: 10,
                    run_ns: 2_000,
                }),
                r#"{"event":"softirq","kind":9,"cpu":1,"tid":0,"tgid":0,"comm":"","cgroup_id":0,"start_ns":10,"run_ns":2000,"total_ns":0,"slices":0,"class":"idle","number":3}"#,
                r#"softirq          cpu=1 tid=0 tgid=0 comm="" "#,
            ),
        ]
    }

    #[test]
    fn json_lines_keep_their_keys_and_values() {
        for (ev, json, _) in cases() {
            assert_eq!(render(&ev, true), json, "JSON of {}", ev.name());
        }
    }

    #[test]
    fn text_lines_are_unchanged() {
        for (ev, _, text) in cases() {
            assert_eq!(render(&ev, false), text, "text of {}", ev.name());
        }
    }
}
