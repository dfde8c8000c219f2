//! irqbalance: whether the daemon that moves IRQs around keeps them off
//! the guarded CPUs (and leaves manual IRQ affinity alone).
use std::{collections::BTreeMap, fs};

use super::{Ctx, Item, Status, not_ok, pass, unreadable};
use crate::host::{cpulist::CpuSet, procfs::Proc, topology::Topology};

/// Shell-style `KEY=value` lines (irqbalance's /etc/default and /etc/sysconfig files).
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            out.insert(k.trim().to_string(), v.to_string());
        }
    }
    out
}

/// Which CPUs irqbalance keeps IRQs off, following its own precedence:
/// IRQBALANCE_BANNED_CPUS (hex), then IRQBALANCE_BANNED_CPULIST, else the
/// isolated and nohz_full CPUs.
fn irqbalance_banned(env: &BTreeMap<String, String>, topo: &Topology) -> (CpuSet, String) {
    if let Some(mask) = env.get("IRQBALANCE_BANNED_CPUS").filter(|v| !v.is_empty()) {
        return match CpuSet::parse_mask(mask) {
            Ok(set) => (
                set,
                format!(
                    "IRQBALANCE_BANNED_CPUS={mask} (deprecated: use IRQBALANCE_BANNED_CPULIST)"
                ),
            ),
            Err(e) => (
                CpuSet::new(),
                format!("unparsable IRQBALANCE_BANNED_CPUS: {e}"),
            ),
        };
    }
    if let Some(list) = env
        .get("IRQBALANCE_BANNED_CPULIST")
        .filter(|v| !v.is_empty())
    {
        return match CpuSet::parse(list) {
            Ok(set) => (set, format!("IRQBALANCE_BANNED_CPULIST={list}")),
            Err(e) => (
                CpuSet::new(),
                format!("unparsable IRQBALANCE_BANNED_CPULIST: {e}"),
            ),
        };
    }
    let auto = topo.isolated.union(&topo.nohz_full);
    let how = if auto.is_empty() {
        "no IRQBALANCE_BANNED_CPULIST and nothing isolated or nohz_full, so no CPU is banned"
            .to_string()
    } else {
        format!("no IRQBALANCE_BANNED_CPULIST: it bans the isolated and nohz_full CPUs {auto}")
    };
    (auto, how)
}

