//! `pinguard run`: the continuous isolation daemon.
use std::{
    path::Path,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    bpf::probe::{EventReader, Probe, ProbeConfig, StatsGuard},
    cli::RunArgs,
    cmd::{move_self_to, runtime},
    config::{Config, Isolation, Overrides},
    control::CONTROL_SOCKET,
    daemon::{
        collector::{KernelCollector, VcpuTable},
        effects::{Live, SharedProbe},
        health::Health,
        http::{self, Endpoint},
        metrics::{Carried, Metrics},
        runlock::{RUN_LOCK, RunLock},
        socket::{self, Message},
        state::{self, Daemon},
        violation::Recent,
    },
    exit,
    host::{Host, topology::Topology},
    isolate::state::{DEFAULT_PATH as ISOLATION_STATE, Store},
};

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&Overrides::from(&args))?;
    let topo = Topology::read()?;
    let guard = topo.guard(config.guard.as_ref())?;
    let _lock = RunLock::acquire(Path::new(RUN_LOCK))?;
    move_self_to(&guard.housekeeping)?;
    // The signal handlers go in before anything is pinned: a SIGTERM during
    // start-up must detach like any other, not leave the pins of a daemon
    // killed by the default action. (A current-thread runtime starts no
    // thread, so it can come after move_self_to.)
    let rt = runtime()?;
    let entered = rt.enter();
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    drop(entered);
    let mut probe_config = ProbeConfig::new(guard.guarded.clone());
    probe_config.event_interval = config.event_interval;
    probe_config.lifecycle = true;
    probe_config.affinity = config.affinity_syscalls;
    let mut probe = Probe::load_pinned(&probe_config)?;
    // Until `Sensors` owns the probe, a failure must unpin by hand: the
    // next start would adopt programs nobody asked to keep.
    let events = match probe.take_events() {
        Ok(events) => events,
        Err(e) => {
            let _ = probe.unpin();
            return Err(e.into());
        }
    };
    // Kept for the daemon's lifetime: the kernel counts program run time
    // only while someone holds the statistics fd.
    let _stats = config
        .bpf_stats
        .then(|| {
            StatsGuard::enable()
                .map_err(|e| log::warn!("BPF run-time statistics unavailable: {e}"))
                .ok()
        })
        .flatten();
    let adopted = probe.adopted();
    let probe = SharedProbe::new(probe);
    let sensors = Sensors {
        probe: probe.clone(),
        keep: Arc::new(AtomicBool::new(config.keep_sensors_on_exit)),
    };
    let keep_sensors = sensors.keep.clone();

    let metrics = Arc::new(Metrics::new());
    // The kernel side carried on while no daemon ran: so do the daemon's own
    // counters, from what the previous one saved at its last tick.
    if adopted {
        match std::fs::read(COUNTERS_FILE)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<Carried>>(&b).ok())
        {
            Some(saved) => log::info!(
                "carried {} counters over from the previous daemon ({COUNTERS_FILE})",
                metrics.carry_over(&saved)
            ),
            None => log::info!("no counters of the previous daemon to carry over ({COUNTERS_FILE})"),
        }
    } else {
        let _ = std::fs::remove_file(COUNTERS_FILE);
    }
    let vcpus = VcpuTable::default();
    let undecodable = Arc::new(AtomicU64::new(0));
    metrics
        .registry
        .register(Box::new(KernelCollector::new(
            probe.clone(),
            vcpus.clone(),
            undecodable.clone(),
        )))
        .context("registering the kernel metrics collector")?;
    let recent = Recent::default();
    let health = Health::new(config.verify_interval);
    let endpoint = Endpoint {
        metrics: metrics.clone(),
        recent: recent.clone(),
        probe: probe.clone(),
        health: health.clone(),
    };
    if !crate::host::has_capability(crate::host::CAP_SYS_PTRACE) {
        log::warn!(
            "no CAP_SYS_PTRACE: pinguard cannot read QEMU's /proc/PID/fd, so it recognises guests \
             by their thread names, which any program can take (grant CAP_SYS_PTRACE, as the \
             shipped systemd unit does, to check that a guest really holds KVM vCPUs)"
        );
    }
    if !config.listen.ip().is_loopback() {
        log::warn!(
            "the metrics endpoint listens on {}, not loopback: /violations and /intruders show \
             process names and ids to anyone who can reach it; keep it behind a firewall or a proxy",
            config.listen
        );
    }
    http::spawn(config.listen, endpoint)
        .with_context(|| format!("cannot listen on {} (--listen / listen =)", config.listen))?;

    rt.block_on(async move {
        let mut events = events.into_async().context("polling the event ring buffer")?;
        let (fx, mut discovered) = Live::new(probe, state::discover_options(&config))
            .context("starting the discovery thread")?;
        let counters_of = metrics.clone();
        let mut daemon = Daemon::new(config.clone(), topo, guard.clone(), fx, metrics, recent, vcpus);
        // Where `pinguard latency` registers its measuring threads.
        let (control_tx, mut control) = tokio::sync::mpsc::channel(64);
        let _socket = socket::spawn(Path::new(CONTROL_SOCKET), control_tx)
            .with_context(|| format!("listening on the control socket {CONTROL_SOCKET}"))?;
        if config.isolation == Isolation::Runtime {
            // Before the first scan: guests are placed on an isolated host.
            let store = Store::new(ISOLATION_STATE.into(), &Host::default().proc);
            daemon
                .start_isolation(store)
                .context("isolation = \"runtime\"")?;
        }
        daemon.rescan();
        log::info!(
            "pinguard {} running: guarding CPUs {} (housekeeping {}), mode {:?}, metrics on http://{}/metrics",
            env!("CARGO_PKG_VERSION"),
            guard.guarded,
            guard.housekeeping,
            config.mode,
            config.listen
        );

        let mut tick = tokio::time::interval(daemon.config.verify_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(daemon.config.rescan_interval);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await; // the first tick is immediate; we just scanned
        let mut isolation = tokio::time::interval(daemon.config.isolation_interval);
        isolation.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        isolation.tick().await; // immediate; the isolation was just applied
        let mut batch = Vec::new();
        // The loop ends on a signal or an error; either way the isolation
        // is undone afterwards when configured.
        let outcome: anyhow::Result<()> = async { loop {
            let retry_in = daemon.next_retry_in().unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                r = EventReader::next_batch(&mut events, |e| batch.push(e)) => {
                    r.context("reading events")?;
                    for e in batch.drain(..) {
                        match e {
                            Ok(ev) => daemon.handle(&ev),
                            Err(err) => {
                                undecodable.fetch_add(1, Ordering::Relaxed);
                                log::warn!("undecodable event: {err}");
                            }
                        }
                    }
                }
                Some(d) = discovered.recv() => daemon.discovered(d),
                Some(m) = control.recv() => match m {
                    Message::Request { conn, peer, request, reply } => {
                        let _ = reply.send(daemon.control(conn, peer, request));
                    }
                    Message::Closed { conn } => daemon.disconnected(conn),
                },
                _ = tick.tick() => {
                    daemon.tick();
                    save_counters(&counters_of);
                    health.ticked();
                    health.scanning(daemon.scanning_since());
                }
                _ = rescan.tick() => daemon.rescan(),
                _ = isolation.tick() => daemon.keep_isolation(),
                _ = tokio::time::sleep(retry_in) => daemon.tick(),
                _ = hup.recv() => reload(&mut daemon, &args),
                _ = term.recv() => break Ok(()),
                _ = int.recv() => break Ok(()),
            }
        } }.await;
        daemon.stop_isolation();
        // As reloaded last.
        keep_sensors.store(daemon.config.keep_sensors_on_exit, Ordering::Relaxed);
        // Kept with the pins for the next daemon, or gone with them.
        if daemon.config.keep_sensors_on_exit {
            save_counters(&counters_of);
        } else {
            let _ = std::fs::remove_file(COUNTERS_FILE);
        }
        outcome?;
        Ok(ExitCode::from(exit::OK))
    })
}

