//! The kernel side as userspace sees it: loading and configuring the eBPF
//! programs (`probe`), the kernel's type information (`btf`), the events
//! they send (`events`) and how they classify threads (`class`).
pub mod btf;
pub mod class;
pub mod events;
pub mod pinning;
pub mod probe;
