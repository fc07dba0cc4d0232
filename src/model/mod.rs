//! What a watch is, apart from how PostgreSQL runs it: the events it reports, its definition and
//! where its notifications go, and the argument that carries it to its triggers.

pub mod events;
pub mod trigger_arg;
pub mod watch;
