//! `pinguard manpages DIR` (hidden; `cargo xtask package` runs it): one man
//! page per visible subcommand (`pinguard-run.1`, ...) and `pinguard.1`,
//! rendered from the clap definitions by clap_mangen, plus the sections clap
//! does not know about (exit status, files, see also).
use std::{fs, process::ExitCode};

use anyhow::Context as _;
use clap::CommandFactory as _;

use crate::{
    cli::{Cli, ManpagesArgs},
    exit,
};

pub fn run(args: ManpagesArgs) -> anyhow::Result<ExitCode> {
    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    for (name, page) in pages()? {
        let path = args.dir.join(&name);
        fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(ExitCode::from(exit::OK))
}

/// Every page as (file name, roff text), `pinguard.1` first.
pub fn pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut root = Cli::command().disable_help_subcommand(true);
    // Propagates global options (--log) and names subcommands "pinguard-run".
    root.build();
    let source = format!("pinguard {}", root.get_version().unwrap_or_default());
    let subs: Vec<clap::Command> = root
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let sub_names: Vec<String> = subs.iter().map(page_name).collect();

    let mut pages = Vec::new();
    let mut see_also: Vec<&str> = sub_names.iter().map(String::as_str).collect();
    pages.push(render(root.clone(), &source, ROOT_EXTRA, &see_also)?);
    see_also = vec!["pinguard"];
    for sub in subs {
        let extra = if sub.get_name() == "run" {
            RUN_EXTRA
        } else {
            ""
        };
        pages.push(render(sub, &source, extra, &see_also)?);
    }
    Ok(pages)
}

fn page_name(cmd: &clap::Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

fn render(
    cmd: clap::Command,
    source: &str,
    extra: &str,
    see_also: &[&str],
) -> anyhow::Result<(String, Vec<u8>)> {
    let name = page_name(&cmd);
    let man = clap_mangen::Man::new(cmd)
        .source(source.to_string())
        .manual("pinguard manual");
    let file = man.get_filename();
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("rendering the man page of {name}"))?;
    page.extend_from_slice(extra.as_bytes());
    page.extend_from_slice(b".SH \"SEE ALSO\"\n");
    let refs: Vec<String> = see_also
        .iter()
        .map(|n| format!("\\fB{}\\fR(1)", n.replace('-', "\\-")))
        .collect();
    page.extend_from_slice(refs.join(", ").as_bytes());
    page.push(b'\n');
    Ok((file, page))
}

/// What every subcommand shares (README: Usage).
const ROOT_EXTRA: &str = r#".SH "EXIT STATUS"
.TP
.B 0
Everything is as it should be.
.TP
.B 1
The command ran and found violations (audit) or failed checks (check).
.TP
.B 2
The command could not do its job (bad input, missing privileges); bad input is refused before anything is changed.
.SH FILES
.TP
.I /etc/pinguard/pinguard.toml
Configuration of \fBpinguard run\fR (every key commented).
.TP
.I /usr/share/pinguard/
Grafana dashboard and Prometheus alert and recording rules (Debian package).
.SH ENVIRONMENT
.TP
.B PINGUARD_LOG
Log filter, as \fB\-\-log\fR; \fBRUST_LOG\fR takes precedence.
"#;

const RUN_EXTRA: &str = r#".SH SIGNALS
.TP
.B SIGHUP
Reload the configuration; a bad file is refused and the running one kept.
.TP
.BR SIGTERM ", " SIGINT
Detach the eBPF programs and exit.
.SH FILES
.TP
.I /etc/pinguard/pinguard.toml
The configuration (\fB\-\-config\fR).
.TP
.I /run/pinguard/pinguard.lock
One daemon per host: a second one refuses to start and names the holder.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_visible_subcommand() {
        let pages = pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "pinguard.1");
        for want in [
            "pinguard-run.1",
            "pinguard-check.1",
            "pinguard-completions.1",
        ] {
            assert!(names.contains(&want), "no {want} in {names:?}");
        }
        for hidden in ["pinguard-attach.1", "pinguard-manpages.1"] {
            assert!(!names.contains(&hidden), "{hidden} is hidden: {names:?}");
        }
        let root = String::from_utf8(pages[0].1.clone()).unwrap();
        assert!(root.contains("\\fBpinguard\\-run\\fR(1)"), "{root}");
        let run = &pages.iter().find(|(n, _)| n == "pinguard-run.1").unwrap().1;
        let run = String::from_utf8(run.clone()).unwrap();
        for want in ["\\-\\-config", "\\-\\-log", "SIGHUP", "PINGUARD_LOG"] {
            assert!(run.contains(want), "pinguard-run.1 lacks {want:?}:\n{run}");
        }
    }
}
