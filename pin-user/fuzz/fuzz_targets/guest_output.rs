#![no_main]
// See pin-user/src/fuzzing.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pin_user::fuzzing::Target::GuestOutput.run(data));
