//! What a QEMU process tells about itself: its command line (guest name,
//! QMP sockets) and its thread names (`CPU n/KVM`, `vhost-<pid>`).
use std::{collections::HashMap, path::PathBuf};

/// Whether a command line is QEMU's (by program name).
pub fn is_qemu_argv(argv: &[String]) -> bool {
    let Some(prog) = argv.first() else {
        return false;
    };
    let base = prog.rsplit('/').next().unwrap_or(prog);
    base.starts_with("qemu-system-") || base == "qemu-kvm" || base == "kvm"
}

/// `CPU 3/KVM` -> 3 (QEMU names vCPU threads so with `debug-threads=on`).
pub fn parse_vcpu_thread_name(comm: &str) -> Option<u32> {
    let rest = comm.strip_prefix("CPU ")?;
    let (index, accel) = rest.split_once('/')?;
    if accel.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    index.parse().ok()
}

/// The QEMU process a per-guest kernel thread works for, from its name:
/// `vhost-1234` (vhost worker, before vhost workers became user threads),
/// `kvm-pit/1234` (the in-kernel PIT's timer worker) and
/// `kvm-nx-lpage-recovery-1234` (before 6.13 made it a thread of QEMU).
/// The kernel shows a kernel thread's full name in /proc, not only the 15
/// characters of `comm`.
pub fn parse_guest_kthread_name(comm: &str) -> Option<u32> {
    let pid = ["vhost-", "kvm-pit/", "kvm-nx-lpage-recovery-"]
        .into_iter()
        .find_map(|prefix| comm.strip_prefix(prefix))?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// What pinguard reads from a QEMU command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuCmdline {
    /// `-name guest=X,...` or `-name X`.
    pub name: Option<String>,
    /// `debug-threads=on` in `-name` (vCPU threads are named `CPU n/KVM`).
    pub debug_threads: bool,
    /// Unix sockets of QMP monitors, as written (relative paths are
    /// relative to QEMU's working directory).
    pub qmp_sockets: Vec<PathBuf>,
    /// QMP monitors pinguard cannot use (TCP, stdio, abstract sockets).
    pub other_qmp: Vec<String>,
    /// Unix sockets of the guest agent: a `-chardev socket,path=P,id=X`
    /// behind a `-device virtserialport,chardev=X,name=org.qemu.guest_agent.0`.
    pub agent_sockets: Vec<PathBuf>,
    /// Agent ports pinguard cannot reach (a chardev that is no unix socket).
    pub other_agents: Vec<String>,
    /// The accelerator asked for (`-accel X`, `-machine accel=X`,
    /// `-enable-kvm`), first one only: QEMU falls back along a list.
    pub accel: Option<String>,
}

/// The virtio-serial port name qemu-guest-agent listens on.
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// Splits QEMU's `key=value,key=value` option syntax, where `,,` is a
/// literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// Key/value pairs of a QEMU option argument. A first element without `=`
/// is the value of the option's implied key; later bare flags are `on`,
/// or `off` with a `no` prefix (the legacy `server,nowait` style).
fn parse_opts(s: &str, implied: &str) -> Vec<(String, String)> {
    split_opts(s)
        .into_iter()
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 => (implied.to_string(), p),
            None => match p.strip_prefix("no") {
                Some(k) => (k.to_string(), "off".to_string()),
                None => (p, "on".to_string()),
            },
        })
        .collect()
}

fn opt<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn is_on(v: Option<&str>) -> bool {
    matches!(v, Some("on" | "yes" | "true" | "y"))
}

