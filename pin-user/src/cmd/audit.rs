use std::process::ExitCode;

pub fn run(_args: crate::cli::AuditArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
