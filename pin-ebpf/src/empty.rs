//! Programs that do nothing: the benchmark attaches them to the same hooks to
//! measure the floor cost of each hook type on this kernel.
use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};

#[btf_tracepoint(function = "sched_switch")]
pub fn empty_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn empty_raw_tp(_ctx: RawTracePointContext) -> i32 {
    0
}

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn empty_tracepoint(_ctx: TracePointContext) -> i32 {
    0
}
