//! pgwatch: table changes as compact, coalesced LISTEN/NOTIFY messages.
//!
//! Wiring only; each concern has its module.

use pgrx::prelude::*;

mod api;
mod args;
mod catalog;
mod coalesce;
mod events;
mod fxhash;
mod guc;
mod notify;
mod payload;
mod plan;
mod queue;
mod stats;
mod trigger;
mod unguarded;
mod when;
mod worker;
mod xact;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/bootstrap.sql", bootstrap);
pgrx::extension_sql_file!("../sql/ddl.sql", name = "ddl");
pgrx::extension_sql_file!("../sql/api.sql", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    xact::register_callbacks();
    plan::register_invalidation();
    // SAFETY: reading a flag the postmaster sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        guc::register_preloaded();
        queue::init();
        worker::register_launcher();
        worker::install_drop_database_hook();
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