/// Reads the guest name and the QMP sockets from a QEMU command line.
pub fn parse_qemu_cmdline(argv: &[String]) -> QemuCmdline {
    let mut out = QemuCmdline::default();
    // chardev id -> socket path, and the chardevs of QMP (-mon mode=control) monitors
    let mut chardevs: HashMap<String, Option<PathBuf>> = HashMap::new();
    let mut qmp_mons: Vec<String> = Vec::new();
    let mut agent_ports: Vec<String> = Vec::new();
    let mut i = 1;
    while i < argv.len() {
        let arg = argv[i].as_str();
        // QEMU accepts --opt as well as -opt.
        let opt_name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'));
        let value = argv.get(i + 1).map(String::as_str);
        if opt_name == Some("enable-kvm") {
            out.accel.get_or_insert_with(|| "kvm".into());
            i += 1;
            continue;
        }
        let (Some(name), Some(value)) = (opt_name, value) else {
            i += 1;
            continue;
        };
        match name {
            "name" => {
                let opts = parse_opts(value, "guest");
                out.name = opt(&opts, "guest")
                    .filter(|n| !n.is_empty())
                    .map(str::to_string);
                out.debug_threads = is_on(opt(&opts, "debug-threads"));
            }
            "qmp" | "qmp-pretty" => match value.strip_prefix("unix:") {
                Some(rest) => {
                    let opts = parse_opts(rest, "path");
                    match opt(&opts, "path") {
                        Some(p) if !is_on(opt(&opts, "abstract")) && !p.is_empty() => {
                            out.qmp_sockets.push(PathBuf::from(p))
                        }
                        _ => out.other_qmp.push(value.to_string()),
                    }
                }
                None => out.other_qmp.push(value.to_string()),
            },
            "chardev" => {
                let opts = parse_opts(value, "backend");
                if let Some(id) = opt(&opts, "id") {
                    let path = (opt(&opts, "backend") == Some("socket")
                        && !is_on(opt(&opts, "abstract")))
                    .then(|| opt(&opts, "path"))
                    .flatten()
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from);
                    chardevs.insert(id.to_string(), path);
                }
            }
            "device" => {
                let opts = parse_opts(value, "driver");
                if opt(&opts, "driver") == Some("virtserialport")
                    && opt(&opts, "name") == Some(AGENT_PORT)
                    && let Some(chardev) = opt(&opts, "chardev")
                {
                    agent_ports.push(chardev.to_string());
                }
            }
            "accel" => {
                let opts = parse_opts(value, "accel");
                if out.accel.is_none() {
                    out.accel = opt(&opts, "accel").map(str::to_string);
                }
            }
            "machine" | "M" => {
                let opts = parse_opts(value, "type");
                if let Some(a) = opt(&opts, "accel") {
                    // "kvm:tcg": the first one QEMU could start with.
                    out.accel = a.split(':').next().map(str::to_string);
                }
            }
            "mon" => {
                let opts = parse_opts(value, "chardev");
                if opt(&opts, "mode") == Some("control")
                    && let Some(chardev) = opt(&opts, "chardev")
                {
                    qmp_mons.push(chardev.to_string());
                }
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    for id in agent_ports {
        match chardevs.get(&id) {
            Some(Some(path)) => out.agent_sockets.push(path.clone()),
            _ => out.other_agents.push(format!("chardev={id}")),
        }
    }
    for id in qmp_mons {
        match chardevs.get(&id) {
            Some(Some(path)) => out.qmp_sockets.push(path.clone()),
            _ => out.other_qmp.push(format!("chardev={id}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn recognises_qemu_and_thread_names() {
        assert!(is_qemu_argv(&args("/usr/bin/qemu-system-x86_64 -m 128")));
        assert!(is_qemu_argv(&args("/usr/libexec/qemu-kvm -name x")));
        assert!(is_qemu_argv(&args("qemu-system-aarch64")));
        assert!(!is_qemu_argv(&args("/usr/bin/qemu-img info x")));
        assert!(!is_qemu_argv(&args("bash -c qemu-system-x86_64")));
        assert!(!is_qemu_argv(&[]));

        assert_eq!(parse_vcpu_thread_name("CPU 0/KVM"), Some(0));
        assert_eq!(parse_vcpu_thread_name("CPU 127/KVM"), Some(127));
        assert_eq!(parse_vcpu_thread_name("CPU 3/TCG"), Some(3));
        for not in [
            "CPU /KVM",
            "CPU 1/",
            "CPU x/KVM",
            "cpu 1/KVM",
            "qemu-system-x86",
            "IO mon_iothread",
        ] {
            assert_eq!(parse_vcpu_thread_name(not), None, "{not}");
        }
        assert_eq!(parse_guest_kthread_name("vhost-4242"), Some(4242));
        assert_eq!(parse_guest_kthread_name("kvm-pit/4242"), Some(4242));
        assert_eq!(
            parse_guest_kthread_name("kvm-nx-lpage-recovery-4242"),
            Some(4242)
        );
        assert_eq!(parse_guest_kthread_name("vhost-"), None);
        assert_eq!(parse_guest_kthread_name("vhost-net"), None);
        assert_eq!(parse_guest_kthread_name("kvm-pit/"), None);
        assert_eq!(parse_guest_kthread_name("kworker/1:0"), None);
    }

    #[test]
    fn qemu_cmdline_forms() {
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 -accel kvm -name g1,debug-threads=on \
             -qmp unix:/tmp/a/qmp.sock,server=on,wait=off -daemonize",
        ));
        assert_eq!(c.name.as_deref(), Some("g1"));
        assert!(c.debug_threads);
        assert_eq!(c.qmp_sockets, vec![PathBuf::from("/tmp/a/qmp.sock")]);

        // Legacy flags, relative path, guest= key, --option spelling.
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 --name guest=web,process=qemu-web -qmp unix:qmp.sock,server,nowait",
        ));
        assert_eq!(c.name.as_deref(), Some("web"));
        assert!(!c.debug_threads);
        assert_eq!(c.qmp_sockets, vec![PathBuf::from("qmp.sock")]);

        // libvirt style: a chardev plus a control-mode monitor.
        let c = parse_qemu_cmdline(&args(
            "/usr/bin/qemu-system-x86_64 -name guest=db,debug-threads=on \
             -chardev socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-1-db/monitor.sock,server=on,wait=off \
             -mon chardev=charmonitor,id=monitor,mode=control \
             -chardev socket,id=hmp,path=/tmp/hmp.sock,server=on \
             -mon chardev=hmp,mode=readline",
        ));
        assert_eq!(c.name.as_deref(), Some("db"));
        assert_eq!(
            c.qmp_sockets,
            vec![PathBuf::from(
                "/var/lib/libvirt/qemu/domain-1-db/monitor.sock"
            )]
        );

        // Passed file descriptors, TCP and abstract sockets cannot be used.
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 -chardev socket,id=m,fd=23,server=on,wait=off \
             -mon chardev=m,mode=control -qmp tcp:localhost:4444,server=on \
             -qmp unix:/x,abstract=on -name plain",
        ));
        assert!(c.qmp_sockets.is_empty());
        assert_eq!(c.other_qmp.len(), 3, "{:?}", c.other_qmp);
        assert_eq!(c.name.as_deref(), Some("plain"));

        // Escaped commas in values, and no -name at all.
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 -qmp unix:/tmp/a,,b.sock,server=on",
        ));
        assert_eq!(c.qmp_sockets, vec![PathBuf::from("/tmp/a,b.sock")]);
        assert_eq!(c.name, None);
        // The guest agent's port and the accelerator.
        let c = parse_qemu_cmdline(&args(
            "qemu-system-x86_64 -accel tcg -m 256 -device virtio-serial \
             -chardev socket,path=/tmp/q/qga.sock,server=on,wait=off,id=qga0 \
             -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
             -chardev socket,id=other,path=/tmp/o.sock \
             -device virtserialport,chardev=other,name=com.example.0 \
             -chardev pty,id=pty0 -device virtserialport,chardev=pty0,name=org.qemu.guest_agent.0",
        ));
        assert_eq!(c.agent_sockets, vec![PathBuf::from("/tmp/q/qga.sock")]);
        assert_eq!(c.other_agents, vec!["chardev=pty0".to_string()]);
        assert_eq!(c.accel.as_deref(), Some("tcg"));
        let c = parse_qemu_cmdline(&args("qemu-system-x86_64 -machine q35,accel=kvm:tcg"));
        assert_eq!(c.accel.as_deref(), Some("kvm"));
        let c = parse_qemu_cmdline(&args("qemu-system-x86_64 -m 1G -enable-kvm"));
        assert_eq!(c.accel.as_deref(), Some("kvm"));
        assert!(c.agent_sockets.is_empty());
        // A trailing option without its value is ignored, not a panic.
        assert_eq!(
            parse_qemu_cmdline(&args("qemu-system-x86_64 -qmp")),
            QemuCmdline::default()
        );
    }
}
