//! What pinguard's integration tests need beyond the shared harness
//! (`testkit`): reading the PromQL of the shipped dashboard and rules.
pub mod promql;
