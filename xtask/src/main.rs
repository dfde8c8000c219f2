//! Project orchestration: `cargo xtask setup|build|test|run|bench|fuzz|soak|package|manifests`.
//!
//! Everything the project needs on a fresh Debian 12 machine with stable and
//! nightly Rust is installed by `setup`; every other subcommand runs it first,
//! so `cargo xtask test` works on a fresh clone. Progress goes to stderr so
//! that `cargo xtask run -- ... --json` keeps a clean stdout.
use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

mod bench;
mod build;
mod fuzz;
mod lab_guest;
mod manifests;
mod package;
mod run;
mod setup;
mod test;
mod util;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, test, run and benchmark pinguard"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing to build and test pinguard (nightly, rust-src,
    /// apt packages, bpf-linker, tracefs). Idempotent.
    Setup,
    /// setup, then `cargo build --release` (the binary embeds the eBPF object).
    Build,
    /// The latency lab's guest from Debian 12 packages: target/lab-guest/{gp,rt}/
    /// vmlinuz + initrd.img (qemu-guest-agent and cyclictest inside); cached.
    LabGuest,
    /// setup, build, unit tests, integration tests, Prometheus rule checks.
    Test,
    /// build, then run target/release/pinguard with ARGS (exit code passed through).
    Run {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Measure the eBPF observer's overhead per scenario and the daemon's re-pin latency and cost.
    Bench(bench::BenchArgs),
    /// Fuzz the parsers of untrusted input (pin-user/src/fuzzing.rs): libFuzzer
    /// on each target (new inputs join the committed corpus), or the property
    /// tests with many cases. `cargo xtask test` replays and mutates the corpus.
    Fuzz(fuzz::FuzzArgs),
    /// build, then the churn soak (guests and threads coming and going under
    /// an enforcing daemon; RSS, fds and series must stay flat) for SECS.
    /// `cargo xtask test` runs it for 15 s.
    Soak {
        #[arg(long, default_value_t = 600)]
        secs: u64,
    },
    /// build, then the Debian package target/debian/pinguard_VERSION_ARCH.deb
    /// (binary, systemd unit, configuration, dashboards, man pages, completions).
    Package {
        /// The package's Maintainer field.
        #[arg(long, value_name = "NAME <EMAIL>", default_value = package::DEFAULT_MAINTAINER)]
        maintainer: String,
    },
    /// Regenerate deploy/kubernetes/{configmap,prometheusrule}.yaml from
    /// packaging/pinguard.toml and dashboards/prometheus/pinguard.rules.yml.
    Manifests,
    /// The bench's one-vCPU KVM guest (started by `bench`, not by hand).
    #[command(name = "bench-vcpu-guest", hide = true)]
    BenchVcpuGuest(bench::vcpu_guest::GuestArgs),
}

/// The soak test of `tests/tests/soak.rs`, `secs` long, against a fresh build.
fn soak(secs: u64) -> anyhow::Result<()> {
    build::run()?;
    let bin = util::pinguard_bin()?;
    let mut cmd = util::cargo();
    cmd.args([
        "test",
        "-p",
        "integration-tests",
        "--test",
        "soak",
        "--",
        "--nocapture",
    ])
    .env("PINGUARD_BIN", &bin)
    .env("PINGUARD_SOAK_SECS", secs.to_string())
    .env("PINGUARD_REQUIRE_PRIVILEGED", "1");
    util::run("soak", &mut cmd)
}

fn main() -> ExitCode {
    // `bench --only scale` re-runs this binary as its thread holders.
    bench::scale::hold_threads_if_asked();
    util::put_cargo_bin_on_path();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Cmd::Build => build::run().map(|()| ExitCode::SUCCESS),
        Cmd::LabGuest => lab_guest::run().map(|()| ExitCode::SUCCESS),
        Cmd::Test => test::run(),
        Cmd::Run { args } => run::run(&args),
        Cmd::Bench(args) => bench::run(&args).map(|()| ExitCode::SUCCESS),
        Cmd::Fuzz(args) => fuzz::run(&args).map(|()| ExitCode::SUCCESS),
        Cmd::BenchVcpuGuest(args) => {
            bench::vcpu_guest::guest_main(&args).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Soak { secs } => soak(secs).map(|()| ExitCode::SUCCESS),
        Cmd::Package { maintainer } => package::run(&maintainer).map(|()| ExitCode::SUCCESS),
        Cmd::Manifests => manifests::run().map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
