//! Empty library target: pin-user lists pin-ebpf as a build-dependency so cargo
//! rebuilds it when this crate changes, and that needs a lib target. The
//! programs are in the `pin` binary (src/main.rs), built for bpfel-unknown-none.
#![no_std]