impl Ctx<'_> {
    pub(super) fn irqbalance(&self) -> Item {
        const ID: &str = "irqbalance";
        let g = self.guarded;
        let proc = Proc::new(&self.host.proc);
        let pids = match proc.pids() {
            Ok(p) => p,
            Err(e) => return unreadable(ID, &self.host.proc, &e),
        };
        let running: Vec<u32> = pids
            .into_iter()
            .filter(|pid| {
                proc.comm(*pid, *pid)
                    .ok()
                    .flatten()
                    .is_some_and(|c| c == "irqbalance")
            })
            .collect();
        let config = ["default/irqbalance", "sysconfig/irqbalance"]
            .iter()
            .map(|p| self.host.etc.join(p))
            .find(|p| p.exists());
        let config_name = config.as_ref().map_or_else(
            || {
                "/etc/default/irqbalance (Debian/Ubuntu) or /etc/sysconfig/irqbalance (RHEL)"
                    .to_string()
            },
            |p| {
                format!(
                    "/etc/{}",
                    p.strip_prefix(&self.host.etc).unwrap_or(p).display()
                )
            },
        );
        let config_env = config
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .map(|t| parse_env_file(&t));
        let fix = format!(
            "set IRQBALANCE_BANNED_CPULIST={g} in {config_name} and `systemctl restart irqbalance`, \
             or stop it: `systemctl disable --now irqbalance`"
        );
        if running.is_empty() {
            return pass(ID, "irqbalance is not running");
        }
        let mut worst = Status::Pass;
        let mut notes = Vec::new();
        for pid in &running {
            let (env, source) = match proc.environ(*pid) {
                Ok(Some(vars)) => (
                    vars.into_iter().collect::<BTreeMap<_, _>>(),
                    "its environment",
                ),
                Ok(None) => continue,
                Err(_) => match &config_env {
                    // Reading another user's environ needs root; the config is the next best thing.
                    Some(c) => (
                        c.clone(),
                        "the config file (cannot read its environment: run as root)",
                    ),
                    None => (
                        BTreeMap::new(),
                        "defaults (cannot read its environment: run as root)",
                    ),
                },
            };
            let (banned, how) = irqbalance_banned(&env, self.topo);
            let exposed = g.difference(&banned);
            let status = if exposed.is_empty() {
                Status::Pass
            } else {
                Status::Fail
            };
            worst = worst.max(status);
            let mut note = if exposed.is_empty() {
                format!(
                    "irqbalance (pid {pid}) keeps IRQs off guarded CPUs {g}: {how} (read from {source})"
                )
            } else {
                format!(
                    "irqbalance (pid {pid}) may move IRQs onto guarded CPUs {exposed} and undo manual IRQ affinity: {how} (read from {source})"
                )
            };
            let keys = ["IRQBALANCE_BANNED_CPUS", "IRQBALANCE_BANNED_CPULIST"];
            if let Some(cfg) = &config_env
                && source == "its environment"
                && keys.iter().any(|k| {
                    cfg.get(*k).filter(|v| !v.is_empty()) != env.get(*k).filter(|v| !v.is_empty())
                })
            {
                note.push_str(&format!(
                    " ({config_name} differs from what it started with: `systemctl restart irqbalance`)"
                ));
            }
            notes.push(note);
        }
        if notes.is_empty() {
            return pass(ID, "irqbalance is not running");
        }
        let message = notes.join("\n");
        match worst {
            Status::Pass => pass(ID, message),
            status => not_ok(ID, status, message, fix),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::{
        super::{check, fixtures::*},
        *,
    };
    use crate::host::Host;

    #[test]
    fn good_host_bans_the_guarded_cpus() {
        let report = check(&fixture("intel-2s16c2t"), None).unwrap();
        assert!(
            report
                .item("irqbalance")
                .unwrap()
                .message
                .contains("IRQBALANCE_BANNED_CPULIST=2-15,18-31,34-47,50-63")
        );
    }

    #[test]
    fn bad_host_bans_nothing() {
        let report = check(&fixture("small-2cpu"), Some(&set("1"))).unwrap();
        let irqb = report.item("irqbalance").unwrap();
        assert!(irqb.message.contains("pid 812"), "{}", irqb.message);
        assert!(
            irqb.message.contains("no CPU is banned"),
            "{}",
            irqb.message
        );
        assert!(
            irqb.fix
                .as_deref()
                .unwrap()
                .contains("IRQBALANCE_BANNED_CPULIST=1 in /etc/default/irqbalance"),
            "{:?}",
            irqb.fix
        );
    }

    #[test]
    fn irqbalance_bans_isolated_cpus_by_default_and_config_drift_is_noted() {
        let dir = copy_fixture("intel-2s16c2t");
        let root = dir.path();
        // Started without the variable: irqbalance bans isolated+nohz_full itself.
        fs::write(root.join("proc/1042/environ"), b"PATH=/usr/bin\0").unwrap();
        let report = check(&Host::under(root), None).unwrap();
        let item = report.item("irqbalance").unwrap();
        assert_eq!(item.status, Status::Pass, "{item:#?}");
        assert!(
            item.message
                .contains("bans the isolated and nohz_full CPUs"),
            "{}",
            item.message
        );
        assert!(
            item.message.contains("systemctl restart irqbalance"),
            "{}",
            item.message
        );

        // A stale hex mask that misses CPU 63 wins over the default.
        fs::write(
            root.join("proc/1042/environ"),
            b"IRQBALANCE_BANNED_CPUS=7ffcfffc,fffcfffc\0",
        )
        .unwrap();
        let report = check(&Host::under(root), None).unwrap();
        let item = report.item("irqbalance").unwrap();
        assert_eq!(item.status, Status::Fail, "{item:#?}");
        assert!(item.message.contains("guarded CPUs 63"), "{}", item.message);
        assert!(
            item.fix
                .as_deref()
                .unwrap()
                .contains("/etc/sysconfig/irqbalance")
        );

        // Not running at all.
        fs::write(root.join("proc/1042/task/1042/comm"), "bash\n").unwrap();
        let report = check(&Host::under(root), None).unwrap();
        assert_eq!(report.item("irqbalance").unwrap().status, Status::Pass);
        assert!(
            report
                .item("irqbalance")
                .unwrap()
                .message
                .contains("not running")
        );
    }

    #[test]
    fn env_files() {
        let m = parse_env_file(
            "# comment\n#IRQBALANCE_BANNED_CPULIST=9\nIRQBALANCE_BANNED_CPULIST=\"2-3\"\nexport IRQBALANCE_ARGS='--foo'\n",
        );
        assert_eq!(m["IRQBALANCE_BANNED_CPULIST"], "2-3");
        assert_eq!(m["IRQBALANCE_ARGS"], "--foo");
        assert_eq!(m.len(), 2);
    }
}
