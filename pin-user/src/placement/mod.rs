//! Where guest threads belong and how they get there: the placement plan
//! (`plan`), and the affinity changes that apply and enforce it (`enforce`).
pub mod enforce;
pub mod plan;
