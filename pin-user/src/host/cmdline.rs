//! The kernel command line, parsed the way the kernel parses it, and how
//! this host makes a parameter permanent (its boot loader's configuration).
use std::path::Path;

/// Where this host keeps its kernel command line, so advice names the file
/// that exists rather than GRUB's on every host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootConfig {
    /// `/etc/default/grub` exists.
    Grub,
    /// `/etc/kernel/cmdline` (systemd-boot, kernel-install, UKIs).
    KernelInstall,
    /// Neither: say what to add and leave the where to the user.
    Unknown,
}

impl BootConfig {
    /// Looks for the boot loader's configuration under `etc` (normally `/etc`).
    pub fn detect(etc: &Path) -> Self {
        if etc.join("default/grub").is_file() {
            Self::Grub
        } else if etc.join("kernel/cmdline").is_file() {
            Self::KernelInstall
        } else {
            Self::Unknown
        }
    }

    /// Completes "add PARAM ..." with where and how, ending in a reboot.
    pub fn howto(self) -> &'static str {
        match self {
            Self::Grub => {
                "to GRUB_CMDLINE_LINUX in /etc/default/grub (replacing any old value), then \
                 `grub2-mkconfig -o /boot/grub2/grub.cfg` (Debian/Ubuntu: `update-grub`) and reboot"
            }
            Self::KernelInstall => {
                "to /etc/kernel/cmdline (replacing any old value), then regenerate the boot entries \
                 (`kernel-install add $(uname -r) /lib/modules/$(uname -r)/vmlinuz`) and reboot"
            }
            Self::Unknown => {
                "to the kernel command line in this host's boot loader configuration (neither \
                 /etc/default/grub nor /etc/kernel/cmdline exists here), then reboot"
            }
        }
    }
}

/// Whether the running kernel honours `nohz_full=`: only kernels built with
/// CONFIG_NO_HZ_FULL have `/sys/devices/system/cpu/nohz_full`; others ignore
/// the parameter silently.
pub fn nohz_full_supported(sys: &Path) -> bool {
    sys.join("devices/system/cpu/nohz_full").exists()
}

/// The kernel command line (`/proc/cmdline`), split the way the kernel does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<(String, Option<String>)>,
}

impl KernelCmdline {
    /// Splits at whitespace outside double quotes and stops at `--` (what
    /// follows goes to init). Names compare with `-` and `_` equal, as in the kernel.
    pub fn parse(text: &str) -> Self {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut in_word = false;
        for c in text.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    in_word = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                c => {
                    cur.push(c);
                    in_word = true;
                }
            }
        }
        if in_word {
            words.push(cur);
        }
        let mut params = Vec::new();
        for word in words {
            if word == "--" {
                break;
            }
            let (name, value) = match word.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (word, None),
            };
            params.push((name.replace('-', "_"), value));
        }
        Self { params }
    }

    /// The last occurrence of a parameter: `Some(None)` when given without a value.
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        let name = name.replace('-', "_");
        self.params
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parsing() {
        let c = KernelCmdline::parse(
            "BOOT_IMAGE=/vmlinuz ro \"dyndbg=file a.c +p\" isolcpus=1 rcu-nocbs=2 quiet isolcpus=3 -- isolcpus=9\n",
        );
        assert_eq!(
            c.get("isolcpus"),
            Some(Some("3")),
            "last one wins, not after --"
        );
        assert_eq!(c.get("rcu_nocbs"), Some(Some("2")), "- and _ are the same");
        assert_eq!(c.get("quiet"), Some(None));
        assert_eq!(c.get("dyndbg"), Some(Some("file a.c +p")));
        assert_eq!(c.get("nohz_full"), None);
    }
}
