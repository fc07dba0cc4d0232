//! A database's delivery worker (with pgwatch preloaded).
//!
//! NOTIFY is per database, so each database that receives changes gets its own worker, started by
//! the launcher. The worker copies its database's published records, folds them across
//! transactions in commit order, sends them in its own transaction with `synchronous_commit` off,
//! and only after that commit marks them done. It exits after `DROP EXTENSION`, and when `DROP
//! DATABASE` asks it to (see `utility`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CString;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_guard;
use pgrx::prelude::*;

use super::notify;
use super::ring::{pass_after, Batch, Stuck};
use super::shmem::{self, Shared};
use super::slots::{in_buckets, DbSlot, WorkerState};
use super::targets::{self, Watches};
use crate::encode::fold::Folded;
use crate::encode::packer::{reset_payload, ResetReason};
use crate::encode::record::decode;
use crate::feed::log::{Feed, Logged, Plans};
use crate::feed::prune::Ring;
use crate::guc;
use crate::model::watch::{Rows, Target};
use crate::stats::{self, Counter};

/// Bytes of record bodies one worker transaction collects; the record that crosses it is included.
const BATCH_BYTES: usize = 1 << 20;

/// How often a worker checks that pgwatch is still installed when no DROP EXTENSION asked it to
/// (one committed by COMMIT PREPARED, or pgwatch dropped with its schema or owner).
const EXTENSION_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// How long a worker asked to stop goes on sending what is queued (a clean shutdown's last
/// changes reach the log, see `runs`): until the queue has been empty for `QUIET`, at most `LAST`.
const QUIET: Duration = Duration::from_millis(100);
const LAST: Duration = Duration::from_secs(2);

