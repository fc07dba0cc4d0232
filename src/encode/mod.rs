//! Turning captured rows into what is sent: row images, their rendering as payload JSON, packing
//! into NOTIFY payloads, folding changes to their net effect, and the queue's record format.
//! Pure Rust: nothing here calls PostgreSQL.

pub mod fold;
pub mod image;
pub mod packer;
pub mod record;
pub mod row;
