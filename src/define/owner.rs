//! What the cold path runs with: the extension owner's rights for pgwatch's own objects, a safe
//! `search_path`, the mark that pgwatch itself is doing the DDL its event triggers see, and SPI
//! helpers whose failures say what failed.

use std::cell::Cell;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::error;

thread_local! {
    /// pgwatch itself is changing triggers: its event triggers let it.
    static MANAGING: Cell<bool> = const { Cell::new(false) };
}

/// Whether pgwatch itself is running the current DDL (read by its event triggers).
pub fn managing() -> bool {
    MANAGING.get()
}

/// Marks pgwatch's own DDL until dropped (also when an ERROR unwinds).
pub struct Managing(bool);

impl Managing {
    pub fn start() -> Managing {
        Managing(MANAGING.replace(true))
    }
}

impl Drop for Managing {
    fn drop(&mut self) {
        MANAGING.set(self.0);
    }
}

/// Runs `f` as the extension's owner, so that callers need no rights on pgwatch's own objects.
/// The caller's own right to watch the table is checked before.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pgwatch'",
    )
    .ok()
    .flatten()
    .expect("pgwatch is installed");
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: the same switch PostgreSQL makes for SECURITY DEFINER functions; an ERROR in `f`
    // aborts the (sub)transaction, which restores the user.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let result = f();
    // SAFETY: restores what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}

/// Runs `f` with `search_path = pg_catalog, pg_temp`, as pgwatch's SQL functions declare it: the
/// event trigger function below cannot declare it, since it resolves the command's table names.
/// The caller's setting comes back afterwards (and with the transaction's abort on an ERROR).
pub fn with_safe_search_path<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a GUC nest level around one setting, popped below, as fmgr does for SET clauses.
    let level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        level
    };
    let result = f();
    // SAFETY: pops the nest level pushed above.
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    result
}

pub fn run(query: &str, args: &[DatumWithOid<'_>]) {
    Spi::run_with_args(query, args).unwrap_or_else(|e| error::spi_failed(query, e));
}

/// The first column of each row `query` returns (NULL as the type's default).
pub fn column<T: FromDatum + IntoDatum + Default>(query: &str, args: &[DatumWithOid<'_>]) -> Vec<T> {
    Spi::connect(|client| {
        client
            .select(query, None, args)?
            .map(|row| row.get::<T>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| error::spi_failed(query, e))
}

/// The first row's value of `query` (NULL as `None`), or `None` when it returns no row.
pub fn first<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid<'_>]) -> Option<T> {
    Spi::connect_mut(|client| {
        let rows = client.update(query, Some(1), args)?;
        rows.into_iter().next().map_or(Ok(None), |row| row.get::<T>(1))
    })
    .unwrap_or_else(|e| error::spi_failed(query, e))
}
