//! pgwatch: table changes as compact, coalesced LISTEN/NOTIFY messages.
//!
//! Wiring only. The source is laid out the way a change flows:
//! - `model`: what a watch is (events, definition, target, trigger argument); pure.
//! - `define`: the cold path: checking `watch_table`'s arguments, the catalog, making triggers,
//!   following DDL.
//! - `capture`: the hot path: the trigger, its plan, reading transition tables.
//! - `encode`: row images, payload JSON, folding, the queue's record format; pure.
//! - `deliver`: transaction callbacks, NOTIFY, the shared-memory queue, the workers.
//! - `feed`: retained watches' replay log: what the worker writes, pruning, `replay()`.
//! - `sql`: every function PostgreSQL calls; `guc`, `stats`, `error`: settings, counters, errors;
//!   `text`: text taken from PostgreSQL as Rust strings, checked.

use pgrx::prelude::*;

mod acl;
mod capture;
mod define;
mod deliver;
mod encode;
mod error;
mod feed;
mod fxhash;
mod guc;
mod model;
mod sql;
mod stats;
mod text;
mod unguarded;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/bootstrap.sql", bootstrap);
pgrx::extension_sql_file!("../sql/ddl.sql", name = "ddl");
pgrx::extension_sql_file!("../sql/feed.sql", name = "feed");
pgrx::extension_sql_file!("../sql/api.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    deliver::xact::register_callbacks();
    capture::plan::register_invalidation();
    // SAFETY: reading a flag the postmaster sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        guc::register_preloaded();
        deliver::shmem::init();
        deliver::launcher::register_launcher();
        deliver::utility::install_drop_database_hook();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[path = "../pg_test/api_tests.rs"]
mod api_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        crate::e2e::CONF.to_vec()
    }
}

#[cfg(test)]
#[path = "../pg_test/e2e.rs"]
mod e2e;
