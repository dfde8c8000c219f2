use std::process::ExitCode;

pub fn run(_args: crate::cli::CheckArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
