//! Settings (`pgwatch.*` GUCs).

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PostgresGucEnum;

use crate::capture::mute;

/// Row changes one transaction may track, over all its watches, before the rest are reported as
/// overflows. Only a superuser may change it.
pub static MAX_ROWS_PER_XACT: GucSetting<i32> = GucSetting::<i32>::new(100_000);

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

/// The longest a delivery worker lets a batch gather while signalling the listening backends
/// takes long (many of them), in ms (see `deliver::worker::gather_delay`).
pub static LISTENER_BATCH_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(50);

/// How long a worker waits for a transaction that queued its changes to finish committing before
/// it passes it over (see `deliver::ring`), in ms.
pub static STUCK_COMMIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// The most the replay log of one database may take, in MB (see `feed::prune`).
pub static LOG_MAX_SIZE_MB: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// Size of the shared-memory queue, in kB.
pub static QUEUE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);

pub fn register() {
    GucRegistry::define_int_guc(
        c"pgwatch.max_rows_per_xact",
        c"Rows one transaction may track, over all its watches, before the rest are sent as overflow notices.",
        c"Bounds the memory a large write uses: past the limit, subscribers get {\"overflow\":true} and refetch. Only a superuser may change it, since it bounds what any user's transaction may take.",
        &MAX_ROWS_PER_XACT,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: the hooks are guarded (an ERROR inside them is PostgreSQL's to handle).
    unsafe {
        GucRegistry::define_bool_guc_with_hooks(
            c"pgwatch.mute",
            c"Records no changes: the current session's (or, with SET LOCAL, transaction's) writes send nothing.",
            c"For bulk jobs and migrations; silences only tables whose owner's rights the current role has (others' changes are sent as usual), and only pgwatch, unlike session_replication_role. Only a session or transaction may turn it on, not a default of the server, a database or a role.",
            &MUTE,
            GucContext::Userset,
            GucFlags::default(),
            Some(mute::check),
            Some(mute::assign),
            None,
        );
    }
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
        c"After each batch the worker waits with the cube of the commit rate it saw, reaching this at 700 transactions per second per millisecond of it (the default 10 ms at 7000), at most this long (but see pgwatch.listener_batch_delay), next to nothing after a quiet spell; 0 disables waiting.",
        &BUSY_BATCH_DELAY_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pgwatch.listener_batch_delay",
        c"The longest a delivery worker lets changes gather when waking the listening backends takes long.",
        c"Under a steady stream the worker waits at least 8 times as long as its last sends took to signal the backends that listen (which grows with their number), up to this or pgwatch.busy_batch_delay, whichever is longer: many listeners then wake up for fewer, fuller notifications.",
        &LISTENER_BATCH_DELAY_MS,
        0,
        10_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pgwatch.stuck_commit_timeout",
        c"How long a delivery worker waits for a transaction that queued its changes to finish committing.",
        c"Past it the worker sends the changes queued after it, and the transaction's subscribers are told to refetch once it commits (pgwatch.stats().passed_over). Raise it where commits wait long on purpose (synchronous_commit = remote_apply, say).",
        &STUCK_COMMIT_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pgwatch.log_max_size",
        c"The most a database's replay log may take before payloads are pruned ahead of their retention.",
        c"Counted as payload bytes plus 100 bytes per payload. A channel pruned short of its retain is counted in pgwatch.channels.cut_short.",
        &LOG_MAX_SIZE_MB,
        1,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
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
