//! The launcher (with pgwatch preloaded): one background worker that starts each database's
//! delivery worker when the first record of that database is published, and again whenever it
//! stopped with records left.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use super::ring::Stuck;
use super::shmem;
use super::slots::{DbSlot, WorkerState, MAX_DATABASES};
use crate::stats::{self, Counter};

/// Registers the launcher; called from `_PG_init` while preloading.
pub fn register_launcher() {
    BackgroundWorkerBuilder::new("pgwatch launcher")
        .set_type("pgwatch launcher")
        .set_library("pgwatch")
        .set_function("pgwatch_launcher_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgwatch_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let shared = shmem::shared().expect("the launcher runs only with pgwatch preloaded");
    shared.attach_launcher();
    let mut workers: Vec<Option<DynamicBackgroundWorker>> = (0..MAX_DATABASES).map(|_| None).collect();
    let mut started = [false; MAX_DATABASES];
    let mut warned = [false; MAX_DATABASES];
    let mut backoff = [Backoff::default(); MAX_DATABASES];
    // The database each slot served when last looked at: a slot freed by DROP DATABASE and taken
    // by another database starts that one afresh.
    let mut owners = [0u32; MAX_DATABASES];
    // Per slot, how many workers in a row ended without attaching: they could not connect.
    let mut unattached = [0u32; MAX_DATABASES];
    // The reservation at the ring's tail, and the published record there.
    let mut tail_stuck = Stuck::default();
    let mut tail_held = Stuck::default();
    loop {
        let mut wait = Duration::from_secs(1);
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let tail = shared.at_tail();
        pass_stuck_tail(shared, &mut tail_stuck, tail);
        let held_tail = tail.filter(|&(_, _, reserved)| !reserved);
        let unserved = tail_held.due_after(held_tail.map(|(at, _, _)| at), UNSERVED_TAIL).and(held_tail);
        // Whether a worker of the tail's database runs: its wait starts again.
        let mut tail_served = false;
        for (i, slot) in shared.slots.iter().enumerate() {
            let dboid = slot.dboid.load(Ordering::Relaxed);
            if owners[i] != dboid {
                owners[i] = dboid;
                (started[i], warned[i], backoff[i], unattached[i]) = (false, false, Backoff::default(), 0);
            }
            let alive = workers[i].as_ref().is_some_and(|w| match w.pid() {
                Ok(_) => true,
                Err(status) => matches!(status, pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted),
            });
            // Attached: a worker this launcher started before it restarted.
            let attached = slot.pid.load(Ordering::Acquire) != 0;
            if !alive && workers[i].take().is_some() {
                // One that ended before it attached left the state at starting.
                unattached[i] = if slot.state() == WorkerState::Starting { unattached[i] + 1 } else { 0 };
                if unattached[i] >= GIVE_UP_AFTER {
                    // Its database may be invalid (a DROP DATABASE interrupted late): its records
                    // would hold the ring's tail, and every other database's delivery with it.
                    abandon(shared, slot, dboid, "cannot connect");
                }
            }
            if attached {
                unattached[i] = 0;
            }
            tail_served |= (alive || attached) && held_tail.is_some_and(|(_, db, _)| db == dboid);
            if let Some((_, tail_db, _)) =
                unserved.filter(|&(_, db, _)| db == dboid && dboid != 0 && !alive && !attached)
            {
                // The oldest record of the shared queue is this database's, and no worker has
                // taken it for UNSERVED_TAIL: its worker is kept out (a statement that needs the
                // database to itself, held or retried over and over) or fails as it starts. Every
                // other database's delivery waits behind it.
                abandon(shared, slot, tail_db, "has not run");
            }
            let holder = slot.held_by.load(Ordering::Acquire);
            // SAFETY: a lookup in the shared process array, which takes its lock.
            if holder != 0 && unsafe { pg_sys::BackendPidGetProc(holder) }.is_null() {
                // The backend running DROP DATABASE (or another statement that needs the
                // database to itself) exited, terminated say, before it dropped the database or
                // gave up on it: the database's delivery goes on.
                slot.release(holder);
            }
            if alive || attached || dboid == 0 || slot.is_held() {
                continue;
            }
            if slot.backlog.load(Ordering::Relaxed) == 0 && !slot.worker_wanted.load(Ordering::Acquire) {
                continue;
            }
            let now = Instant::now();
            if let Some(left) = backoff[i].left(now) {
                // Rounded up: the latch's wait counts whole milliseconds, and 0 would not wait.
                wait = wait.min(Duration::from_millis(left.as_millis() as u64 + 1));
                // A worker that exited before it attached left the state at starting.
                slot.set_state(WorkerState::Stopped);
                continue;
            }
            slot.set_state(WorkerState::Starting);
            match start_worker(dboid) {
                Some(worker) => {
                    backoff[i].started(now);
                    if std::mem::replace(&mut started[i], true) {
                        stats::add(Counter::WorkerRestarts, 1);
                        // The launcher runs no transactions, whose end would flush the count.
                        stats::flush();
                    }
                    workers[i] = Some(worker);
                    warned[i] = false;
                }
                None => {
                    slot.set_state(WorkerState::Stopped);
                    if !std::mem::replace(&mut warned[i], true) {
                        warning!("pgwatch: no background worker slot for database {dboid}; raise max_worker_processes");
                    }
                }
            }
        }
        if tail_served {
            tail_held = Stuck::default();
        }
        // Woken by commits that find no worker, and by the postmaster when a worker starts or stops.
        if !BackgroundWorker::wait_latch(Some(wait)) {
            break;
        }
    }
    // Asked to stop (SIGTERM, e.g. pg_terminate_backend) or the postmaster died. Exit code 1 has
    // the postmaster start the launcher again after its restart time; 0 would unregister it, and
    // no worker would ever be started again. (A postmaster shutting down restarts nothing.)
    // SAFETY: ends this process the way PostgreSQL's own background workers do.
    unsafe { pg_sys::proc_exit(1) };
}

/// Drops the queued records of database `dboid`, whose worker `why` (see `Shared::abandon`); a
/// worker is still wanted there, to send the refetch once it runs.
fn abandon(shared: &shmem::Shared, slot: &DbSlot, dboid: u32, why: &str) {
    // A worker started by the launcher before this one restarted can attach at any time: it
    // must not copy out records being dropped (nor finish them twice).
    let Some(dropped) = slot.without_worker(|| shared.abandon(dboid)) else { return };
    slot.worker_wanted.store(true, Ordering::Release);
    if dropped > 0 {
        stats::add(Counter::SkippedRecords, dropped);
        // The launcher runs no transactions, whose end would flush the count.
        stats::flush();
        warning!(
            "pgwatch: the delivery worker of database {dboid} {why}; {dropped} queued transactions were dropped, and its subscribers will be told to refetch once it runs"
        );
    }
}

/// How long the shared queue's oldest record may wait for a worker of its database that does
/// not run before its database's records are dropped (see `abandon`): far longer than a worker
/// takes to start, and than a `DROP DATABASE` waits for the database's sessions to leave.
const UNSERVED_TAIL: Duration = Duration::from_secs(30);

/// Passes over the reservation at the ring's tail once it has been there for `pass_after`: its
/// database's worker would (see `Worker::pass_if_stuck`), but may not run (held, failing to
/// start, or gone with its extension), and the tail holds every database's delivery.
fn pass_stuck_tail(shared: &shmem::Shared, stuck: &mut Stuck, tail: Option<(u64, u32, bool)>) {
    let at_tail = tail.filter(|&(_, _, reserved)| reserved);
    let (Some(at), Some((_, dboid, _))) = (stuck.due(at_tail.map(|(at, _, _)| at)), at_tail) else { return };
    if shared.find_slot(dboid).is_some_and(|slot| shared.pass(slot, at)) {
        log!("pgwatch: passed over the changes of a transaction of database {dboid} that has not finished committing; its subscribers are told to refetch once it commits");
    }
}

/// How many workers of a database in a row may end before they attach (they could not connect)
/// before its queued records are dropped (see `Shared::abandon`), and again after each further
/// one: with the backoff below, a few seconds. Every record queued meanwhile still gets a start.
const GIVE_UP_AFTER: u32 = 5;

/// When a database's worker may be started again. One that stopped soon after it started (it
/// gave way to a lock held on pgwatch's tables, say, or failed) is started again once the wait
/// due since its start has passed; the wait doubles with each start, from 100 ms to 2 s, so that a
/// lasting cause costs a start now and then rather than a loop, and goes back to 100 ms once a
/// worker ran for 5 s. A worker that outlived its wait is started again at once. (One terminated
/// on purpose soon after it started waits too, at most 2 s.)
#[derive(Clone, Copy, Default)]
struct Backoff {
    /// When the last worker was started, and the wait that was due before that start (the next
    /// is twice as long, within bounds).
    last: Option<(Instant, Duration)>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const LONGEST: Duration = Duration::from_secs(2);
    /// A worker that ran this long stopped for a reason of its time, not of its start (longer than
    /// the longest wait, which a worker started after it also lives through before it is judged).
    const LIVED: Duration = Duration::from_secs(5);

    /// The wait due after the last start and when that was, judged at `now`: none before the
    /// first start, nor once a worker has run for [`Self::LIVED`].
    fn due(&self, now: Instant) -> Option<(Instant, Duration)> {
        let (at, waited) = self.last?;
        (now.saturating_duration_since(at) < Self::LIVED).then(|| (at, (waited * 2).clamp(Self::FIRST, Self::LONGEST)))
    }

    /// The wait still due before the next start, if any, at `now` (the previous worker stopped).
    fn left(&self, now: Instant) -> Option<Duration> {
        let (at, due) = self.due(now)?;
        due.checked_sub(now.saturating_duration_since(at)).filter(|left| !left.is_zero())
    }

    /// Notes a start at `now`.
    fn started(&mut self, now: Instant) {
        self.last = Some((now, self.due(now).map_or(Duration::ZERO, |(_, due)| due)));
    }
}

fn start_worker(dboid: u32) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("pgwatch delivery for database {dboid}"))
        .set_type("pgwatch delivery")
        .set_library("pgwatch")
        .set_function("pgwatch_worker_main")
        .set_argument(Some(pg_sys::Datum::from(dboid)))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        // SAFETY: reading this process's pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_stops_soon_after_it_starts_is_started_again_ever_later() {
        let (t0, ms) = (Instant::now(), Duration::from_millis);
        let mut backoff = Backoff::default();
        assert_eq!(backoff.left(t0), None, "the first start waits for nothing");
        backoff.started(t0);
        // Stopped at once: 100 ms after its start, then 200, 400, ... up to 2 s.
        assert_eq!(backoff.left(t0 + ms(30)), Some(ms(70)));
        assert_eq!(backoff.left(t0 + ms(100)), None);
        let mut at = t0 + ms(100);
        let mut waits = Vec::new();
        for _ in 0..9 {
            backoff.started(at);
            let left = backoff.left(at).expect("stopped at once again");
            waits.push(left.as_millis());
            at += left;
        }
        assert_eq!(waits, [200, 400, 800, 1600, 2000, 2000, 2000, 2000, 2000]);
    }

    #[test]
    fn a_worker_that_ran_a_while_is_started_again_at_once() {
        let (t0, s) = (Instant::now(), Duration::from_secs);
        let mut backoff = Backoff::default();
        for i in 0..5 {
            backoff.started(t0 + s(i) / 10);
        }
        let stopped = t0 + s(20);
        assert_eq!(backoff.left(stopped), None);
        backoff.started(stopped);
        assert_eq!(backoff.left(stopped + Duration::from_millis(10)), Some(Duration::from_millis(90)));
    }
}