/// Settings every worker transaction runs with, whatever the database or its owner set (with
/// ALTER DATABASE ... SET, which a worker takes in as it connects): it runs as itself (with its
/// session authorization set back first), names resolve in pg_catalog only; nothing is
/// read-only, times out, waits on a replica's role, or runs under JIT or parallel query.
const SETTINGS: &[(&std::ffi::CStr, &std::ffi::CStr)] = &[
    (c"role", c"none"),
    (c"synchronous_commit", c"off"),
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"statement_timeout", c"0"),
    (c"lock_timeout", c"0"),
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    (c"transaction_timeout", c"0"),
    (c"session_replication_role", c"origin"),
    // The worker's kept statements (see `Plans`) are planned once, not again for every batch.
    (c"plan_cache_mode", c"force_generic_plan"),
    // Nothing compiles or starts helpers for its small statements: a database's owner could
    // otherwise slow its worker, and through the queue's shared tail every database's.
    (c"jit", c"off"),
    (c"max_parallel_workers_per_gather", c"0"),
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    (c"force_parallel_mode", c"off"),
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    (c"debug_parallel_query", c"off"),
];

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgwatch_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = arg.value() as u32;
    let shared = shmem::shared().expect("workers run only with pgwatch preloaded");
    let Some(slot) = shared.find_slot(dboid) else { return };
    // Connecting waits on the database's lock, which a statement that needs the database to
    // itself holds until its transaction ends (ALTER DATABASE ... RENAME left open, say): a
    // worker that cannot connect within this fails, and after a few such starts its database's
    // queued changes are dropped (see `launcher`), rather than holding the shared queue's tail
    // for every database. The server's own lock_timeout, shorter, must not fail it.
    // SAFETY: setting a GUC of this process's own session, before it connects.
    unsafe {
        pg_sys::SetConfigOption(
            c"lock_timeout".as_ptr(),
            c"5s".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
    // SAFETY: connecting this registered background worker to its database, once, as the
    // bootstrap superuser. It connects even to a database whose owner set ALLOW_CONNECTIONS
    // false: sessions still connected there commit changes that only this worker sends, and
    // their records would otherwise hold the shared queue's tail for every database.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnectionByOid(
            pg_sys::Oid::from(dboid),
            pg_sys::Oid::INVALID,
            pg_sys::BGWORKER_BYPASS_ALLOWCONN,
        )
    };
    // The database's owner can have its sessions start as another role (ALTER DATABASE ... SET
    // session_authorization, which a superuser's connection takes in): the worker goes back to
    // the superuser it connected as, which `role` below then stays.
    // SAFETY: the connection's authenticated user is the bootstrap superuser.
    unsafe { pg_sys::SetSessionAuthorization(pg_sys::GetAuthenticatedUserId(), true) };
    for &(name, value) in SETTINGS {
        // SAFETY: setting a GUC of this process's own session, outside any transaction.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
    if !slot.attach_worker() {
        return;
    }
    slot.resume_resync(shared.head.load(Ordering::Acquire));
    // SAFETY: registers a plain function for this process's invalidations, once.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(feeds_stale), pg_sys::Datum::from(0)) };
    // SAFETY: registers a plain function with no argument, once; it lives as long as the process.
    unsafe { pg_sys::RegisterXactCallback(Some(note_commit), std::ptr::null_mut()) };
    // SAFETY: registers a plain function with the address of the slot, which lives in shared
    // memory as long as this process; it runs on every exit, an ERROR's included.
    unsafe { pg_sys::before_shmem_exit(Some(detach_at_exit), pg_sys::Datum::from(std::ptr::from_ref(slot) as usize)) };
    let mut worker = Worker {
        shared,
        slot,
        dboid,
        channels: HashMap::new(),
        last_batch: Instant::now(),
        batch: Batch::default(),
        ring: None,
        plans: None,
        feeds: HashMap::new(),
        arrived_over: Duration::ZERO,
        wake_time: Duration::ZERO,
        stopped_at: Stuck::default(),
    };
    worker.start_feeds();
    let mut checked: Option<Instant> = None;
    while worker.drain() && !slot.is_held() {
        // The catalog is read at start, after a DROP EXTENSION committed, and every 10 s: not
        // for every wake-up, which would cost a transaction per batch at light load.
        if slot.extension_check_requested() || checked.is_none_or(|at| at.elapsed() >= EXTENSION_CHECK_INTERVAL) {
            if !extension_installed() {
                return;
            }
            checked = Some(Instant::now());
        }
        worker.prune_if_due();
        // While the log holds payloads, the worker wakes every second to prune it; while a
        // reserved record stops it, often enough to pass it over in time.
        let wake = if worker.stopped_at.is_waiting() {
            pass_after() / 4
        } else if worker.ring.as_ref().is_some_and(|ring| ring.active) {
            PRUNE_WAKE
        } else {
            EXTENSION_CHECK_INTERVAL
        };
        if !BackgroundWorker::wait_latch(Some(wake)) {
            break;
        }
    }
    if !slot.is_held() {
        worker.drain_before_exit();
    }
}

/// Set when this process takes in a relation cache invalidation: the worker then reads the
/// retained watches' feeds again before it sends. A watch whose feed changes (retention set, a
/// new channel, other columns or payload format) gets new triggers, which invalidates its table.
static FEEDS_STALE: AtomicBool = AtomicBool::new(true);

#[pg_guard]
unsafe extern "C-unwind" fn feeds_stale(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    FEEDS_STALE.store(true, Ordering::Relaxed);
}

