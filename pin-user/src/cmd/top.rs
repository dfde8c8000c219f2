//! `pinguard top`: the terminal, the keys and the once-a-second refresh
//! around the pure view in `top/`.
use std::{
    collections::BTreeMap,
    io::{self, IsTerminal as _, Stdout},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    execute,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{Terminal, backend::CrosstermBackend};

use crate::{
    bpf::probe::{Probe, ProbeConfig},
    cli::TopArgs,
    cmd::{move_self_to, policy},
    exit,
    host::{cpulist::CpuSet, topology::Topology},
    placement::plan::{Plan, Role},
    top::{
        model::{Snapshot, SortKey, view},
        render::{Status, draw},
        source::{Local, Remote, Source},
    },
};

const REFRESH: Duration = Duration::from_secs(1);
/// How often the loop looks at the stop flag while it waits for keys.
const SIGNAL_CHECK: Duration = Duration::from_millis(200);

pub fn run(args: TopArgs) -> anyhow::Result<ExitCode> {
    if !io::stdout().is_terminal() {
        bail!(
            "pinguard top draws on a terminal and stdout is not one; for scripts use \
             `pinguard watch --json` or the daemon's /metrics, /intruders and /violations"
        );
    }
    let mut source: Box<dyn Source> = match &args.url {
        Some(url) => Box::new(Remote::new(url, args.guard.guard.clone())),
        None => Box::new(local(&args)?),
    };
    // The first reading before the screen changes: a wrong URL or a
    // missing privilege is a plain error message, not a blank screen.
    let first = source
        .snapshot()
        .with_context(|| format!("reading {}", source.describe()))?;
    if let Some(guarded) = source.daemon_guarded() {
        if let Some(asked) = &args.guard.guard {
            let unguarded: Vec<String> = asked
                .iter()
                .filter(|c| !guarded.contains(*c))
                .map(|c| c.to_string())
                .collect();
            if !unguarded.is_empty() {
                bail!(
                    "--guard {asked}: the daemon at {} does not guard CPU(s) {} (it guards {guarded})",
                    args.url.as_deref().unwrap_or_default(),
                    unguarded.join(",")
                );
            }
        }
        keep_off(&guarded)?;
    }
    install_stop_handlers()?;
    let mut screen = Screen::enter()?;
    let mut status = Status {
        source: source.describe(),
        error: None,
    };
    let mut prev: Option<Snapshot> = None;
    let mut cur = first;
    let mut sort = SortKey::default();
    let mut next = Instant::now() + REFRESH;
    loop {
        let v = view(prev.as_ref(), &cur, sort);
        screen
            .terminal
            .draw(|f| draw(f, &v, &status))
            .context("drawing")?;
        // Keys until the next refresh; a key that changes the view redraws at once.
        let mut redraw = false;
        while !redraw {
            if STOP.load(Ordering::Relaxed) {
                return Ok(ExitCode::from(exit::OK));
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            if !event::poll((next - now).min(SIGNAL_CHECK)).context("reading the terminal")? {
                continue;
            }
            match event::read().context("reading the terminal")? {
                Event::Key(k) if k.kind == KeyEventKind::Press => match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(ExitCode::from(exit::OK)),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(ExitCode::from(exit::OK));
                    }
                    KeyCode::Char('s') => {
                        sort = sort.next();
                        redraw = true;
                    }
                    _ => {}
                },
                Event::Resize(..) => redraw = true,
                _ => {}
            }
        }
        if redraw {
            continue;
        }
        next = Instant::now() + REFRESH;
        match source.snapshot() {
            Ok(s) => {
                prev = Some(std::mem::replace(&mut cur, s));
                status.error = None;
            }
            Err(e) => status.error = Some(e.to_string()),
        }
    }
}

/// The kernel's maps through a probe of our own, with the vCPUs of the
/// placement plan registered as owners (as `watch` does).
fn local(args: &TopArgs) -> anyhow::Result<Local> {
    let topo = Topology::read()?;
    let config = policy::load(&args.policy)?;
    let guard = policy::guard(&topo, &args.guard, &config)?;
    let plan = policy::plan_for_observers(&topo, &guard, &config);
    move_self_to(&guard.housekeeping)?;
    let mut probe_config = ProbeConfig::new(guard.guarded.clone());
    // Totals only: no affinity-change or migration events to read.
    probe_config.affinity = false;
    probe_config.migrations = false;
    let mut probe = Probe::load(&probe_config)?;
    policy::register(&mut probe, &plan, &guard.guarded)?;
    Ok(Local::new(probe, owners(&plan, &guard.guarded)))
}

/// Moves this process off the CPUs a daemon guards, as every pinguard
/// process keeps off them (the daemon would count it as an intruder). A
/// daemon on another host guards CPUs that mean nothing here: left alone.
fn keep_off(guarded: &CpuSet) -> anyhow::Result<()> {
    let topo = Topology::read()?;
    match topo.guard(Some(guarded)) {
        Ok(guard) if !guard.housekeeping.is_empty() => move_self_to(&guard.housekeeping),
        Ok(_) => Ok(()),
        Err(e) => {
            log::debug!("not moving off the daemon's guarded CPUs {guarded}: {e}");
            Ok(())
        }
    }
}

/// Guarded CPU -> the vCPUs the plan puts there ("vm/vcpuN", comma-separated when shared).
fn owners(plan: &Plan, guarded: &CpuSet) -> BTreeMap<u32, String> {
    let mut out: BTreeMap<u32, String> = BTreeMap::new();
    for e in plan.entries.iter().filter(|e| e.role == Role::Vcpu) {
        let on = e.to.intersection(guarded);
        if let (Some(cpu), 1, Some(i)) = (on.first(), on.len(), e.vcpu) {
            let name = format!("{}/vcpu{i}", e.vm);
            out.entry(cpu)
                .and_modify(|o| {
                    o.push(',');
                    o.push_str(&name);
                })
                .or_insert(name);
        }
    }
    out
}

/// SIGTERM, SIGHUP or SIGINT asked us to stop (the loop restores the
/// terminal on its way out; raw mode turns Ctrl-C into a key, not SIGINT).
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_stop_handlers() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        // Restart: a signal must not fail the terminal read in progress.
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

/// The terminal in raw mode on the alternate screen, restored when this is
/// dropped, on any return or panic (a panic hook restores it first, so the
/// panic message lands on the normal screen).
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

static RESTORED: AtomicBool = AtomicBool::new(false);

fn restore() {
    if RESTORED.swap(true, Ordering::SeqCst) {
        return;
    }
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
}

impl Screen {
    fn enter() -> anyhow::Result<Self> {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            default_hook(info);
        }));
        terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        // From here on, Drop restores whatever was changed.
        let mut out = io::stdout();
        let entered = execute!(out, EnterAlternateScreen, cursor::Hide);
        let terminal = Terminal::new(CrosstermBackend::new(out));
        let screen = match (entered, terminal) {
            (Ok(()), Ok(terminal)) => Self { terminal },
            (Err(e), _) | (_, Err(e)) => {
                restore();
                return Err(e).context("setting up the terminal");
            }
        };
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}
