//! Only for `cargo fuzz` (`pin-user/fuzz/`, built with `--cfg fuzzing`): the
//! fuzz targets link pinguard's parsers through this library. pinguard is a
//! binary (main.rs says why), so in every other build this crate is empty.
#![cfg(fuzzing)]
// Most of the tree is unused from here; the binary is where dead code is reported.
#![allow(dead_code, unused_imports)]

include!("modules.rs");
pub mod fuzzing;
