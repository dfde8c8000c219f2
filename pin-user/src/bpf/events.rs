//! The records the eBPF programs send through the `EVENTS` ring buffer,
//! decoded once into [`KernelEvent`]: one variant per kind, typed fields.
//! Consumers match it exhaustively, so a new kind is a compile error wherever
//! it needs a decision.
use aya::Pod;
use pin_common::event;
use thiserror::Error;

use crate::{
    bpf::{class::ThreadClass, probe::comm_str},
    host::cpulist::CpuSet,
};

/// A thread as an event names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thread {
    pub tid: u32,
    pub tgid: u32,
    pub comm: String,
}

/// A run slice of an intruder on a guarded CPU: the first one of this thread
/// on this CPU, or the first after the event interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intrusion {
    pub cpu: u32,
    pub thread: Thread,
    pub cgroup_id: u64,
    /// Start of the slice (CLOCK_MONOTONIC ns) and its length.
    pub start_ns: u64,
    pub run_ns: u64,
    /// The thread's run time and slices on this CPU so far.
    pub total_ns: u64,
    pub slices: u64,
    /// `IntruderUser` or `IntruderKthread`.
    pub class: ThreadClass,
}

/// A thread moved from one CPU to another: onto a guarded CPU
/// ([`KernelEvent::MigrateIn`]: `to_cpu` is guarded) or an owner away from
/// its CPU ([`KernelEvent::OwnerAway`]: `from_cpu` is its CPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub thread: Thread,
    pub from_cpu: u32,
    pub to_cpu: u32,
    pub at_ns: u64,
}

/// CPUs of a new affinity that an [`AffinityChange`] carries: the eBPF side
/// copies the first word of the user's mask (`pin_common::event::AffinityChange::mask`).
pub const AFFINITY_EVENT_CPUS: u32 = u64::BITS;

/// A successful sched_setaffinity call on an owner (vCPU) thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityChange {
    /// The owner's CPU.
    pub cpu: u32,
    /// Who called sched_setaffinity.
    pub caller: Thread,
    /// The owner thread.
    pub target_tid: u32,
    /// The new affinity's first [`AFFINITY_EVENT_CPUS`] CPUs (all of it on
    /// a host without CPU ids beyond).
    pub mask: CpuSet,
    pub at_ns: u64,
}

/// A QEMU/KVM exec, or the exit of a known guest or owner thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub thread: Thread,
    pub at_ns: u64,
}

/// A latency probe's wait from wake-up (or preemption) to running, and what
/// happened on its CPU meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Episode {
    pub cpu: u32,
    /// The probe thread.
    pub tid: u32,
    pub wake_ns: u64,
    pub wait_ns: u64,
    pub irq_ns: u64,
    pub softirq_ns: u64,
    pub nmis: u32,
    /// The thread that ran on the CPU right before the probe, and its last slice.
    pub prev_tid: u32,
    pub prev_comm: String,
    pub prev_run_ns: u64,
}

/// One hard IRQ handler's or softirq vector's run on a CPU where a latency probe waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noise {
    pub cpu: u32,
    /// The IRQ number, or the softirq vector.
    pub number: u32,
    pub start_ns: u64,
    pub run_ns: u64,
}

/// One ring-buffer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Intrusion(Intrusion),
    MigrateIn(Migration),
    OwnerAway(Migration),
    AffinityChange(AffinityChange),
    Exec(Process),
    Exit(Process),
    Episode(Episode),
    Irq(Noise),
    Softirq(Noise),
}

