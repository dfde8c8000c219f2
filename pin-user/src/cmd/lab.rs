//! `pinguard lab`: the whole latency experiment in one command. cyclictest on
//! a guarded CPU of the host with a general-purpose (SCHED_OTHER) and a
//! real-time (SCHED_FIFO) thread, then the same inside a guest booted on the
//! general-purpose kernel and on the PREEMPT_RT kernel of the lab guest
//! (`cargo xtask lab-guest`); each run is an ordinary `pinguard latency`
//! (this binary, run again), its report kept as JSON, and at the end the
//! table and the overlaid histograms of `latency --compare`.
use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    cli::LabArgs,
    exit,
    latency::{SchedPolicy, compare, plot},
};

/// One run of the experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// File name stem of its report: "host-other", "guest-rt-fifo95".
    pub name: String,
    /// `None`: the host; else the lab guest's flavour ("gp", "rt").
    pub guest: Option<&'static str>,
    pub policy: SchedPolicy,
    pub priority: u32,
}

/// The experiment: host, then each guest flavour, each with the normal and
/// the real-time policy, in that order (the table's columns).
pub fn steps(guests: &[&'static str], rt_priority: u32) -> Vec<Step> {
    let policies = [(SchedPolicy::Other, 0), (SchedPolicy::Fifo, rt_priority)];
    let places: Vec<Option<&'static str>> = std::iter::once(None)
        .chain(guests.iter().map(|g| Some(*g)))
        .collect();
    let mut out = Vec::new();
    for guest in places {
        for (policy, priority) in policies {
            let place = match guest {
                None => "host".to_string(),
                Some(g) => format!("guest-{g}"),
            };
            out.push(Step {
                name: format!("{place}-{}", compare::policy_short(policy, priority)),
                guest,
                policy,
                priority,
            });
        }
    }
    out
}

/// The `pinguard latency` arguments of a host step.
pub fn latency_args(step: &Step, args: &LabArgs) -> Vec<String> {
    let mut a = vec![
        "latency".to_string(),
        "--guard".into(),
        args.guard.to_string(),
        "--cpu".into(),
        args.cpu().to_string(),
        "--duration".into(),
        format!("{}ms", args.duration.as_millis()),
        "--interval".into(),
        format!("{}us", args.interval.as_micros()),
        "--policy".into(),
        step.policy.cyclictest_name().into(),
        "--priority".into(),
        step.priority.to_string(),
        "--json".into(),
    ];
    if let Some(c) = &args.config {
        a.push("--config".into());
        a.push(c.display().to_string());
    }
    a
}

pub fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    let guests: Vec<&'static str> = if args.host_only {
        Vec::new()
    } else {
        check_images(&args.kernels)?;
        vec!["gp", "rt"]
    };
    plot::ensure_font()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    let me = std::env::current_exe().context("finding the pinguard binary")?;
    let steps = steps(&guests, args.priority);
    eprintln!(
        "pinguard lab: {} runs of {:?} on CPU {} (guarded {}), reports into {}",
        steps.len(),
        args.duration,
        args.cpu(),
        args.guard,
        args.out.display()
    );
    let mut files = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let path = args.out.join(format!("{}.json", step.name));
        eprintln!(
            "pinguard lab: [{}/{}] {} -> {}",
            i + 1,
            steps.len(),
            step.name,
            path.display()
        );
        match step.guest {
            None => run_latency(&me, &latency_args(step, &args), &path)?,
            Some(flavour) => guest::run_step(&me, step, flavour, &args, &path)?,
        }
        files.push(path);
    }
    write_comparison(&files, &args.out)?;
    Ok(ExitCode::from(exit::OK))
}

/// Runs `pinguard ARGS` with its report (stdout) into `out`; its progress
/// (stderr) goes to ours.
pub fn run_latency(me: &Path, args: &[String], out: &Path) -> anyhow::Result<()> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let status = Command::new(me)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("running {}", me.display()))?;
    if !status.success() {
        let _ = std::fs::remove_file(out);
        bail!(
            "`pinguard {}` failed ({status}); the runs before it are in {}",
            args.join(" "),
            out.parent().unwrap_or(Path::new(".")).display()
        );
    }
    Ok(())
}

/// The table (text and JSON) and the overlaid histograms, into `dir`.
pub fn write_comparison(files: &[PathBuf], dir: &Path) -> anyhow::Result<()> {
    let thresholds = compare::DEFAULT_THRESHOLDS_US;
    let mut runs = Vec::new();
    for f in files {
        runs.push(compare::load(f, thresholds)?);
    }
    compare::label_runs(&mut runs, &[])?;
    let mut table = compare::Comparison::new(runs, thresholds);
    let pictures = plot::write_overlay(&table.runs, Some(dir), Some(dir))?;
    table.pictures = pictures.iter().map(|p| p.display().to_string()).collect();
    let text = compare::render(&table, false);
    let write = |name: &str, body: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        File::create(&p)
            .and_then(|mut f| f.write_all(body.as_bytes()))
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    write("table.txt", &text)?;
    write("table.json", &serde_json::to_string_pretty(&table)?)?;
    print!("{text}");
    Ok(())
}

fn check_images(dir: &Path) -> anyhow::Result<()> {
    for flavour in ["gp", "rt"] {
        for file in ["vmlinuz", "initrd.img"] {
            let p = dir.join(flavour).join(file);
            if !p.is_file() {
                bail!(
                    "--kernels {}: no {} (build the lab guest with `cargo xtask lab-guest`, \
                     or measure the host only with --host-only)",
                    dir.display(),
                    p.display()
                );
            }
        }
    }
    Ok(())
}

/// The guest half: boots the lab guest and measures inside it.
mod guest {
    use super::*;

    pub fn run_step(
        _me: &Path,
        step: &Step,
        flavour: &str,
        _args: &LabArgs,
        _out: &Path,
    ) -> anyhow::Result<()> {
        bail!(
            "{}: measuring inside the {flavour} guest needs `pinguard latency --vm`, which this \
             build does not have; run with --host-only",
            step.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_experiment_is_host_then_each_kernel_each_policy() {
        let names: Vec<String> = steps(&["gp", "rt"], 95)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "host-other",
                "host-fifo95",
                "guest-gp-other",
                "guest-gp-fifo95",
                "guest-rt-other",
                "guest-rt-fifo95"
            ]
        );
        let host = steps(&[], 80);
        assert_eq!(host.len(), 2);
        assert_eq!((host[1].policy, host[1].priority), (SchedPolicy::Fifo, 80));
    }
}
