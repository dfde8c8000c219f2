//! `pinguard completions SHELL`: the shell completion script, generated from
//! the clap definitions so it never lags behind the options.
use std::{io::Write as _, process::ExitCode};

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::{
    cli::{Cli, CompletionsArgs},
    exit,
};

pub fn run(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let script = script(args.shell);
    std::io::stdout()
        .lock()
        .write_all(&script)
        .context("writing the completion script to stdout")?;
    Ok(ExitCode::from(exit::OK))
}

/// The completion script for `shell`.
pub fn script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut cmd = without_hidden_subcommands(Cli::command());
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "pinguard", &mut out);
    out
}

/// The top-level command with its visible subcommands only: clap_complete
/// 4.6 offers hidden subcommands (bash, fish) that `--help` does not list,
/// and clap cannot remove a subcommand, so the tree is rebuilt without them.
fn without_hidden_subcommands(cmd: clap::Command) -> clap::Command {
    let mut out = clap::Command::new("pinguard")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use clap_complete::Shell;

    use super::*;

    #[test]
    fn scripts_name_the_visible_subcommands_only() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(script(shell)).unwrap();
            for sub in ["check", "run", "audit", "latency", "completions"] {
                assert!(text.contains(sub), "{shell} script lacks {sub:?}");
            }
            for hidden in ["attach", "manpages"] {
                assert!(
                    !text.contains(&format!("{hidden} "))
                        && !text.contains(&format!("\"{hidden}\"")),
                    "{shell} script offers the hidden {hidden:?}"
                );
            }
        }
    }
}
