//! Property tests of the parsers that read untrusted input: whatever the
//! bytes, they return an error, never panic, hang or recurse without bound.
//! Each finding becomes a plain unit test next to its parser.
//!
//! Two kinds: the committed fuzz corpus (`pin-user/fuzz/corpus/`, see
//! `fuzzing.rs`) replayed and mutated through every target, and generators
//! that build inputs from the parsers' grammar (config keys, JSON shapes).
//! CI runs the default number of cases; a longer run:
//! `cargo xtask fuzz --engine proptest` (`cargo xtask fuzz` runs libFuzzer).
use std::path::PathBuf;

use proptest::prelude::*;

use crate::{
    bpf::{btf::Btf, events},
    config::Config,
    fuzzing::Target,
    guests::{parse_cpus_fast, parse_libvirt_status},
    host::{cmdline::KernelCmdline, cpulist::CpuSet},
};

/// A valid libvirt status file, mutated below.
const STATUS: &str = "<domstatus state='running' pid='500'><vcpus><vcpu id='0' pid='510'/>\
    <vcpu id='1' pid='511'/></vcpus><domain type='kvm'><name>web</name></domain></domstatus>";

/// The config keys, with values mutated below.
const CONFIG_KEYS: &[&str] = &[
    "guard",
    "mode",
    "listen",
    "qmp",
    "event_interval",
    "verify_interval",
    "rescan_interval",
    "bpf_stats",
    "[placement]\nemulator",
    "[placement]\nsmt",
    "[placement]\nallow_shared",
    "[[vm]]\nname",
    "[[vm]]\ncpus",
    "[[allow]]\ncomm",
    "[[allow]]\ncpus",
    "[enforce]\nmin_interval",
    "[enforce]\nmax_backoff",
];

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u32>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("cpu-index".to_string()),
                        Just("thread-id".to_string()),
                        ".{0,6}"
                    ],
                    inner
                ),
                0..4
            )
            .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// `pin-user/fuzz/seeds/TARGET` (named inputs captured on a lab host) and
/// `pin-user/fuzz/corpus/TARGET` (what libFuzzer kept, minimized).
fn corpus_dirs(target: Target) -> [PathBuf; 2] {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    ["seeds", "corpus"].map(|d| fuzz.join(d).join(target.name()))
}

/// Every committed input, with its target.
fn corpus() -> Vec<(Target, PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for target in Target::ALL {
        let [seeds, grown] = corpus_dirs(target);
        let list = |dir: &PathBuf| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|d| d.map(|e| e.unwrap().path()).collect())
                .unwrap_or_default()
        };
        let seed_files = list(&seeds);
        assert!(
            seed_files.len() >= 2,
            "{}: {} seeds, expected real inputs of this kind",
            seeds.display(),
            seed_files.len()
        );
        let mut files = seed_files;
        files.extend(list(&grown));
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            out.push((target, f, data));
        }
    }
    out
}

#[test]
fn the_committed_corpus_runs_clean_through_every_target() {
    for (target, path, data) in &corpus() {
        // A panic names the input: make it a unit test next to its parser.
        let run = std::panic::catch_unwind(|| target.run(data));
        assert!(
            run.is_ok(),
            "{} panicked on {}",
            target.name(),
            path.display()
        );
    }
}

