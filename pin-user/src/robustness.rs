//! Property tests of the parsers that read untrusted input: whatever the
//! bytes, they return an error, never panic, hang or recurse without bound.
//! Each finding becomes a plain unit test next to its parser.
//!
//! CI runs the default number of cases; a longer run:
//! `PROPTEST_CASES=50000 cargo test -p pin-user robustness`
//! (`cargo xtask test` leaves the variable alone).
use proptest::prelude::*;

use crate::{
    bpf::{btf::Btf, events},
    config::Config,
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

proptest! {
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
