//! How the kernel side classifies a run slice on a guarded CPU
//! (`pin_common::class`), as one enum for userspace.
use std::fmt;

use pin_common::class;

/// The class of a thread's run slice on a guarded CPU. Its string form
/// (`as_str`, serde) is what the output has always printed: per-CPU class
/// totals, intruder lists, events.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ThreadClass {
    /// The idle task.
    Idle,
    /// The vCPU thread that owns the CPU.
    Vcpu,
    /// A per-CPU kernel thread bound to the CPU.
    Kernel,
    /// A user thread on the allowlist, or pinguard itself.
    Allowed,
    /// Any other user thread, including another guest's vCPU.
    IntruderUser,
    /// A kernel thread not bound to the CPU.
    IntruderKthread,
}

impl ThreadClass {
    /// Every class, in the order of the kernel's per-class arrays (`CpuStats`).
    pub const ALL: [Self; class::COUNT] = [
        Self::Idle,
        Self::Vcpu,
        Self::Kernel,
        Self::Allowed,
        Self::IntruderUser,
        Self::IntruderKthread,
    ];

    /// The class of a kernel value (`pin_common::class`), if it is one.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(raw).ok()?).copied()
    }

    /// The kernel value, also the index into `CpuStats::run_ns` and `slices`.
    pub const fn raw(self) -> u32 {
        match self {
            Self::Idle => class::IDLE,
            Self::Vcpu => class::VCPU,
            Self::Kernel => class::KERNEL,
            Self::Allowed => class::ALLOWED,
            Self::IntruderUser => class::INTRUDER_USER,
            Self::IntruderKthread => class::INTRUDER_KTHREAD,
        }
    }

    pub const fn index(self) -> usize {
        self.raw() as usize
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Vcpu => "vcpu",
            Self::Kernel => "kernel",
            Self::Allowed => "allowed",
            Self::IntruderUser => "intruder_user",
            Self::IntruderKthread => "intruder_kthread",
        }
    }
}

/// Serde for `Option<ThreadClass>` as reports write it: the class, or
/// "unknown" for a thread gone before it was looked at.
pub mod or_unknown {
    use serde::{Deserialize as _, Deserializer, Serializer};

    use super::ThreadClass;

    const UNKNOWN: &str = "unknown";

    pub fn serialize<S: Serializer>(c: &Option<ThreadClass>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.map_or(UNKNOWN, ThreadClass::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ThreadClass>, D::Error> {
        let s = String::deserialize(d)?;
        if s == UNKNOWN {
            return Ok(None);
        }
        ThreadClass::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .map(Some)
            .ok_or_else(|| {
                serde::de::Error::unknown_variant(
                    &s,
                    &[
                        "idle",
                        "vcpu",
                        "kernel",
                        "allowed",
                        "intruder_user",
                        "intruder_kthread",
                        UNKNOWN,
                    ],
                )
            })
    }
}

impl fmt::Display for ThreadClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_round_trip_in_kernel_order() {
        for (i, c) in ThreadClass::ALL.into_iter().enumerate() {
            assert_eq!(c.index(), i, "{c} is not at its kernel index");
            assert_eq!(ThreadClass::from_raw(c.raw()), Some(c));
        }
        assert_eq!(ThreadClass::from_raw(class::COUNT as u32), None);
    }

    #[test]
    fn strings_are_the_ones_printed_before() {
        let names: Vec<&str> = ThreadClass::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "idle",
                "vcpu",
                "kernel",
                "allowed",
                "intruder_user",
                "intruder_kthread"
            ]
        );
        for c in ThreadClass::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    #[test]
    fn reports_write_a_gone_thread_as_unknown_and_read_it_back() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Row {
            #[serde(with = "or_unknown")]
            class: Option<ThreadClass>,
        }
        for (class, text) in [
            (None, r#"{"class":"unknown"}"#),
            (
                Some(ThreadClass::IntruderKthread),
                r#"{"class":"intruder_kthread"}"#,
            ),
        ] {
            let row = Row { class };
            assert_eq!(serde_json::to_string(&row).unwrap(), text);
            assert_eq!(serde_json::from_str::<Row>(text).unwrap(), row);
        }
        let err = serde_json::from_str::<Row>(r#"{"class":"nope"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `nope`"), "{err}");
    }
}
