//! `pinguard run`: the continuous isolation daemon.
use std::{
    collections::VecDeque,
    process::ExitCode,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    bpf::probe::{EventReader, Probe, ProbeConfig},
    cli::RunArgs,
    cmd::{move_self_to, runtime},
    config::{Config, Overrides},
    daemon::metrics::{self, Metrics},
    daemon::{Daemon, RecentViolations},
    exit,
    host::topology::Topology,
};

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&Overrides::from(&args))?;
    let topo = Topology::read()?;
    let guard = topo.guard(config.guard.as_ref())?;
    move_self_to(&guard.housekeeping)?;
    runtime()?.block_on(async move {
        let listener = metrics::bind(config.listen)
            .with_context(|| format!("cannot listen on {} (--listen / listen =)", config.listen))?;
        let mut probe_config = ProbeConfig::new(guard.guarded.clone());
        probe_config.event_interval = config.event_interval;
        probe_config.lifecycle = true;
        let mut probe = Probe::load(&probe_config)?;
        let mut events = probe.take_events()?.into_async().context("polling the event ring buffer")?;

        let metrics = Arc::new(Metrics::new());
        let recent: RecentViolations = Arc::new(Mutex::new(VecDeque::new()));
        let healthy = Arc::new(AtomicBool::new(true));
        let intruders: Arc<Mutex<String>> = Arc::new(Mutex::new("[]\n".into()));
        let (recent_json, intruders_json) = (recent.clone(), intruders.clone());
        tokio::spawn(metrics::serve(
            listener,
            metrics.clone(),
            healthy.clone(),
            Arc::new(move |path: &str| match path {
                "/violations" => {
                    let list = recent_json.lock().unwrap_or_else(|e| e.into_inner());
                    Some(serde_json::to_string(&*list).unwrap_or_else(|_| "[]".into()) + "\n")
                }
                "/intruders" => Some(intruders_json.lock().unwrap_or_else(|e| e.into_inner()).clone()),
                _ => None,
            }),
        ));

        let mut daemon = Daemon::new(config.clone(), topo, guard.clone(), probe, metrics, recent, intruders);
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
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut batch = Vec::new();
        loop {
            let retry_in = daemon.next_retry_in().unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                r = EventReader::next_batch(&mut events, |e| batch.push(e)) => {
                    r.context("reading events")?;
                    let mut undecodable = 0;
                    for e in batch.drain(..) {
                        match e {
                            Ok(ev) => daemon.handle(&ev),
                            Err(err) => {
                                undecodable += 1;
                                log::warn!("undecodable event: {err}");
                            }
                        }
                    }
                    daemon.count_lost(undecodable);
                }
                _ = tick.tick() => daemon.tick(),
                _ = rescan.tick() => daemon.rescan(),
                _ = tokio::time::sleep(retry_in) => daemon.tick(),
                _ = hup.recv() => reload(&mut daemon, &args),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        log::info!("pinguard stopping: detaching the eBPF programs");
        drop(daemon);
        Ok(ExitCode::from(exit::OK))
    })
}

/// SIGHUP: re-read the configuration; a bad file keeps the running one.
fn reload(daemon: &mut Daemon, args: &RunArgs) {
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
