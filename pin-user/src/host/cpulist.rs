//! CPU lists in the kernel's format (`0-3,8,10-11`), as used by `isolcpus=`,
//! `/sys/devices/system/cpu/*`, `taskset -c` and `Cpus_allowed_list`.
use std::{collections::BTreeSet, fmt, str::FromStr};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuListError {
    #[error("invalid CPU list {input:?}: {reason} (expected a list like \"2,3\" or \"2-5,8\")")]
    Syntax { input: String, reason: String },
    #[error("CPU {cpu} is not online (online CPUs: {online})")]
    NotOnline { cpu: u32, online: CpuSet },
}

/// An ordered set of CPU ids.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CpuSet(BTreeSet<u32>);

/// CPU ids above this are rejected at parse time (the kernel's NR_CPUS limit is 8192).
const MAX_CPU_ID: u32 = 8191;

impl CpuSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a kernel CPU list. The empty string (as in an empty
    /// `/sys/devices/system/cpu/isolated`) is the empty set.
    pub fn parse(input: &str) -> Result<Self, CpuListError> {
        Ok(Self(expand(input)?.into_iter().collect()))
    }

    pub fn from_cpus(cpus: impl IntoIterator<Item = u32>) -> Self {
        Self(cpus.into_iter().collect())
    }

    pub fn single(cpu: u32) -> Self {
        Self::from_cpus([cpu])
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    pub fn insert(&mut self, cpu: u32) -> bool {
        self.0.insert(cpu)
    }

    pub fn remove(&mut self, cpu: u32) -> bool {
        self.0.remove(&cpu)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn first(&self) -> Option<u32> {
        self.0.first().copied()
    }

    pub fn last(&self) -> Option<u32> {
        self.0.last().copied()
    }

    pub fn union(&self, other: &CpuSet) -> CpuSet {
        Self(self.0.union(&other.0).copied().collect())
    }

    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        Self(self.0.intersection(&other.0).copied().collect())
    }

    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        Self(self.0.difference(&other.0).copied().collect())
    }

    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn intersects(&self, other: &CpuSet) -> bool {
        self.0.intersection(&other.0).next().is_some()
    }

    /// Checks that every CPU is in `online`, naming the first one that is not.
    pub fn check_within(&self, online: &CpuSet) -> Result<(), CpuListError> {
        match self.iter().find(|c| !online.contains(*c)) {
            Some(cpu) => Err(CpuListError::NotOnline {
                cpu,
                online: online.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The hexadecimal cpumask format the kernel accepts in `/proc/irq/*/smp_affinity`,
    /// `default_smp_affinity` and the workqueue `cpumask` (32-bit words, most significant first).
    pub fn to_mask(&self) -> String {
        let Some(last) = self.last() else {
            return "0".into();
        };
        let mut words = vec![0u32; last as usize / 32 + 1];
        for cpu in self.iter() {
            words[cpu as usize / 32] |= 1 << (cpu % 32);
        }
        let mut out = String::new();
        for (i, w) in words.iter().rev().enumerate() {
            if i == 0 {
                out.push_str(&format!("{w:x}"));
            } else {
                out.push_str(&format!(",{w:08x}"));
            }
        }
        out
    }

    /// Parses the hexadecimal mask format of `/proc/irq/N/smp_affinity` and
    /// `Cpus_allowed` ("ff,ffffffff": 32-bit words, most significant first).
    pub fn parse_mask(input: &str) -> Result<Self, CpuListError> {
        let err = |reason: String| CpuListError::Syntax {
            input: input.to_string(),
            reason,
        };
        let mut set = BTreeSet::new();
        let words: Vec<&str> = input.trim().split(',').collect();
        for (i, word) in words.iter().rev().enumerate() {
            let v =
                u32::from_str_radix(word, 16).map_err(|_| err(format!("bad hex word {word:?}")))?;
            for bit in 0..32 {
                if v & (1 << bit) != 0 {
                    set.insert(i as u32 * 32 + bit);
                }
            }
        }
        Ok(Self(set))
    }
}

/// The CPUs of a list in the order written, repeats kept.
fn expand(input: &str) -> Result<Vec<u32>, CpuListError> {
    let err = |reason: String| CpuListError::Syntax {
        input: input.to_string(),
        reason,
    };
    let mut out = Vec::new();
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Ok(out);
    }
    for part in trimmed.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(err("empty element".into()));
        }
        // Kernel syntax also allows a stride: "0-15:2" (every other CPU).
        let (range, stride) = match part.split_once(':') {
            Some((r, s)) => {
                let s: u32 = s.parse().map_err(|_| err(format!("bad stride {s:?}")))?;
                if s == 0 {
                    return Err(err("stride must be at least 1".into()));
                }
                (r, s)
            }
            None => (part, 1),
        };
        let (lo, hi) = match range.split_once('-') {
            Some((a, b)) => (parse_id(a, &err)?, parse_id(b, &err)?),
            None => {
                let c = parse_id(range, &err)?;
                (c, c)
            }
        };
        if lo > hi {
            return Err(err(format!("range {lo}-{hi} is reversed")));
        }
        out.extend((lo..=hi).step_by(stride as usize));
    }
    Ok(out)
}

/// CPUs in a given order, repeats kept: one CPU per vCPU in a `--vm`
/// map, where `1,1` puts two vCPUs on CPU 1 (with `--allow-shared`).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSeq(Vec<u32>);

impl CpuSeq {
    /// Parses a CPU list in the kernel's syntax, in order, repeats kept.
    pub fn parse(input: &str) -> Result<Self, CpuListError> {
        expand(input).map(Self)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The distinct CPUs.
    pub fn to_set(&self) -> CpuSet {
        CpuSet::from_cpus(self.iter())
    }

    /// The CPUs listed more than once.
    pub fn repeated(&self) -> CpuSet {
        let mut seen = BTreeSet::new();
        self.iter().filter(|c| !seen.insert(*c)).collect()
    }
}

impl From<Vec<u32>> for CpuSeq {
    fn from(v: Vec<u32>) -> Self {
        Self(v)
    }
}

impl fmt::Display for CpuSeq {
    /// As given: "1,1,2".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u32::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

impl fmt::Debug for CpuSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSeq({self})")
    }
}

impl serde::Serialize for CpuSeq {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CpuSeq {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn parse_id(s: &str, err: &impl Fn(String) -> CpuListError) -> Result<u32, CpuListError> {
    let s = s.trim();
    let v: u32 = s
        .parse()
        .map_err(|_| err(format!("{s:?} is not a CPU number")))?;
    if v > MAX_CPU_ID {
        return Err(err(format!(
            "CPU {v} is above the kernel limit {MAX_CPU_ID}"
        )));
    }
    Ok(v)
}

impl fmt::Display for CpuSet {
    /// Formats as the kernel does: ascending, consecutive runs as ranges.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.iter().peekable();
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end = iter.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

impl FromStr for CpuSet {
    type Err = CpuListError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl serde::Serialize for CpuSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for CpuSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

    #[test]
    fn hex_masks_round_trip() {
        for s in [
            "0",
            "1",
            "0-1",
            "2-15,18-31,34-47,50-63",
            "0,32",
            "5,40-41,70",
        ] {
            let cpus = set(s);
            assert_eq!(CpuSet::parse_mask(&cpus.to_mask()).unwrap(), cpus, "{s}");
        }
        assert_eq!(set("0-1").to_mask(), "3");
        assert_eq!(set("0,32").to_mask(), "1,00000001");
    }

    #[test]
    fn parses_kernel_lists() {
        assert_eq!(CpuSet::parse("").unwrap(), CpuSet::new());
        assert_eq!(CpuSet::parse("\n").unwrap(), CpuSet::new());
        assert_eq!(CpuSet::parse("2,3").unwrap(), CpuSet::from_cpus([2, 3]));
        assert_eq!(
            CpuSet::parse("0-3,8").unwrap(),
            CpuSet::from_cpus([0, 1, 2, 3, 8])
        );
        assert_eq!(
            CpuSet::parse(" 1 , 4-5 ").unwrap(),
            CpuSet::from_cpus([1, 4, 5])
        );
        assert_eq!(
            CpuSet::parse("0-7:2").unwrap(),
            CpuSet::from_cpus([0, 2, 4, 6])
        );
    }

    #[test]
    fn rejects_bad_lists_with_reason() {
        for bad in ["a", "1-", "3-1", "1,,2", "-1", "0-7:0", "99999"] {
            let e = CpuSet::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(bad),
                "error for {bad:?} should quote the input: {e}"
            );
        }
    }

    #[test]
    fn formats_as_ranges() {
        assert_eq!(
            CpuSet::from_cpus([0, 1, 2, 5, 7, 8]).to_string(),
            "0-2,5,7-8"
        );
        assert_eq!(CpuSet::from_cpus([4]).to_string(), "4");
        assert_eq!(CpuSet::new().to_string(), "");
        let s = "0-3,16-19,32";
        assert_eq!(CpuSet::parse(s).unwrap().to_string(), s);
    }

    #[test]
    fn parses_hex_masks() {
        assert_eq!(CpuSet::parse_mask("3").unwrap(), CpuSet::from_cpus([0, 1]));
        assert_eq!(
            CpuSet::parse_mask("00000001,00000004").unwrap(),
            CpuSet::from_cpus([2, 32])
        );
        assert!(CpuSet::parse_mask("xyz").is_err());
    }

    #[test]
    fn checks_online() {
        let online = CpuSet::parse("0-1").unwrap();
        let e = CpuSet::parse("7")
            .unwrap()
            .check_within(&online)
            .unwrap_err();
        assert_eq!(e.to_string(), "CPU 7 is not online (online CPUs: 0-1)");
        assert!(CpuSet::parse("1").unwrap().check_within(&online).is_ok());
    }
}
