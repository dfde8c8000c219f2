//! The kernel side as userspace sees it: loading and configuring the eBPF
//! programs (`probe`), the kernel's type information (`btf`) and the events
//! they send.
pub mod btf;
pub mod probe;
