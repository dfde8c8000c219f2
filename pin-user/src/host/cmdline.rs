//! The kernel command line, parsed the way the kernel parses it.

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