/// What a daemon that adopts this one's pins carries over (root-only, in the
/// run lock's directory).
const COUNTERS_FILE: &str = "/run/pinguard/counters.json";

/// Writes the carried counters, atomically (a crash mid-write leaves the
/// previous file). Best effort: a failure costs the carry-over, nothing else.
fn save_counters(metrics: &Metrics) {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = format!("{COUNTERS_FILE}.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(&metrics.carried()).unwrap_or_default())?;
        std::fs::rename(&tmp, COUNTERS_FILE)
    };
    if let Err(e) = write() {
        log::debug!("saving the counters to {COUNTERS_FILE}: {e}");
    }
}

/// Detaches the eBPF programs when the daemon exits (a signal, an error, a
/// panic), unless `keep_sensors_on_exit` says to leave them pinned for the
/// next start. A SIGKILL or crash runs nothing: the pins stay, which is the point.
struct Sensors {
    probe: SharedProbe,
    keep: Arc<AtomicBool>,
}

impl Drop for Sensors {
    fn drop(&mut self) {
        let mut probe = self.probe.lock();
        let Some(dir) = probe.pinned_dir().map(Path::to_owned) else {
            log::info!("pinguard stopping: detaching the eBPF programs");
            return;
        };
        if self.keep.load(Ordering::Relaxed) {
            log::info!(
                "pinguard stopping: the eBPF programs stay attached, pinned in {} \
                 (keep_sensors_on_exit = true); the next start adopts them, `pinguard cleanup` removes them",
                dir.display()
            );
            return;
        }
        match probe.unpin() {
            Ok(removed) => log::info!(
                "pinguard stopping: detaching the eBPF programs (removed {} pinned objects from {})",
                removed.len(),
                dir.display()
            ),
            Err(e) => log::error!(
                "pinguard stopping: could not remove the pins in {}: {e}; the programs stay \
                 attached, `pinguard cleanup` removes them",
                dir.display()
            ),
        }
    }
}

/// SIGHUP: re-read the configuration; a bad file keeps the running one.
fn reload<E: crate::daemon::effects::Effects>(daemon: &mut Daemon<E>, args: &RunArgs) {
    let result = Config::load(&Overrides::from(args))
        .map_err(|e| e.to_string())
        .and_then(|c| daemon.reload(c));
    match result {
        Ok(()) => {
            daemon
                .metrics()
                .config_reloads
                .with_label_values(&["success"])
                .inc();
            log::info!("configuration reloaded");
        }
        Err(e) => {
            daemon
                .metrics()
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            log::error!("configuration reload failed, keeping the running configuration: {e}");
        }
    }
}