thread_local! {
    /// When the latest of this process's transactions reached its commit callbacks: committed,
    /// visible, and about to signal the backends that listen (see [`Worker::wake_time`]).
    static COMMITTED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

#[pg_guard]
unsafe extern "C-unwind" fn note_commit(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if event == pg_sys::XactEvent::XACT_EVENT_COMMIT {
        COMMITTED_AT.set(Some(Instant::now()));
    }
}

/// The last number any feed of `channel` sent (0 if none), read in the worker's transaction.
fn feed_position(channel: &[u8]) -> u64 {
    Spi::get_one_with_args::<i64>(
        "SELECT max(f.seq) FROM pgwatch.feeds f
          WHERE f.channel = pg_catalog.convert_from($1, pg_catalog.getdatabaseencoding())",
        &[channel.into()],
    )
    .unwrap_or_else(|e| crate::error::spi_failed("pgwatch.feeds", e))
    .map_or(0, |seq| seq.max(0) as u64)
}

/// How often a worker whose log holds payloads looks after its segments.
const PRUNE_WAKE: Duration = Duration::from_secs(1);

/// Frees the database's slot for the next worker as this one exits.
///
/// # Safety
/// Registered only by an attached worker, with the address of its slot.
#[pg_guard]
unsafe extern "C-unwind" fn detach_at_exit(_code: i32, slot: pg_sys::Datum) {
    // SAFETY: the address of this worker's slot, registered above.
    unsafe { &*(slot.value() as *const DbSlot) }.detach_worker();
}

fn extension_installed() -> bool {
    BackgroundWorker::transaction(targets::pgwatch_here)
}

/// A channel this worker has sent on.
struct KnownChannel {
    /// The table its latest notifications named.
    tbl: String,
    /// The last sequence number sent, also for channels past the shared table's capacity.
    seq: u64,
}

struct Worker {
    shared: &'static Shared,
    slot: &'static DbSlot,
    dboid: u32,
    channels: HashMap<Vec<u8>, KnownChannel>,
    /// When the last batch was collected: the next one's transactions committed since.
    last_batch: Instant,
    /// The batch being sent; kept so that its buffers are reused.
    batch: Batch,
    /// The replay log's segments, once the database has them (its pgwatch is 0.4.0 or later).
    ring: Option<Ring>,
    /// The statements on the log, planned once the database has it.
    plans: Option<Plans>,
    /// The retained channels' feeds as this worker's last committed transactions left them, with
    /// their table names; forgotten whenever a watch may have changed (see [`FEEDS_STALE`]).
    feeds: HashMap<Vec<u8>, (String, Feed)>,
    /// Over how long the last batch's transactions committed.
    arrived_over: Duration,
    /// How long the end of a send's commit takes, smoothed over the last few: from the commit
    /// callbacks on, PostgreSQL releases the transaction's resources and signals every backend
    /// that listens in the database, which on a busy machine also runs some of them before this
    /// process goes on. It grows with the listeners, where the whole send's time also has the
    /// batch's size, the log and the WAL in it.
    wake_time: Duration,
    /// The reserved record this worker's collections have stopped at (see
    /// [`Worker::pass_if_stuck`]).
    stopped_at: Stuck,
}

/// What one look at the queue did.
enum Step {
    /// Nothing of this database is queued.
    Empty,
    /// A batch was sent.
    Sent,
    /// A writer was still writing a record header; look again.
    Incomplete,
}

impl Worker {
    /// Sends everything published so far; `false` once asked to stop. After each batch it lets
    /// the next one gather for a while (see [`gather_delay`]).
    fn drain(&mut self) -> bool {
        loop {
            if BackgroundWorker::sighup_received() {
                // SAFETY: reloading the configuration file, outside any transaction.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            }
            if BackgroundWorker::sigterm_received() || self.slot.is_held() {
                return false;
            }
            match self.step() {
                Step::Empty => return true,
                Step::Sent => {
                    // Under steady load the queue is never empty: the log is looked after
                    // between batches too.
                    self.prune_if_due();
                    self.gather();
                }
                Step::Incomplete => {}
            }
        }
    }

    /// Once asked to stop: sends what is queued until the queue has been quiet for a moment (at
    /// a clean shutdown, the last commits publish their records just before the workers are
    /// told to stop), within a bound.
    fn drain_before_exit(&mut self) {
        let (start, mut quiet_since) = (Instant::now(), None::<Instant>);
        while start.elapsed() < LAST && !self.slot.is_held() {
            match self.step() {
                Step::Empty => {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= QUIET {
                        return;
                    }
                    // SAFETY: a plain sleep.
                    unsafe { pg_sys::pg_usleep(5_000) };
                }
                Step::Sent | Step::Incomplete => quiet_since = None,
            }
        }
    }

    /// Collects and sends one batch.
    fn step(&mut self) -> Step {
        let resync_after = self.slot.resync_due_after();
        let complete = self.shared.collect(self.dboid, BATCH_BYTES, &mut self.batch);
        self.pass_if_stuck();
        if self.batch.is_empty() {
            if complete {
                self.resync_if_due(resync_after);
                return Step::Empty;
            }
            // A writer is between claiming ring space and writing its header, which takes it
            // a moment; records behind it may be this database's, woken for already.
            // SAFETY: a plain sleep; signals are looked at right after.
            unsafe { pg_sys::pg_usleep(100) };
            return Step::Incomplete;
        }
        {
            let collected = Instant::now();
            self.arrived_over = collected.duration_since(std::mem::replace(&mut self.last_batch, collected));
            self.slot.set_state(WorkerState::Sending);
            self.deliver();
            self.resync_if_due(resync_after);
            self.slot.set_state(WorkerState::Idle);
        }
        Step::Sent
    }

    /// Passes over the reserved record the collection stopped at once it has stopped them for
    /// [`pass_after`]: its transaction, between pre-commit and commit all that time, is waiting
    /// for something, and would hold up every later change of the database (and, through the
    /// ring's tail, of every database). Its writer has its subscribers refetch once it commits.
    fn pass_if_stuck(&mut self) {
        let Some(at) = self.stopped_at.due(self.batch.blocked()) else { return };
        if self.shared.pass(self.slot, at) {
            // The records behind it are ready: look again at once.
            self.slot.wake();
            log!(
                "pgwatch: passed over the changes of a transaction that has not finished committing for {} ms; its subscribers are told to refetch once it commits",
                pass_after().as_millis()
            );
        }
    }

    /// Lets the next batch gather after one was sent (see [`gather_delay`]).
    fn gather(&self) {
        // A batch cut at its size limit leaves records waiting: no reason to wait for more.
        let cut = self.batch.bytes() >= BATCH_BYTES;
        let longest = (busy_batch_delay(), listener_batch_delay());
        let delay = gather_delay(self.batch.len(), self.arrived_over, longest, self.wake_time);
        let micros = delay.as_micros() as i64;
        if !cut && micros > 0 {
            // SAFETY: a plain sleep; signals are looked at right after.
            unsafe { pg_sys::pg_usleep(micros) };
        }
    }

    /// Sends the collected batch in one transaction, then marks its records done. A watch's
    /// changes that cannot be sent (a hand-made trigger's channel too long, say) are skipped and
    /// counted, so that they never hold up the database's other notifications.
    fn deliver(&mut self) {
        let mut watches: Vec<(Target, Folded)> = Vec::new();
        for body in self.batch.bodies() {
            for record in decode(body) {
                if let Some(why) = record.unsendable() {
                    stats::add(Counter::SkippedRecords, 1);
                    warning!("pgwatch: skipped changes of {} that cannot be notified: {why}", record.describe());
                    continue;
                }
                let at = match watches.iter().position(|(known, _)| record.is_for(known)) {
                    Some(at) => at,
                    None => {
                        watches.push((record.target(), Folded::of_transactions()));
                        watches.len() - 1
                    }
                };
                record.fold_into(&mut watches[at].1);
            }
        }
        notify::resync_shared_channels(watches.iter_mut().map(|(target, folded)| (target.channel.as_c_str(), folded)));
        if let Some(wake) = self.send(&watches) {
            // A smoothed mean of samples cut at what makes the longest wait: one slow commit (a
            // page fault, a stall of the machine) moves the wait by an eighth of it at most,
            // while a hundred listeners' steady wake-ups still reach it.
            let most = busy_batch_delay().max(listener_batch_delay()) / WAIT_PER_WAKE_TIME;
            self.wake_time = (self.wake_time * 7 + wake.min(most)) / 8;
        }
        stats::add(Counter::Batches, 1);
        stats::flush();
        // SAFETY: reading the clock.
        self.slot.last_send.store(unsafe { pg_sys::GetCurrentTimestamp() }, Ordering::Relaxed);
        self.shared.finish(self.slot, self.batch.positions());
    }

    /// Sends each watch's folded changes in one transaction, numbering the payloads of each
    /// channel on from its last number (one count per channel, whatever watches share it).
    /// Returns how long the end of its commit took (see [`Worker::wake_time`]).
    fn send(&mut self, watches: &[(Target, Folded)]) -> Option<Duration> {
        if self.ring.is_none() && watches.iter().any(|(target, _)| target.retained) {
            // The database was updated to a release with the log since this worker started.
            self.start_feeds();
        }
        let (shared, dboid, known) = (self.shared, self.dboid, &self.channels);
        let (ring, plans, feeds) = (&mut self.ring, self.plans.as_ref(), &mut self.feeds);
        let retained: Vec<&[u8]> =
            watches.iter().filter(|(target, _)| target.retained).map(|(target, _)| target.channel.to_bytes()).collect();
        let sent = BackgroundWorker::transaction(AssertUnwindSafe(|| {
            // A retained watch's payloads are numbered by its feed and logged as they are sent.
            let logged = RefCell::new(match plans {
                Some(plans) if !retained.is_empty() => {
                    // Invalidations are taken in as the transaction starts: a watch changed
                    // since the feeds were last read shows here.
                    if FEEDS_STALE.swap(false, Ordering::Relaxed) {
                        feeds.clear();
                    }
                    if retained.iter().all(|channel| feeds.contains_key(*channel)) {
                        let open = retained.iter().map(|channel| {
                            let (tbl, feed) = &feeds[*channel];
                            (channel.to_vec(), tbl.clone(), feed.clone())
                        });
                        Logged::resume(open)
                    } else {
                        Logged::open(plans, Some(&retained))
                    }
                }
                _ => Logged::default(),
            });
            let mut last: Vec<(&[u8], &str, u64)> = Vec::new();
            for (target, folded) in watches {
                let channel = target.channel.to_bytes();
                if target.retained && logged.borrow().has(channel) {
                    if let Some((.., seq)) = last.iter().find(|(c, ..)| *c == channel) {
                        logged.borrow_mut().skip_past(channel, *seq);
                    }
                    if folded.resync() {
                        // The reset marker `send_changes` sends last for the fallback's gap.
                        logged.borrow_mut().note_reset(channel, ResetReason::Fallback);
                    }
                    notify::send_changes(
                        target,
                        folded,
                        &mut || Some(logged.borrow_mut().next_seq(channel)),
                        &mut |payload| logged.borrow_mut().sent(channel, payload),
                    );
                    continue;
                }
                let at = last.iter().position(|(c, ..)| *c == channel).unwrap_or_else(|| {
                    let seq = known.get(channel).map_or_else(
                        || {
                            // A channel this worker has not sent on may have had a feed (its
                            // watch's retention removed): its numbers go on above the feed's.
                            let fed = if ring.is_some() { feed_position(channel) } else { 0 };
                            shared.last_seq(dboid, channel).max(fed)
                        },
                        |c| c.seq,
                    );
                    last.push((channel, &target.tbl, seq));
                    last.len() - 1
                });
                let (_, tbl, seq) = &mut last[at];
                *tbl = &target.tbl;
                // Above what the channel's feed numbered in this transaction (its watch kept
                // payloads when other records of this batch were queued).
                *seq = (*seq).max(logged.borrow().position(channel).unwrap_or(0));
                notify::send_changes(
                    target,
                    folded,
                    &mut || {
                        *seq += 1;
                        Some(*seq)
                    },
                    &mut |_| {},
                );
            }
            let mut logged = logged.into_inner();
            let wrote = match (ring.as_mut(), plans) {
                (Some(ring), Some(plans)) => logged.write(plans, ring),
                _ => false,
            };
            (last, wrote, logged)
        }));
        let wake = COMMITTED_AT.take().map(|committed| committed.elapsed());
        let (sent, wrote, logged) = sent;
        if wrote {
            self.ring.as_mut().expect("logged into it").active = true;
        }
        // Committed: the notifications are on their way.
        for (channel, tbl, seq) in sent {
            self.shared.store_seq(self.dboid, channel, seq);
            self.channels.insert(channel.to_vec(), KnownChannel { tbl: tbl.to_string(), seq });
        }
        for (channel, tbl, feed) in logged.into_feeds() {
            // Numbered by its feed now: should the watch lose its retention again, its numbers go
            // on above the feed's, never from what this worker sent before.
            let fed = (feed.next - 1).max(0) as u64;
            let known = self.channels.entry(channel.clone()).or_insert(KnownChannel { tbl: tbl.clone(), seq: 0 });
            known.seq = known.seq.max(fed);
            self.feeds.insert(channel, (tbl, feed));
        }
        wake
    }

    /// Once per server run and database, unless the server started clean (see `runs`): moves
    /// every retained feed past what a crash may have lost, with a reset marker that subscribers
    /// see and replay returns in sequence. Readers of the feeds wait for this.
    fn start_feeds(&mut self) {
        let ready = self.slot.feeds_ready.load(Ordering::Acquire);
        let started = BackgroundWorker::transaction(|| {
            // A database still on an older release's SQL has no log (and no retained watch).
            let has_log = Spi::get_one::<bool>("SELECT to_regclass('pgwatch.log_segments') IS NOT NULL")
                .unwrap_or_else(|e| crate::error::spi_failed("pgwatch.log_segments", e))
                .unwrap_or(false);
            if !has_log {
                return None;
            }
            // Every relation the feeds' statements use, locked first and waiting briefly (less
            // than deadlock_timeout): a DROP EXTENSION (or an update) that holds one of them
            // would otherwise deadlock with this transaction, which takes them one by one as it
            // plans. Past the wait this worker exits with the lock's error, and the launcher
            // starts it again when it is needed.
            Spi::run(
                "SET LOCAL lock_timeout = '100ms';
                 LOCK TABLE pgwatch.watches, pgwatch.feeds, pgwatch.log_segments, pgwatch.log IN ACCESS SHARE MODE;
                 SET LOCAL lock_timeout = 0",
            )
            .unwrap_or_else(|e| crate::error::spi_failed("pgwatch's feeds", e));
            let ring = Ring::load();
            let plans = Plans::prepare();
            if !ready {
                let mut logged = Logged::open(&plans, None);
                let feeds: Vec<(Vec<u8>, String)> =
                    logged.channels().map(|(channel, tbl)| (channel.to_vec(), tbl.to_string())).collect();
                for (channel, tbl) in feeds {
                    logged.reset(&channel, ResetReason::Restart);
                    let seq = logged.next_seq(&channel);
                    let marker = reset_payload(&tbl, Some(seq), ResetReason::Restart);
                    let marker = CString::new(marker.as_slice()).expect("JSON text holds no NUL byte");
                    notify::send(&CString::new(channel.clone()).expect("a channel holds no NUL"), &marker, 0);
                    logged.sent(&channel, marker.to_bytes());
                }
                let mut ring = ring;
                ring.active |= logged.write(&plans, &mut ring);
                return Some((ring, plans));
            }
            Some((ring, plans))
        });
        (self.ring, self.plans) = started.unzip();
        self.slot.feeds_ready.store(true, Ordering::Release);
        self.slot.worker_wanted.store(false, Ordering::Release);
    }

    /// Looks after the log's segments, once a second while they hold payloads.
    fn prune_if_due(&mut self) {
        if let Some(ring) = self.ring.as_mut().filter(|ring| ring.due()) {
            BackgroundWorker::transaction(AssertUnwindSafe(|| ring.prune()));
        }
    }

    /// Tells channels to refetch when a transaction notified inline asked for it at ring position
    /// `after` without room for its resync record (see `DbSlot::resync_due_after`), once every
    /// record reserved before that is sent: every watch's channel in the buckets it asked for (a
    /// worker started since may not have sent on it, while the one before it sent the older
    /// notifications that may arrive late).
    fn resync_if_due(&mut self, after: u64) {
        if after == 0 || self.shared.unsent_before(self.dboid, after - 1) {
            return;
        }
        let Some(buckets) = self.slot.take_resync(after) else { return };
        let resync = |channel: &[u8], tbl: &str, retained: bool| {
            let target = Target {
                channel: CString::new(channel).expect("a sent channel holds no NUL"),
                tbl: tbl.to_string(),
                rows: Rows::Objects,
                retained,
            };
            let mut folded = Folded::default();
            folded.mark_resync();
            (target, folded)
        };
        // Retained channels get a reset marker in their log, whether or not this worker has sent
        // on them: what was notified inline is not in the log.
        let retained: Vec<(Vec<u8>, String)> = match &self.plans {
            Some(plans) => BackgroundWorker::transaction(|| {
                Logged::open(plans, None)
                    .channels()
                    .filter(|(channel, _)| in_buckets(&buckets, channel))
                    .map(|(channel, tbl)| (channel.to_vec(), tbl.to_string()))
                    .collect()
            }),
            None => Vec::new(),
        };
        let mut plain: HashMap<Vec<u8>, String> = BackgroundWorker::transaction(|| targets::read(Watches::All))
            .into_iter()
            .map(|target| (target.channel.as_bytes().to_vec(), target.tbl.clone()))
            .chain(self.channels.iter().map(|(channel, known)| (channel.clone(), known.tbl.clone())))
            .collect();
        plain.retain(|channel, _| in_buckets(&buckets, channel) && !retained.iter().any(|(c, _)| c == channel));
        let watches: Vec<(Target, Folded)> = plain
            .iter()
            .map(|(channel, tbl)| resync(channel, tbl, false))
            .chain(retained.iter().map(|(channel, tbl)| resync(channel, tbl, true)))
            .collect();
        if !watches.is_empty() {
            self.send(&watches);
        }
        self.slot.resync_sent();
    }
}

/// `pgwatch.busy_batch_delay`: the longest the worker lets a batch gather for the commit rate.
fn busy_batch_delay() -> Duration {
    Duration::from_millis(guc::BUSY_BATCH_DELAY_MS.get() as u64)
}

/// `pgwatch.listener_batch_delay`: the longest the worker lets a batch gather for its listeners.
fn listener_batch_delay() -> Duration {
    Duration::from_millis(guc::LISTENER_BATCH_DELAY_MS.get() as u64)
}

/// The commit rate at which the worker waits its longest (`busy_batch_delay`), in commits per
/// second per millisecond of it: the default 10 ms from 7,000 commits per second on. Below that
/// the wait falls with the cube of the rate (3.6 ms at 5,000, 1.25 ms at 3,500, 0.03 ms at
/// 1,000). A batch costs the worker, the WAL writer and every listening backend about the same
/// whatever it carries, and each of their wake-ups costs a writer on the same cores a context
/// switch and its caches: near one client's full rate, batches of a few transactions would cost
/// more than the writes they announce. At half that rate an eighth of the wait keeps changes
/// within a few milliseconds, and a wait in proportion to the rate would grow with the machine's
/// speed.
const FULL_RATE_PER_MS: f64 = 700.0;

/// Under a steady stream of commits, the worker lets the next batch gather at least this many
/// times as long as the end of a send's commit takes (see [`Worker::wake_time`]): it signals every
/// backend that listens in the database, and on a busy machine some of them run before the
/// worker goes on, so it grows with what the listeners cost (PostgreSQL 13 to 18 tell an
/// extension nothing else about them). Their wake-ups then take at most about an eighth of the
/// time, within `listener_batch_delay` (or `busy_batch_delay`, if longer).
const WAIT_PER_WAKE_TIME: u32 = 8;

/// Below this commit rate (per second), commits are sporadic: no wait. Above it the wake-ups'
/// floor applies, also when listeners have slowed the writers down (so few commits would
/// otherwise mean many notifications, each waking them all).
const STEADY_RATE: f64 = 100.0;

/// How long to let the next batch gather after sending `transactions` that committed over
/// `arrived_over` (since the previous batch): with the cube of that commit rate (see
/// [`FULL_RATE_PER_MS`]), at most `longest`, and under a steady stream at least
/// [`WAIT_PER_WAKE_TIME`] times `wake_time`, at most `listening` (or `longest`, if longer) for
/// that; nothing when `longest` is 0. A change after a quiet spell goes out at once and the wait
/// after it is next to nothing; a steady stream of commits, even one client's, is sent in batches,
/// because every batch costs the worker a transaction and every notification each listening backend
/// a wake-up, CPU and context switches that they share with the writers. The wait follows the rate,
/// not the batch, which itself grows with the wait.
fn gather_delay(
    transactions: usize,
    arrived_over: Duration,
    (longest, listening): (Duration, Duration),
    wake_time: Duration,
) -> Duration {
    let rate = transactions as f64 / arrived_over.as_secs_f64().max(1e-6);
    if longest.is_zero() || rate < STEADY_RATE {
        // Sporadic commits: a sleep this short would gather nothing and cost more than it waits.
        return Duration::ZERO;
    }
    let full_rate = longest.as_secs_f64() * 1000.0 * FULL_RATE_PER_MS;
    let share = (rate / full_rate).min(1.0);
    let by_rate = longest.mul_f64(share.powi(3));
    by_rate.max((wake_time * WAIT_PER_WAKE_TIME).min(longest.max(listening)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gathering_wait_follows_the_commit_rate_up_to_the_setting() {
        let longest = Duration::from_millis(10);
        let ms = Duration::from_millis;
        let wait = |transactions, over| gather_delay(transactions, over, (longest, ms(50)), Duration::ZERO).as_micros();
        // 1,000 per second: 0.03 ms; 4,000: 1.9 ms; 7,000 and more: all 10, one transaction at
        // a time as well as in batches.
        assert_eq!(
            [wait(1, ms(1)), wait(4, ms(1)), wait(7, ms(1)), wait(100, ms(1)), wait(5, Duration::ZERO)],
            [29, 1865, 10000, 10000, 10000]
        );
        assert_eq!([wait(1, Duration::from_micros(250)), wait(1, Duration::ZERO)], [1865, 10000]);
        assert_eq!(gather_delay(4, ms(1), (ms(3), ms(50)), Duration::ZERO), ms(3));
        // A transaction or two after a second's quiet: no wait.
        assert_eq!([wait(1, ms(1000)), wait(2, ms(1000))], [0, 0]);
        // 0 disables waiting, whatever the listeners.
        assert_eq!(gather_delay(100, ms(1), (Duration::ZERO, ms(50)), ms(1)), Duration::ZERO);
    }

    #[test]
    fn under_steady_load_slow_wake_ups_stretch_the_wait_within_the_listeners_setting() {
        let (longest, us, ms) =
            ((Duration::from_millis(10), Duration::from_millis(50)), Duration::from_micros, Duration::from_millis);
        // 1,000 commits per second: 0.03 ms by the rate; wake-ups of 20 µs make it 160 µs, of
        // 250 µs (20 listeners, say) 2 ms, of 2 ms 16, of 8 ms (a hundred) the listeners' 50.
        let wait = |wake| gather_delay(1, ms(1), longest, wake);
        assert_eq!([wait(us(20)), wait(us(250)), wait(ms(2)), wait(ms(8))], [us(160), us(2000), ms(16), ms(50)]);
        // The rate's wait is not cut by a shorter listeners' setting.
        assert_eq!(gather_delay(100, ms(1), (ms(10), ms(5)), ms(8)), ms(10));
        assert_eq!(gather_delay(1, ms(1), (ms(10), ms(5)), ms(8)), ms(10));
        // A transaction after a second's quiet goes out at once, however slow wake-ups are.
        assert_eq!(gather_delay(1, Duration::from_secs(1), longest, ms(1)), Duration::ZERO);
    }
}
