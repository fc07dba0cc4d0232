//! The hot path: the trigger every watch installs, the plan each trigger reads rows with (built
//! once per trigger and backend), and the reading of a statement's transition tables. No SPI, no
//! catalog lookups per row, and nothing that can fail a user's write.

pub mod mute;
pub mod plan;
pub mod transition;
pub mod trigger;
