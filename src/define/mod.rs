//! The cold path: checking `watch_table`'s arguments, storing watches, making and remaking their
//! triggers, and following DDL on watched tables. It runs only when a watch is defined or a
//! watched table's definition changes: the only place pgwatch uses SPI (but for the check, once
//! per trigger and backend, that a capture trigger is a watch's), never per row.

pub mod follow;
pub mod owner;
pub mod store;
pub mod triggers;
pub mod validate;
pub mod watches;
pub mod when;
