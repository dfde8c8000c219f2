//! CPU lists as the kernel writes them ("0-3,8": sysfs, `Cpus_allowed_list`,
//! `smp_affinity_list`, pinguard's own output) and hex masks ("ff,00000001").
//! The tests do not link pinguard, so they read these with one parser of their own.
use std::collections::BTreeSet;

use nix::sched::CpuSet;

use crate::error::{Error, OrPanic as _, Result};

pub type Cpus = BTreeSet<usize>;

/// Parses a CPU list: comma-separated CPUs and inclusive ranges; empty (or
/// only whitespace) is no CPU.
pub fn parse_list(text: &str) -> Result<Cpus> {
    let bad = || Error::CpuList {
        text: text.to_string(),
    };
    let mut out = Cpus::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let lo: usize = lo.trim().parse().map_err(|_| bad())?;
        let hi: usize = hi.trim().parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
        out.extend(lo..=hi);
    }
    Ok(out)
}

/// Parses a hex cpumask, 32-bit words most significant first ("3", "ff,00000001").
pub fn parse_mask(text: &str) -> Result<Cpus> {
    let mut out = Cpus::new();
    for (i, word) in text.trim().split(',').rev().enumerate() {
        let v = u32::from_str_radix(word, 16).map_err(|_| Error::CpuList {
            text: text.to_string(),
        })?;
        out.extend((0..32).filter(|b| v & (1 << b) != 0).map(|b| i * 32 + b));
    }
    Ok(out)
}

/// The online CPUs as sysfs writes them, and parsed.
pub fn try_online() -> Result<(String, Cpus)> {
    const PATH: &str = "/sys/devices/system/cpu/online";
    let text =
        std::fs::read_to_string(PATH).map_err(|e| Error::io(format!("reading {PATH}"), e))?;
    let text = text.trim().to_string();
    let cpus = parse_list(&text)?;
    Ok((text, cpus))
}

/// [`try_online`], panicking on failure.
#[track_caller]
pub fn online() -> (String, Cpus) {
    try_online().or_panic()
}

pub fn to_set(cpus: &Cpus) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)
            .map_err(|e| Error::sys(format!("CPU {c} in a cpu_set_t"), e))?;
    }
    Ok(set)
}

pub fn of_set(set: &CpuSet) -> Cpus {
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_cpus_and_ranges() {
        let cpus = parse_list("0-2,5,7-8\n").unwrap();
        assert_eq!(cpus, [0, 1, 2, 5, 7, 8].into());
        assert_eq!(parse_list("").unwrap(), Cpus::new());
        assert_eq!(parse_list(" 3 ").unwrap(), [3].into());
        for bad in ["x", "1-", "3-1", "1,,a"] {
            assert!(parse_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn masks_are_words_most_significant_first() {
        assert_eq!(parse_mask("3").unwrap(), [0, 1].into());
        assert_eq!(
            parse_mask("ff,00000001").unwrap(),
            (32..40).chain([0]).collect()
        );
        assert!(parse_mask("zz").is_err());
    }

    #[test]
    fn cpu_sets_round_trip() {
        let cpus: Cpus = [1, 3].into();
        assert_eq!(of_set(&to_set(&cpus).unwrap()), cpus);
    }
}
