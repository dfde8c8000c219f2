//! `cargo xtask test`: setup, build, unit tests, the Debian package,
//! integration tests on the real kernel, Prometheus rule checks. Runs every
//! test step even after one fails (so one run shows all failures), then
//! prints a one-line summary.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{build, lab_guest, package, setup, util};

const W: &str = "test";
const REQUIRE_ENV: &str = "PINGUARD_REQUIRE_PRIVILEGED";

enum Outcome {
    Ok,
    Failed(String),
    Skipped(String),
}

struct Step {
    name: &'static str,
    took: Duration,
    outcome: Outcome,
}

pub fn run() -> Result<ExitCode> {
    let started = Instant::now();
    match std::env::var(REQUIRE_ENV) {
        Ok(v) => eprintln!("{W}: {REQUIRE_ENV}={v} (passed to the tests)"),
        Err(_) => eprintln!(
            "{W}: {REQUIRE_ENV} unset: tests that lack root/KVM/BPF skip instead of failing"
        ),
    }
    let mut steps = Vec::new();
    let prepared =
        step(&mut steps, "setup", setup::run) && step(&mut steps, "build", build::release_build);
    if prepared {
        step(&mut steps, "unit tests", unit_tests);
        // The package test (tests/tests/package.rs) installs this .deb.
        let mut deb = None;
        step(&mut steps, "package", || {
            deb = Some(package::build_deb(package::DEFAULT_MAINTAINER)?);
            Ok(())
        });
        // The lab guest's images (tests/tests/lab_guest.rs): ~26 s cold
        // (apt-get download of two kernels), ~6 s when cached.
        step(&mut steps, "lab guest", lab_guest::run);
        step(&mut steps, "integration tests", || {
            integration_tests(deb.as_deref())
        });
        dashboards(&mut steps);
    }

    let failed = steps
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Failed(_)))
        .count();
    let parts: Vec<String> = steps
        .iter()
        .map(|s| match &s.outcome {
            Outcome::Ok => format!("{} ok ({})", s.name, util::fmt_secs(s.took)),
            Outcome::Failed(_) => format!("{} FAILED ({})", s.name, util::fmt_secs(s.took)),
            Outcome::Skipped(why) => format!("{} skipped ({why})", s.name),
        })
        .collect();
    let verdict = if failed == 0 { "PASSED" } else { "FAILED" };
    for s in &steps {
        if let Outcome::Failed(err) = &s.outcome {
            eprintln!("{W}: {} failed: {err}", s.name);
        }
    }
    println!(
        "{W}: {verdict}: {}; total {}",
        parts.join(", "),
        util::fmt_secs(started.elapsed())
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs one step, records it, returns whether it passed.
fn step(steps: &mut Vec<Step>, name: &'static str, f: impl FnOnce() -> Result<()>) -> bool {
    eprintln!("{W}: === {name} ===");
    let t = Instant::now();
    let outcome = match f() {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Failed(format!("{e:#}")),
    };
    let ok = matches!(outcome, Outcome::Ok);
    steps.push(Step {
        name,
        took: t.elapsed(),
        outcome,
    });
    ok
}

fn unit_tests() -> Result<()> {
    util::run(
        W,
        util::cargo().args(["test", "--workspace", "--exclude", "integration-tests"]),
    )
}

fn integration_tests(deb: Option<&Path>) -> Result<()> {
    let bin = util::pinguard_bin()?;
    if !bin.is_file() {
        anyhow::bail!("{} is missing after the build", bin.display());
    }
    eprintln!("{W}: PINGUARD_BIN={}", bin.display());
    let mut cmd = util::cargo();
    cmd.args(["test", "-p", "integration-tests", "--", "--test-threads=1"])
        .env("PINGUARD_BIN", &bin);
    cmd.env("PINGUARD_KUBE_VALIDATE", setup::kube_validate_bin()?)
        .env("PINGUARD_NODE_TOOLS", setup::node_tools_dir()?);
    if let Some(deb) = deb {
        eprintln!("{W}: PINGUARD_DEB={}", deb.display());
        cmd.env("PINGUARD_DEB", deb);
    }
    util::run(W, &mut cmd)
}

/// Rule syntax and rule unit tests, when the dashboards exist.
fn dashboards(steps: &mut Vec<Step>) {
    let dir = util::root().join("dashboards/prometheus");
    let rules = files_ending(&dir, ".rules.yml");
    let tests = files_ending(&dir.join("tests"), ".yml");
    if rules.is_empty() {
        let why = format!("no {}/*.rules.yml yet", rel(&dir));
        eprintln!("{W}: === prometheus rules === skipped: {why}");
        steps.push(Step {
            name: "prometheus rules",
            took: Duration::ZERO,
            outcome: Outcome::Skipped(why),
        });
        return;
    }
    step(steps, "prometheus rules", || {
        util::run(
            W,
            Command::new("promtool")
                .args(["check", "rules"])
                .args(&rules)
                .current_dir(util::root()),
        )
    });
    if tests.is_empty() {
        let why = format!("no {}/tests/*.yml yet", rel(&dir));
        eprintln!("{W}: === prometheus rule tests === skipped: {why}");
        steps.push(Step {
            name: "prometheus rule tests",
            took: Duration::ZERO,
            outcome: Outcome::Skipped(why),
        });
        return;
    }
    step(steps, "prometheus rule tests", || {
        util::run(
            W,
            Command::new("promtool")
                .args(["test", "rules"])
                .args(&tests)
                .current_dir(util::root()),
        )
        .context("promtool test rules")
    });
}

/// Files in `dir` whose names end with `suffix`, sorted, relative to the root.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let root = util::root();
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(suffix))
        })
        .map(|p| p.strip_prefix(&root).map(Path::to_path_buf).unwrap_or(p))
        .collect();
    files.sort();
    files
}

fn rel(p: &Path) -> String {
    p.strip_prefix(util::root())
        .unwrap_or(p)
        .display()
        .to_string()
}