/// One edit of a corpus input, as a mutation-based fuzzer would make.
#[derive(Debug, Clone)]
enum Edit {
    Flip {
        at: usize,
        bit: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// Repeats a slice: nesting, long lists, long numbers.
    Repeat {
        at: usize,
        len: usize,
        times: usize,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = any::<prop::sample::Index>().prop_map(|i| i.index(usize::MAX / 2));
    prop_oneof![
        (at.clone(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        (at.clone(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (at.clone(), 1usize..64).prop_map(|(at, len)| Edit::Delete { at, len }),
        at.clone().prop_map(|at| Edit::Truncate { at }),
        (at, 1usize..32, 2usize..64).prop_map(|(at, len, times)| Edit::Repeat { at, len, times }),
    ]
}

fn apply(data: &mut Vec<u8>, edit: &Edit) {
    let pos = |at: usize, n: usize| if n == 0 { 0 } else { at % (n + 1) };
    match edit {
        Edit::Flip { at, bit } => {
            if !data.is_empty() {
                let i = at % data.len();
                data[i] ^= 1 << bit;
            }
        }
        Edit::Insert { at, bytes } => {
            let i = pos(*at, data.len());
            data.splice(i..i, bytes.iter().copied());
        }
        Edit::Delete { at, len } => {
            let i = pos(*at, data.len());
            let end = (i + len).min(data.len());
            data.drain(i..end);
        }
        Edit::Truncate { at } => data.truncate(pos(*at, data.len())),
        Edit::Repeat { at, len, times } => {
            let i = pos(*at, data.len());
            let end = (i + len).min(data.len());
            let piece = data[i..end].to_vec();
            for _ in 0..*times {
                data.splice(end..end, piece.iter().copied());
            }
        }
    }
}

proptest! {
    /// The corpus, edited a few times, through its own target and another:
    /// a format fed to the wrong parser is part of what a hostile host does.
    #[test]
    fn mutated_corpus_inputs_never_panic(
        pick in any::<prop::sample::Index>(),
        other in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        thread_local!(static CORPUS: Vec<(Target, PathBuf, Vec<u8>)> = corpus());
        let (target, mut data) = CORPUS.with(|c| {
            let (t, _, d) = &c[pick.index(c.len())];
            (*t, d.clone())
        });
        for e in &edits {
            apply(&mut data, e);
        }
        target.run(&data);
        Target::ALL[other.index(Target::ALL.len())].run(&data);
    }

    #[test]
    fn cpu_lists_parse_or_fail_and_round_trip(s in "[0-9,\\- xa-f]{0,24}|.{0,24}") {
        if let Ok(set) = CpuSet::parse(&s) {
            prop_assert_eq!(CpuSet::parse(&set.to_string()).unwrap(), set);
        }
        let _ = CpuSet::parse_mask(&s);
    }

    #[test]
    fn qmp_replies_never_panic(v in json_value()) {
        let _ = parse_cpus_fast(&v);
    }

    #[test]
    fn libvirt_status_never_panics(
        at in 0usize..STATUS.len(),
        cut in 0usize..STATUS.len(),
        insert in ".{0,8}",
        junk in ".{0,64}",
    ) {
        let mut s = STATUS.to_string();
        let at = (0..=at).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s.insert_str(at, &insert);
        let cut = cut.min(s.len());
        let cut = (0..=cut).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        let _ = parse_libvirt_status(&s[..cut], "x");
        let _ = parse_libvirt_status(&s, "x");
        let _ = parse_libvirt_status(&junk, "x");
    }

    #[test]
    fn configs_are_accepted_or_refused_with_the_key(
        lines in prop::collection::vec((0usize..CONFIG_KEYS.len(), ".{0,12}"), 0..4),
    ) {
        let text: String = lines
            .iter()
            .map(|(k, v)| format!("{} = {v}\n", CONFIG_KEYS[*k]))
            .collect();
        let _ = Config::parse(&text, std::path::Path::new("fuzz.toml"));
        let quoted: String = lines
            .iter()
            .map(|(k, v)| format!("{} = {:?}\n", CONFIG_KEYS[*k], v))
            .collect();
        if let Err(e) = Config::parse(&quoted, std::path::Path::new("fuzz.toml")) {
            prop_assert!(e.to_string().contains("fuzz.toml"), "{}", e);
        }
    }

    #[test]
    fn ring_buffer_records_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = events::decode(&bytes);
    }

    #[test]
    fn btf_never_panics(tail in prop::collection::vec(any::<u8>(), 0..256)) {
        // Behind a valid magic, so the parser gets past its first check.
        let mut data = vec![0x9f, 0xeb, 1, 0];
        data.extend_from_slice(&tail);
        let _ = Btf::parse(&data);
        let _ = Btf::parse(&tail);
    }

    #[test]
    fn kernel_command_lines_never_panic(s in ".{0,64}") {
        let _ = KernelCmdline::parse(&s);
    }
}
