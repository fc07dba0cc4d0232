//! Errors pgwatch raises: each with a SQLSTATE, a message that names what it concerns, and a hint.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{function_name, PgSqlErrorCode};

/// Raises an ERROR with a SQLSTATE, a message and a hint.
pub fn fail(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    ErrorReport::new(code, message, function_name!()).set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}

/// Raises an ERROR for an SPI query of pgwatch's own that failed, naming what it read or wrote:
/// never the user's doing, so the hint asks for a report.
pub fn spi_failed(what: &str, e: pgrx::spi::SpiError) -> ! {
    fail(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("pgwatch: reading or writing {what} failed: {e}"),
        "this is a bug of pgwatch's: please report it with this message",
    )
}
