//! Getting changes to subscribers: the transaction callbacks that send them inline or queue them,
//! sending NOTIFYs, and, with pgwatch preloaded, the shared-memory queue, its database slots, the
//! launcher, the delivery workers and the utility hook (statements that need a database to
//! themselves, TRUNCATE of partitions, prepared transactions).

pub mod launcher;
pub mod notify;
pub mod prepared;
pub mod ring;
pub mod runs;
pub mod shmem;
pub mod slots;
pub mod targets;
pub mod utility;
pub mod worker;
pub mod xact;
