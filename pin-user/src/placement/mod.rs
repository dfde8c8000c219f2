//! Where guest threads belong and how they get there: the placement plan
//! (`plan`), the one place that applies it (`apply`), how one thread is
//! moved (`place`: directly, or through libvirt for its domains), and the
//! per-thread rules for keeping it (`enforce`).
pub mod apply;
pub mod enforce;
pub mod libvirt;
pub mod place;
pub mod plan;
pub mod sched;
