//! Just enough of a BTF reader to find field offsets in kernel structs.
//!
//! The eBPF programs read a few `task_struct` fields with `bpf_probe_read_kernel`.
//! Their offsets differ between kernel versions and configurations (and are
//! shuffled under RANDSTRUCT), so they are looked up here, in the running
//! kernel's BTF, at load time and passed to the programs as a global.
//! Format: https://docs.kernel.org/bpf/btf.html
use std::{collections::HashMap, path::Path};

use pin_common::TaskOffsets;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF at {path}: {source}; pinguard needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("struct {0} not found in kernel BTF")]
    NoStruct(String),
    #[error("field {field} not found in struct {strukt} in kernel BTF")]
    NoField { strukt: String, field: String },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    size_or_type: u32,
    members: Vec<Member>,
}

/// Parsed kernel BTF: types (index = type id) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs_by_name: HashMap<String, u32>,
}

fn u16_at(d: &[u8], o: usize) -> Option<u16> {
    d.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}
fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    d.get(o..o + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let bad = |what: &str| BtfError::Malformed(what.to_string());
        if u16_at(data, 0) != Some(MAGIC) {
            return Err(bad("bad magic (only little-endian BTF is supported)"));
        }
        let hdr_len = u32_at(data, 4).ok_or_else(|| bad("short header"))? as usize;
        let field = |o| {
            u32_at(data, o)
                .map(|v| v as usize)
                .ok_or_else(|| bad("short header"))
        };
        let (type_off, type_len, str_off, str_len) =
            (field(8)?, field(12)?, field(16)?, field(20)?);
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| bad("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| bad("string section out of bounds"))?
            .to_vec();
        // Type id 0 is "void".
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut o = 0;
        while o < types_data.len() {
            let rd = |off: usize| u32_at(types_data, off).ok_or_else(|| bad("truncated type"));
            let (name, info, size_or_type) = (rd(o)?, rd(o + 4)?, rd(o + 8)?);
            o += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = o + i * 12;
                        let raw = rd(m + 8)?;
                        // With kind_flag, the top 8 bits hold a bitfield size.
                        let bit_offset = if kind_flag { raw & 0x00ff_ffff } else { raw };
                        members.push(Member {
                            name: rd(m)?,
                            type_id: rd(m + 4)?,
                            bit_offset,
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12, // DATASEC, ENUM64
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                other => return Err(BtfError::Malformed(format!("unknown BTF kind {other}"))),
            };
            o += extra;
            types.push(Type {
                name,
                kind,
                size_or_type,
                members,
            });
        }
        let mut btf = Self {
            types,
            strings,
            structs_by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            // Skip forward declarations (size 0 structs have no members to search).
            if t.kind == KIND_STRUCT && t.name != 0 && !t.members.is_empty() {
                let name = btf.string(t.name).to_string();
                btf.structs_by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let start = off as usize;
        let rest = self.strings.get(start..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Byte offset of `field` in `struct strukt`, looking through anonymous
    /// struct/union members (RANDSTRUCT and `struct { ... };` groups).
    pub fn field_offset(&self, strukt: &str, field: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        self.find_member(id, field, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoField {
                strukt: strukt.into(),
                field: field.into(),
            })
    }

    fn find_member(&self, type_id: u32, field: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let t = self.types.get(type_id as usize)?;
        for m in &t.members {
            if m.name != 0 && self.string(m.name) == field {
                return Some(m.bit_offset);
            }
        }
        for m in t.members.iter().filter(|m| m.name == 0) {
            let inner = self.skip_modifiers(m.type_id);
            if let Some(off) = self.find_member(inner, field, depth + 1) {
                return Some(m.bit_offset + off);
            }
        }
        None
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the underlying type.
    fn skip_modifiers(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t) if matches!(t.kind, 8..=11 | 18) => id = t.size_or_type,
                _ => break,
            }
        }
        id
    }

    /// The `task_struct` offsets the eBPF programs need.
    pub fn task_offsets(&self) -> Result<TaskOffsets, BtfError> {
        let f = |name| self.field_offset("task_struct", name);
        // task_cpu(): `task_struct::cpu` with CONFIG_THREAD_INFO_IN_TASK (x86,
        // arm64 since 5.16), else `thread_info.cpu`.
        let cpu = match f("cpu") {
            Ok(off) => off,
            Err(_) => f("thread_info")? + self.field_offset("thread_info", "cpu")?,
        };
        // `sched_info` exists with CONFIG_SCHED_INFO (SCHEDSTATS or
        // TASK_DELAY_ACCT); without it vCPU waits are not measured (0).
        let sched_info = |field| {
            f("sched_info")
                .and_then(|base| Ok(base + self.field_offset("sched_info", field)?))
                .unwrap_or(0)
        };
        Ok(TaskOffsets {
            pid: f("pid")?,
            tgid: f("tgid")?,
            flags: f("flags")?,
            nr_cpus_allowed: f("nr_cpus_allowed")?,
            comm: f("comm")?,
            cpu,
            sum_exec_runtime: f("se")? + self.field_offset("sched_entity", "sum_exec_runtime")?,
            thread_pid: f("thread_pid")?,
            pid_level: self.field_offset("pid", "level")?,
            start_time: f("start_time")?,
            last_queued: sched_info("last_queued"),
            last_arrival: sched_info("last_arrival"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a little-endian BTF blob: struct outer { int a; union { int b; int c; }; }
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0".to_vec();
        let s = |name: &str| {
            strings
                .windows(name.len() + 1)
                .position(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
                .unwrap() as u32
        };
        let mut t = Vec::new();
        let mut push = |v: &[u32]| v.iter().for_each(|x| t.extend_from_slice(&x.to_le_bytes()));
        // 1: int
        push(&[s("int"), 1 << 24, 4, 32]);
        // 2: anonymous union { b at 0; c at 0 }
        push(&[0, (KIND_UNION << 24) | 2, 4, s("b"), 1, 0, s("c"), 1, 0]);
        // 3: struct outer { a at bit 0; <anon union> at bit 64 } (kind_flag set: bitfield encoding)
        push(&[
            s("outer"),
            (1 << 31) | (KIND_STRUCT << 24) | 2,
            12,
            s("a"),
            1,
            0,
            0,
            2,
            64,
        ]);
        let mut d = Vec::new();
        d.extend_from_slice(&MAGIC.to_le_bytes());
        d.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.extend_from_slice(&t);
        d.extend_from_slice(&strings);
        d
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.field_offset("outer", "a").unwrap(), 0);
        assert_eq!(btf.field_offset("outer", "c").unwrap(), 8);
        assert!(matches!(
            btf.field_offset("outer", "zz"),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.field_offset("nope", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, clearly").is_err());
        let mut d = sample();
        d.truncate(30);
        assert!(Btf::parse(&d).is_err());
    }

    #[test]
    fn running_kernel_task_struct() {
        let Ok(btf) = Btf::from_sys() else {
            eprintln!("no /sys/kernel/btf/vmlinux; skipping");
            return;
        };
        let o = btf.task_offsets().unwrap();
        // Sanity: distinct fields, comm well inside the struct, pid and tgid adjacent ints.
        assert_eq!(o.tgid, o.pid + 4, "{o:?}");
        assert!(
            o.comm > o.tgid && o.flags != o.pid && o.cpu != o.pid,
            "{o:?}"
        );
        // Both of struct sched_info's stamps, or neither (no CONFIG_SCHED_INFO).
        assert_eq!(o.last_queued == 0, o.last_arrival == 0, "{o:?}");
        assert!(
            o.last_queued == 0 || o.last_queued != o.last_arrival,
            "{o:?}"
        );
    }
}
