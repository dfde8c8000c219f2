//! `cargo xtask fuzz`: the parsers of untrusted input under libFuzzer
//! (pin-user/fuzz, through cargo-fuzz) or, with `--engine proptest`, their
//! property tests with many cases. `cargo xtask test` runs the short version:
//! the committed corpus replayed and mutated (pin-user/src/robustness.rs).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};

use crate::util;

const W: &str = "fuzz";

/// The libFuzzer targets (pin-user/fuzz/fuzz_targets), as pin-user's
/// `fuzzing::Target::name` spells them.
const TARGETS: &[&str] = &[
    "config",
    "cpu_list",
    "proc_stat",
    "proc_status",
    "qmp_reply",
    "libvirt_status",
    "qemu_cmdline",
    "kernel_cmdline",
    "event",
    "btf",
    "agent_reply",
    "guest_output",
];

const CARGO_FUZZ_VERSION: &str = "0.13.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// Coverage-guided, on nightly with sanitizers (cargo-fuzz is installed if missing).
    Libfuzzer,
    /// The property tests of pin-user/src/robustness.rs with --cases cases each.
    Proptest,
}

#[derive(Debug, Args)]
pub struct FuzzArgs {
    #[arg(long, value_enum, default_value_t = Engine::Libfuzzer)]
    engine: Engine,
    /// libFuzzer: seconds per target.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// libFuzzer: only these targets (default: all).
    #[arg(long = "target", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
    /// proptest: cases per property.
    #[arg(long, default_value_t = 50_000)]
    cases: u64,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    match args.engine {
        Engine::Proptest => proptest(args.cases),
        Engine::Libfuzzer => libfuzzer(args),
    }
}

fn proptest(cases: u64) -> Result<()> {
    let mut cmd = util::cargo();
    cmd.args(["test", "-p", "pin-user", "--", "robustness", "never_panic"])
        .env("AYA_BUILD_SKIP", "1")
        .env("PROPTEST_CASES", cases.to_string());
    util::run(W, &mut cmd)
}

fn libfuzzer(args: &FuzzArgs) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = util::root().join("pin-user/fuzz");
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let mut found = Vec::new();
    for target in targets {
        // New inputs go to corpus/ (minimized below); seeds/ is read only.
        let corpus = fuzz_dir.join("corpus").join(target);
        let seeds = fuzz_dir.join("seeds").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let before = count_files(&corpus);
        let artifacts = fuzz_dir.join("artifacts").join(target);
        let crashes_before = count_files(&artifacts);
        let mut cmd = Command::new("cargo");
        cmd.current_dir(util::root())
            .args(["+nightly", "fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", args.secs))
            // The eBPF object is not needed to fuzz parsers.
            .env("AYA_BUILD_SKIP", "1");
        let ok = util::run(W, &mut cmd).is_ok();
        let crashes = count_files(&artifacts);
        if !ok && crashes == crashes_before {
            bail!(
                "cargo fuzz failed for {target} without a crash input (a build error? see above)"
            );
        }
        if ok {
            // Keep only the inputs that add coverage, so the committed corpus
            // stays small enough to replay in every `cargo test`.
            let mut cmin = Command::new("cargo");
            cmin.current_dir(util::root())
                .args(["+nightly", "fuzz", "cmin", "--fuzz-dir"])
                .arg(&fuzz_dir)
                .arg(target)
                .arg(&corpus)
                .env("AYA_BUILD_SKIP", "1");
            util::run(W, &mut cmin)?;
        }
        let after = count_files(&corpus);
        eprintln!(
            "{W}: {target}: corpus {before} → {after} inputs{}",
            if after > before {
                " (commit the new ones: they reach code the others did not)"
            } else {
                ""
            }
        );
        if !ok || crashes > crashes_before {
            found.push(format!("{target} (inputs in {})", artifacts.display()));
        }
    }
    if !found.is_empty() {
        bail!(
            "libFuzzer found crashes in: {}. Make each a unit test next to its parser, fix it, and add the \
             input to the target's corpus",
            found.join(", ")
        );
    }
    Ok(())
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// cargo-fuzz on PATH (`cargo install` puts it in ~/.cargo/bin), installed
/// when missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let installed = util::cargo_bin_dir()
        .map(|d| d.join("cargo-fuzz"))
        .is_some_and(|p: PathBuf| p.is_file());
    if installed {
        return Ok(());
    }
    eprintln!(
        "{W}: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install; takes a minute or two)"
    );
    util::run(
        W,
        util::cargo().args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"]),
    )
    .context(
        "cargo install cargo-fuzz failed (offline? crates.io must be reachable); install it yourself: \
         cargo install cargo-fuzz",
    )
}
