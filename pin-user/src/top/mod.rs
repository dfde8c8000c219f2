//! `pinguard top`: a live view of the guarded CPUs. `model` is the pure
//! core (readings in, what the screen shows out), `render` draws it,
//! `source` reads the kernel's maps or a running daemon; the terminal and
//! the refresh loop are at the edge (`cmd/top.rs`).
pub mod model;
pub mod render;
pub mod source;
