//! Settings (`pgwatch.*` GUCs).

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::{pg_guard, pg_sys, PgSqlErrorCode, PostgresGucEnum};

/// Row changes one transaction may track, over all its watches, before the rest are reported as
/// overflows.
pub static MAX_ROWS_PER_XACT: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_MAX_ROWS_PER_XACT);

/// The default of `pgwatch.max_rows_per_xact`, which only a superuser may raise.
const DEFAULT_MAX_ROWS_PER_XACT: i32 = 100_000;

/// Silences this session's (or with SET LOCAL, this transaction's) changes, e.g. for bulk jobs.
pub static MUTE: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Who sends a transaction's notifications.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Delivery {
    /// The delivery worker when pgwatch is preloaded, else the writing transaction.
    #[name = c"auto"]
    Auto,
    /// The database's delivery worker, after commit (needs preloading; inline without it).
    #[name = c"worker"]
    Worker,
    /// The writing transaction itself, at pre-commit.
    #[name = c"inline"]
    Inline,
}

pub static DELIVERY: GucSetting<Delivery> = GucSetting::<Delivery>::new(Delivery::Auto);

/// The longest a worker lets its next batch gather (it waits in proportion to the commit rate), in ms.
pub static BUSY_BATCH_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(10);

/// Size of the shared-memory queue, in kB.
pub static QUEUE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);

pub fn register() {
    // SAFETY: the check hook is guarded against panics.
    unsafe {
        GucRegistry::define_int_guc_with_hooks(
            c"pgwatch.max_rows_per_xact",
            c"Rows one transaction may track, over all its watches, before the rest are sent as overflow notices.",
            c"Bounds the memory a large write uses: past the limit, subscribers get {\"overflow\":true} and refetch. Anyone may lower it; only a superuser may raise it above 100000.",
            &MAX_ROWS_PER_XACT,
            1,
            i32::MAX,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_max_rows_per_xact),
            None,
            None,
        );
    }
    GucRegistry::define_bool_guc(
        c"pgwatch.mute",
        c"Records no changes: the current session's (or, with SET LOCAL, transaction's) writes send nothing.",
        c"For bulk jobs and migrations; unlike session_replication_role it needs no special privilege and silences only pgwatch.",
        &MUTE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pgwatch.delivery",
        c"Who sends notifications: auto, worker or inline.",
        c"auto uses the delivery worker when pgwatch is in shared_preload_libraries, inline otherwise.",
        &DELIVERY,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgwatch.busy_batch_delay",
        c"The longest a delivery worker lets changes gather before its next batch.",
        c"After each batch the worker waits in proportion to the commit rate it saw (1 ms at 4000 transactions per second, 4 ms at 16000), at most this long, next to nothing after a quiet spell; 0 disables.",
        &BUSY_BATCH_DELAY_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

/// Settings fixed at server start; PostgreSQL accepts them only while preloading.
pub fn register_preloaded() {
    GucRegistry::define_int_guc(
        c"pgwatch.queue_size",
        c"Size of the shared-memory queue that holds committed changes for the delivery workers.",
        c"A transaction that does not fit is notified inline instead (counted as an inline fallback).",
        &QUEUE_SIZE_KB,
        64,
        1024 * 1024,
        GucContext::Postmaster,
        GucFlags::UNIT_KB,
    );
}

/// Refuses a `pgwatch.max_rows_per_xact` above the default unless a superuser sets it: the bound
/// keeps one user's transaction from taking a backend's memory. The server's configuration file
/// and command line may set any value.
#[pg_guard]
unsafe extern "C-unwind" fn check_max_rows_per_xact(
    value: *mut std::ffi::c_int,
    _extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes the proposed value; the user id is known for every source after
    // the configuration file's (settings of databases and roles, the client, SET).
    unsafe {
        if *value <= DEFAULT_MAX_ROWS_PER_XACT || source <= pg_sys::GucSource::PGC_S_GLOBAL || pg_sys::superuser() {
            return true;
        }
        pg_sys::GUC_check_errcode(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32);
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(
            c"only a superuser may raise pgwatch.max_rows_per_xact above its default of 100000".as_ptr(),
        );
        pg_sys::GUC_check_errhint_string =
            pg_sys::pstrdup(c"Split the work into smaller transactions, or ask a superuser to raise it.".as_ptr());
    }
    false
}
