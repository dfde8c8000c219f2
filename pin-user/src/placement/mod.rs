//! Where guest threads belong and how they get there: the placement plan
//! (`plan`), the one place that applies it (`apply`), and the per-thread
//! rules for keeping it (`enforce`).
pub mod apply;
pub mod enforce;
pub mod plan;