impl KernelEvent {
    /// The kind's name, as printed by `watch`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Intrusion(_) => "intrusion",
            Self::MigrateIn(_) => "migrate_in",
            Self::OwnerAway(_) => "owner_away",
            Self::AffinityChange(_) => "affinity_change",
            Self::Exec(_) => "exec",
            Self::Exit(_) => "exit",
            Self::Episode(_) => "episode",
            Self::Irq(_) => "irq",
            Self::Softirq(_) => "softirq",
        }
    }

    /// The kind's number in the record header (`pin_common::event`).
    pub const fn kind(&self) -> u32 {
        match self {
            Self::Intrusion(_) => event::INTRUSION,
            Self::MigrateIn(_) => event::MIGRATE_IN,
            Self::OwnerAway(_) => event::OWNER_AWAY,
            Self::AffinityChange(_) => event::AFFINITY_CHANGE,
            Self::Exec(_) => event::EXEC,
            Self::Exit(_) => event::EXIT,
            Self::Episode(_) => event::EPISODE,
            Self::Irq(_) => event::IRQ,
            Self::Softirq(_) => event::SOFTIRQ,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of unknown kind {0}")]
    UnknownKind(u32),
    #[error("{what} record of {got} bytes, expected {expected}")]
    TooShort {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("intrusion of unknown class {0}")]
    UnknownClass(u32),
}

/// Reads a `T` from the start of `bytes`, which may be unaligned.
fn read<T: Pod>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::TooShort {
            what,
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length is checked, T is plain old data (every bit pattern
    // is valid), and read_unaligned needs no alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn thread(tid: u32, tgid: u32, comm: &[u8; pin_common::TASK_COMM_LEN]) -> Thread {
    Thread {
        tid,
        tgid,
        comm: comm_str(comm),
    }
}

fn migration(bytes: &[u8], what: &'static str) -> Result<(event::Migration, Thread), DecodeError> {
    let r: event::Migration = read(bytes, what)?;
    Ok((r, thread(r.tid, r.tgid, &r.comm)))
}

fn process(bytes: &[u8], what: &'static str) -> Result<Process, DecodeError> {
    let r: event::Process = read(bytes, what)?;
    Ok(Process {
        thread: thread(r.tid, r.tgid, &r.comm),
        at_ns: r.at_ns,
    })
}

fn noise(bytes: &[u8], what: &'static str) -> Result<Noise, DecodeError> {
    let r: event::Noise = read(bytes, what)?;
    Ok(Noise {
        cpu: r.header.cpu,
        number: r.number,
        start_ns: r.start_ns,
        run_ns: r.run_ns,
    })
}

/// Decodes one ring-buffer record: its header says which record follows.
pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let header: event::Header = read(bytes, "event header")?;
    Ok(match header.kind {
        event::INTRUSION => {
            let r: event::Intrusion = read(bytes, "intrusion")?;
            KernelEvent::Intrusion(Intrusion {
                cpu: r.header.cpu,
                thread: thread(r.tid, r.tgid, &r.comm),
                cgroup_id: r.cgroup_id,
                start_ns: r.start_ns,
                run_ns: r.run_ns,
                total_ns: r.total_ns,
                slices: r.slices,
                class: ThreadClass::from_raw(r.class).ok_or(DecodeError::UnknownClass(r.class))?,
            })
        }
        event::MIGRATE_IN => {
            let (r, thread) = migration(bytes, "migrate_in")?;
            KernelEvent::MigrateIn(Migration {
                thread,
                from_cpu: r.other_cpu,
                to_cpu: r.header.cpu,
                at_ns: r.at_ns,
            })
        }
        event::OWNER_AWAY => {
            let (r, thread) = migration(bytes, "owner_away")?;
            KernelEvent::OwnerAway(Migration {
                thread,
                from_cpu: r.header.cpu,
                to_cpu: r.other_cpu,
                at_ns: r.at_ns,
            })
        }
        event::AFFINITY_CHANGE => {
            let r: event::AffinityChange = read(bytes, "affinity_change")?;
            KernelEvent::AffinityChange(AffinityChange {
                cpu: r.header.cpu,
                caller: thread(r.tid, r.tgid, &r.comm),
                target_tid: r.target_tid,
                mask: (0..AFFINITY_EVENT_CPUS)
                    .filter(|b| r.mask & (1 << b) != 0)
                    .collect(),
                at_ns: r.at_ns,
            })
        }
        event::EXEC => KernelEvent::Exec(process(bytes, "exec")?),
        event::EXIT => KernelEvent::Exit(process(bytes, "exit")?),
        event::EPISODE => {
            let r: event::Episode = read(bytes, "episode")?;
            KernelEvent::Episode(Episode {
                cpu: r.header.cpu,
                tid: r.tid,
                wake_ns: r.wake_ns,
                wait_ns: r.wait_ns,
                irq_ns: r.irq_ns,
                softirq_ns: r.softirq_ns,
                nmis: u32::try_from(r.nmis).unwrap_or(u32::MAX),
                prev_tid: r.prev_tid,
                prev_comm: comm_str(&r.prev_comm),
                prev_run_ns: r.prev_run_ns,
            })
        }
        event::IRQ => KernelEvent::Irq(noise(bytes, "irq")?),
        event::SOFTIRQ => KernelEvent::Softirq(noise(bytes, "softirq")?),
        kind => return Err(DecodeError::UnknownKind(kind)),
    })
}

#[cfg(test)]
mod tests {
    use pin_common::{TASK_COMM_LEN, class};

    use super::*;

    fn bytes<T: Pod>(r: &T) -> Vec<u8> {
        // SAFETY: T is repr(C) plain data with explicit padding.
        unsafe { std::slice::from_raw_parts((r as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    /// The record behind one byte, so it is not 8-byte aligned, as ring-buffer
    /// data need not be for a reader.
    fn decode_misaligned<T: Pod>(r: &T) -> Result<KernelEvent, DecodeError> {
        let mut raw = vec![0xAB];
        raw.extend(bytes(r));
        decode(&raw[1..])
    }

    fn comm(s: &str) -> [u8; TASK_COMM_LEN] {
        let mut c = [0; TASK_COMM_LEN];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    fn header(kind: u32, cpu: u32) -> event::Header {
        event::Header { kind, cpu }
    }

    fn thread(tid: u32, tgid: u32, comm: &str) -> Thread {
        Thread {
            tid,
            tgid,
            comm: comm.into(),
        }
    }

    fn intrusion(class: u32) -> event::Intrusion {
        event::Intrusion {
            header: header(event::INTRUSION, 1),
            tid: 4243,
            tgid: 4242,
            comm: comm("stress"),
            cgroup_id: 9,
            start_ns: 100,
            run_ns: 200_000,
            total_ns: 300_000,
            slices: 2,
            class,
            _pad: 0,
        }
    }

    #[test]
    fn decodes_an_intrusion() {
        assert_eq!(
            decode_misaligned(&intrusion(class::INTRUDER_USER)),
            Ok(KernelEvent::Intrusion(Intrusion {
                cpu: 1,
                thread: thread(4243, 4242, "stress"),
                cgroup_id: 9,
                start_ns: 100,
                run_ns: 200_000,
                total_ns: 300_000,
                slices: 2,
                class: ThreadClass::IntruderUser,
            }))
        );
        assert_eq!(
            decode(&bytes(&intrusion(42))),
            Err(DecodeError::UnknownClass(42))
        );
    }

    fn migration(kind: u32) -> event::Migration {
        event::Migration {
            header: header(kind, 2),
            tid: 700,
            tgid: 600,
            comm: comm("worker"),
            at_ns: 55,
            other_cpu: 0,
            _pad: 0,
        }
    }

    #[test]
    fn decodes_both_migrations_with_their_direction() {
        let moved = |from_cpu, to_cpu| Migration {
            thread: thread(700, 600, "worker"),
            from_cpu,
            to_cpu,
            at_ns: 55,
        };
        // Onto guarded CPU 2 from 0; an owner of CPU 2 leaving for 0.
        assert_eq!(
            decode_misaligned(&migration(event::MIGRATE_IN)),
            Ok(KernelEvent::MigrateIn(moved(0, 2)))
        );
        assert_eq!(
            decode_misaligned(&migration(event::OWNER_AWAY)),
            Ok(KernelEvent::OwnerAway(moved(2, 0)))
        );
    }

    #[test]
    fn decodes_an_affinity_change() {
        let r = event::AffinityChange {
            header: header(event::AFFINITY_CHANGE, 3),
            tid: 55,
            tgid: 54,
            comm: comm("taskset"),
            at_ns: 7,
            target_tid: 77,
            _pad: 0,
            mask: 0b101 | 1 << 63,
        };
        assert_eq!(
            decode_misaligned(&r),
            Ok(KernelEvent::AffinityChange(AffinityChange {
                cpu: 3,
                caller: thread(55, 54, "taskset"),
                target_tid: 77,
                mask: CpuSet::from_cpus([0, 2, 63]),
                at_ns: 7,
            }))
        );
    }

    #[test]
    fn decodes_exec_and_exit() {
        let r = |kind| event::Process {
            header: header(kind, 0),
            tid: 900,
            tgid: 900,
            comm: comm("qemu-system-x86"),
            at_ns: 1,
        };
        let p = Process {
            thread: thread(900, 900, "qemu-system-x86"),
            at_ns: 1,
        };
        assert_eq!(
            decode_misaligned(&r(event::EXEC)),
            Ok(KernelEvent::Exec(p.clone()))
        );
        assert_eq!(decode_misaligned(&r(event::EXIT)), Ok(KernelEvent::Exit(p)));
    }

    #[test]
    fn decodes_an_episode() {
        let r = event::Episode {
            header: header(event::EPISODE, 1),
            tid: 501,
            prev_tid: 77,
            wake_ns: 1_000,
            wait_ns: 50_000,
            irq_ns: 3_000,
            softirq_ns: 4_000,
            nmis: 1 << 40,
            prev_run_ns: 40_000,
            prev_comm: comm("kworker/1:1"),
        };
        assert_eq!(
            decode_misaligned(&r),
            Ok(KernelEvent::Episode(Episode {
                cpu: 1,
                tid: 501,
                wake_ns: 1_000,
                wait_ns: 50_000,
                irq_ns: 3_000,
                softirq_ns: 4_000,
                // More NMIs than a u32 holds: saturated, not wrapped.
                nmis: u32::MAX,
                prev_tid: 77,
                prev_comm: "kworker/1:1".into(),
                prev_run_ns: 40_000,
            }))
        );
    }

    #[test]
    fn decodes_irqs_and_softirqs() {
        let r = |kind| event::Noise {
            header: header(kind, 1),
            number: 24,
            _pad: 0,
            start_ns: 10,
            run_ns: 2_000,
        };
        let n = Noise {
            cpu: 1,
            number: 24,
            start_ns: 10,
            run_ns: 2_000,
        };
        assert_eq!(decode_misaligned(&r(event::IRQ)), Ok(KernelEvent::Irq(n)));
        assert_eq!(
            decode_misaligned(&r(event::SOFTIRQ)),
            Ok(KernelEvent::Softirq(n))
        );
    }

    #[test]
    fn a_record_shorter_than_its_kind_is_an_error() {
        assert_eq!(
            decode(&[0; 5]),
            Err(DecodeError::TooShort {
                what: "event header",
                got: 5,
                expected: 8
            })
        );
        // A valid header, but only a migration's bytes for an intrusion.
        let mut short = bytes(&migration(event::MIGRATE_IN));
        short[..4].copy_from_slice(&event::INTRUSION.to_ne_bytes());
        assert_eq!(
            decode(&short),
            Err(DecodeError::TooShort {
                what: "intrusion",
                got: size_of::<event::Migration>(),
                expected: size_of::<event::Intrusion>()
            })
        );
        let noise = bytes(&event::Noise {
            header: header(event::IRQ, 1),
            number: 1,
            _pad: 0,
            start_ns: 0,
            run_ns: 0,
        });
        assert!(matches!(
            decode(&noise[..noise.len() - 1]),
            Err(DecodeError::TooShort { what: "irq", .. })
        ));
    }

    #[test]
    fn an_unknown_kind_is_an_error() {
        for kind in [0, 10, u32::MAX] {
            let r = bytes(&migration(kind));
            assert_eq!(decode(&r), Err(DecodeError::UnknownKind(kind)));
        }
    }

    #[test]
    fn full_comm_has_no_nul() {
        let mut r = migration(event::MIGRATE_IN);
        r.comm = *b"0123456789abcdef";
        let Ok(KernelEvent::MigrateIn(m)) = decode(&bytes(&r)) else {
            panic!("a migration with a 16-byte name did not decode");
        };
        assert_eq!(m.thread.comm, "0123456789abcdef");
    }

    /// One record of every kind, as the eBPF side writes them: the seeds of
    /// the `event` fuzz target. When the layout changes, rewrite them with
    /// `PINGUARD_WRITE_CORPUS=1 cargo test -p pin-user fuzz_corpus`.
    #[test]
    fn the_fuzz_corpus_holds_a_record_of_every_kind() {
        let process = |kind| event::Process {
            header: header(kind, 0),
            tid: 900,
            tgid: 900,
            comm: comm("qemu-system-x86"),
            at_ns: 1,
        };
        let noise = |kind| event::Noise {
            header: header(kind, 1),
            number: 24,
            _pad: 0,
            start_ns: 10,
            run_ns: 2_000,
        };
        let seeds: [(&str, Vec<u8>); 9] = [
            ("intrusion", bytes(&intrusion(class::INTRUDER_USER))),
            ("migrate_in", bytes(&migration(event::MIGRATE_IN))),
            ("owner_away", bytes(&migration(event::OWNER_AWAY))),
            (
                "affinity_change",
                bytes(&event::AffinityChange {
                    header: header(event::AFFINITY_CHANGE, 3),
                    tid: 55,
                    tgid: 54,
                    comm: comm("taskset"),
                    at_ns: 7,
                    target_tid: 77,
                    _pad: 0,
                    mask: 0b10,
                }),
            ),
            ("exec", bytes(&process(event::EXEC))),
            ("exit", bytes(&process(event::EXIT))),
            (
                "episode",
                bytes(&event::Episode {
                    header: header(event::EPISODE, 1),
                    tid: 501,
                    prev_tid: 77,
                    wake_ns: 1_000,
                    wait_ns: 50_000,
                    irq_ns: 3_000,
                    softirq_ns: 4_000,
                    nmis: 1,
                    prev_run_ns: 40_000,
                    prev_comm: comm("kworker/1:1"),
                }),
            ),
            ("irq", bytes(&noise(event::IRQ))),
            ("softirq", bytes(&noise(event::SOFTIRQ))),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/event");
        let write = std::env::var_os("PINGUARD_WRITE_CORPUS").is_some();
        for (name, record) in seeds {
            assert!(decode(&record).is_ok(), "{name}");
            let path = dir.join(format!("{name}.bin"));
            if write {
                std::fs::write(&path, &record).unwrap();
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == record,
                "{} is not the current layout of a {name} record: rewrite the seeds with \
                 PINGUARD_WRITE_CORPUS=1 cargo test -p pin-user fuzz_corpus",
                path.display()
            );
        }
    }
}
