//! The per-transaction capture buffer.
//!
//! Triggers record changes here; on abort they are dropped, and `ROLLBACK TO SAVEPOINT` drops what
//! the rolled-back subtransactions recorded. Changes made at the top level are folded at once;
//! changes inside a subtransaction wait in a tail, in order, until they can no longer be rolled
//! back on their own. At pre-commit the net effect is either queued for the database's delivery
//! worker (published at commit) or, inline, sent as NOTIFYs of this transaction.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use pgrx::pg_sys::{self, SubTransactionId, SubXactEvent, XactEvent};
use pgrx::{pg_guard, warning};

use super::notify;
use super::prepared;
use super::ring::{clear_keeping, Reservation};
use super::shmem::{self, Shared};
use crate::encode::fold::{Change, Folded};
use crate::encode::image::Image;
use crate::encode::record;
use crate::guc::{self, Delivery};
use crate::model::events::Op;
use crate::model::watch::{OnTruncate, Target};
use crate::stats::{self, Counter};
use crate::unguarded::{GetCurrentSubTransactionId, GetCurrentTransactionNestLevel};

/// One watch's changes in this transaction.
struct Buffer {
    target: Rc<Target>,
    folded: Folded,
    /// Changes of this watch still in the tail.
    pending: usize,
}

impl Buffer {
    fn tracked(&self) -> usize {
        self.folded.len() + self.pending
    }

    fn apply(&mut self, event: Recorded) {
        match event {
            Recorded::Row(change) => self.folded.apply(change),
            Recorded::Overflow(op) => self.folded.mark_overflow(op),
            Recorded::Truncate(on) => self.folded.truncate(on),
            Recorded::Reshape => self.folded.mark_reshaped(),
        }
    }
}

/// What a trigger recorded.
enum Recorded {
    Row(Change),
    /// A row change that cannot be listed: subscribers are told to refetch.
    Overflow(Op),
    Truncate(OnTruncate),
    /// DDL changed which rows the table holds: subscribers refetch (see `refetch_at_commit`).
    Reshape,
}

/// A change recorded inside a subtransaction.
struct Pending {
    buffer: usize,
    subxact: SubTransactionId,
    event: Recorded,
}

#[derive(Default)]
struct Xact {
    buffers: Vec<Buffer>,
    tail: Vec<Pending>,
    /// Emptied folds of earlier transactions, so that a small one allocates none.
    spare_folds: Vec<Folded>,
    /// This transaction's record for the delivery queue, built at pre-commit in memory kept
    /// from earlier transactions.
    record: Vec<u8>,
    /// Bytes of row images held outside the tracked rows themselves (see `MAX_IMAGE_BYTES`).
    image_bytes: usize,
}

/// The most bytes of boxed row images one transaction holds: with `pgwatch.max_rows_per_xact`,
/// the bound on what a large write keeps in its backend's memory. Past it, changes are
/// announced as overflows, like rows past the row limit.
const MAX_IMAGE_BYTES: usize = 64 << 20;

/// What an emptied transaction keeps for the next: memory for this many rows per watch (and in
/// the subtransaction tail), for this many watches, and for a queue record of this many bytes.
/// Bigger allocations are freed. A tracked row takes 144 bytes, so a backend keeps at most about
/// 0.3 MB.
const KEPT_ROWS: usize = 256;
const KEPT_FOLDS: usize = 8;
const KEPT_RECORD_BYTES: usize = 16 * 1024;

thread_local! {
    static XACT: RefCell<Xact> = RefCell::default();
    /// This transaction's record in the delivery queue, between pre-commit and commit or abort.
    static QUEUED: Cell<Option<Reservation>> = const { Cell::new(None) };
    /// The watches of the queued record, whose subscribers are told to refetch should the
    /// worker pass the record over before this transaction commits (see `ring`).
    static QUEUED_TARGETS: RefCell<Vec<Rc<Target>>> = const { RefCell::new(Vec::new()) };
    /// This transaction was notified inline in a database that has a delivery worker: its
    /// watches, whose subscribers are told to refetch if the worker still holds older changes
    /// for them once it commits (see `announce_after_commit`).
    static INLINE: RefCell<Vec<Rc<Target>>> = const { RefCell::new(Vec::new()) };
    /// This transaction ran DROP EXTENSION: once it commits, the database's worker checks
    /// whether pgwatch is still installed.
    static CHECK_EXTENSION: Cell<bool> = const { Cell::new(false) };
    /// The watches of a prepared transaction this one committed (`COMMIT PREPARED`), whose
    /// resync goes out with this transaction: should this one abort after all (its NOTIFY
    /// waiting for PostgreSQL's lock cancelled, say), the prepared one stays committed, and the
    /// worker is asked for the resync instead (see `resync_at_commit`).
    static COMMITTED_PREPARED: RefCell<Vec<Rc<Target>>> = const { RefCell::new(Vec::new()) };
    /// What a transaction being prepared will not notify (rows, truncated tables, and whether
    /// its subscribers are told at COMMIT PREPARED): counted and reported once PREPARE
    /// succeeded, not for one that fails after pre-prepare (prepared transactions disabled, say).
    static UNSENT_AT_PREPARE: Cell<Option<(usize, usize, bool)>> = const { Cell::new(None) };
}

impl Xact {
    /// Row changes tracked in this transaction, over all its watches: what
    /// `pgwatch.max_rows_per_xact` bounds.
    fn tracked(&self) -> usize {
        self.buffers.iter().map(Buffer::tracked).sum()
    }

    fn buffer(&mut self, target: &Rc<Target>) -> usize {
        if let Some(i) = self.buffers.iter().position(|b| Rc::ptr_eq(&b.target, target) || b.target == *target) {
            return i;
        }
        let folded = self.spare_folds.pop().unwrap_or_default();
        self.buffers.push(Buffer { target: target.clone(), folded, pending: 0 });
        self.buffers.len() - 1
    }

    /// Forgets everything recorded, keeping the memory a small transaction needs for the next.
    fn clear(&mut self) {
        clear_keeping(&mut self.tail, KEPT_ROWS);
        for Buffer { mut folded, .. } in self.buffers.drain(..) {
            if folded.capacity() <= KEPT_ROWS && self.spare_folds.len() < KEPT_FOLDS {
                folded.clear();
                self.spare_folds.push(folded);
            }
        }
        clear_keeping(&mut self.record, KEPT_RECORD_BYTES);
        self.image_bytes = 0;
    }

    fn fold_tail(&mut self) {
        for pending in self.tail.drain(..) {
            let buffer = &mut self.buffers[pending.buffer];
            buffer.apply(pending.event);
            buffer.pending -= 1;
        }
    }

    /// Folds `event` at once at the top level; inside a subtransaction it waits in the tail (a
    /// run of overflows of one op takes one entry, so rows past the limit cost no memory).
    fn push(&mut self, buffer: usize, event: Recorded) {
        // SAFETY: plain reads of the current transaction's state, which cannot raise an ERROR.
        let (level, subxact) = unsafe { (GetCurrentTransactionNestLevel(), GetCurrentSubTransactionId()) };
        if level <= 1 {
            self.fold_tail();
            self.buffers[buffer].apply(event);
            return;
        }
        let repeated = self.tail.last().is_some_and(|p| {
            p.buffer == buffer
                && p.subxact == subxact
                && matches!((&p.event, &event), (Recorded::Overflow(a), Recorded::Overflow(b)) if a == b)
        });
        if !repeated {
            self.buffers[buffer].pending += 1;
            self.tail.push(Pending { buffer, subxact, event });
        }
    }

    /// Drops what subtransaction `subxact` and its children recorded: they hold every id from
    /// `subxact` on, and everything recorded since it began.
    fn roll_back_to(&mut self, subxact: SubTransactionId) {
        while self.tail.last().is_some_and(|p| p.subxact >= subxact) {
            let pending = self.tail.pop().expect("checked above");
            self.buffers[pending.buffer].pending -= 1;
        }
    }
}

/// Records one row change of `target`'s table.
pub fn record(target: &Rc<Target>, op: Op, change: Change) {
    stats::add(Counter::RowsCaptured, 1);
    let limit = guc::MAX_ROWS_PER_XACT.get() as usize;
    XACT.with_borrow_mut(|x| {
        let b = x.buffer(target);
        let bytes = change.before.iter().chain(&change.after).map(Image::heap_bytes).sum::<usize>();
        let event = if x.tracked() >= limit || x.image_bytes + bytes > MAX_IMAGE_BYTES {
            Recorded::Overflow(op)
        } else {
            x.image_bytes += bytes;
            Recorded::Row(change)
        };
        x.push(b, event);
    });
}

/// Makes room for `rows` more changes of `target`'s table (a statement's), up to the
/// per-transaction limit.
pub fn expect_rows(target: &Rc<Target>, rows: usize) {
    let limit = guc::MAX_ROWS_PER_XACT.get() as usize;
    XACT.with_borrow_mut(|x| {
        let b = x.buffer(target);
        let rows = rows.min(limit.saturating_sub(x.tracked()));
        // SAFETY: a plain read of the current transaction's state, which cannot raise an ERROR.
        if unsafe { GetCurrentTransactionNestLevel() } <= 1 {
            x.buffers[b].folded.reserve(rows);
        } else {
            x.tail.reserve(rows);
        }
    });
}

/// Records that `target`'s table was truncated, for subscribers to hear of as `on` says.
pub fn record_truncate(target: &Rc<Target>, on: OnTruncate) {
    XACT.with_borrow_mut(|x| {
        let b = x.buffer(target);
        x.push(b, Recorded::Truncate(on));
    });
}

/// Records a row change of `target`'s table that cannot be listed: subscribers are told to refetch.
pub fn record_overflow(target: &Rc<Target>, op: Op) {
    stats::add(Counter::RowsCaptured, 1);
    XACT.with_borrow_mut(|x| {
        let b = x.buffer(target);
        x.push(b, Recorded::Overflow(op));
    });
}

/// Has the database's worker check whether pgwatch is still installed once this transaction
/// commits.
pub fn check_extension_at_commit() {
    CHECK_EXTENSION.set(true);
}

/// Reserves this transaction's record in the delivery queue when worker delivery applies (always
/// for a retained watch's changes, which the worker writes to the log); `false` means notify
/// inline (the queue is full or has no slot: counted as a fallback).
fn queue_for_worker(xact: &mut Xact) -> bool {
    let retained = xact.buffers.iter().any(|buffer| buffer.target.retained);
    let shared = match guc::DELIVERY.get() {
        Delivery::Inline if !retained => None,
        Delivery::Inline | Delivery::Auto | Delivery::Worker => shmem::shared(),
    };
    let Some(shared) = shared else { return false };
    let Xact { buffers, record, .. } = xact;
    for buffer in buffers.iter() {
        record::encode(record, &buffer.target, &buffer.folded);
    }
    // SAFETY: reading the id of the database this backend is connected to.
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    match shared.reserve(dboid, record) {
        Ok(reservation) => {
            QUEUED.set(Some(reservation));
            QUEUED_TARGETS.with_borrow_mut(|targets| {
                targets.clear();
                targets.extend(buffers.iter().map(|buffer| buffer.target.clone()));
            });
            true
        }
        Err(_) => {
            stats::add(Counter::InlineFallbacks, 1);
            false
        }
    }
}

/// Notes the watches of a transaction notified inline, for its commit to check (see
/// `announce_after_commit`); a database that never queued anything has nothing older to wait for.
/// A retained watch's changes notified inline are not in the log: without a slot to announce the
/// gap through, they are counted and warned about, and whichever slot is claimed next starts
/// with reset markers (see `Shared::unlogged`); until then replay refuses this database.
fn note_inline(xact: &Xact) {
    let Some(shared) = shmem::shared() else { return };
    // SAFETY: reading the id of the database this backend is connected to.
    if shared.find_slot(unsafe { pg_sys::MyDatabaseId }.to_u32()).is_none() {
        let unlogged = xact.buffers.iter().filter(|buffer| buffer.target.retained).count();
        if unlogged > 0 {
            shared.unlogged.store(true, Ordering::Release);
            stats::add(Counter::RetainedUnlogged, 1);
            warning!(
                "pgwatch: changes of {unlogged} retained watches were notified without being logged: no delivery slot is free for this database"
            );
        }
        return;
    }
    INLINE.with_borrow_mut(|inline| inline.extend(xact.buffers.iter().map(|buffer| buffer.target.clone())));
}

/// Once a transaction notified inline has committed: if the database's worker may still hold
/// changes of its channels committed before it, those reach subscribers after this transaction's
/// notifications. Their subscribers are then told to refetch once they are sent (a resync record
/// queued behind them, see `queue::announce`). Whether older changes are held is read from the
/// slot's counters: no lock, no walk of the queue. A retained watch's channel always gets one:
/// what was notified inline is not in its log, and the reset marker takes its place there.
fn announce_after_commit(shared: &Shared) {
    INLINE.with_borrow_mut(|inline| {
        if inline.is_empty() {
            return;
        }
        // SAFETY: reading the id of the database this backend is connected to.
        let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
        let slot = shared.find_slot(dboid);
        let overtaking = || {
            inline
                .iter()
                .filter(|target| slot.is_some_and(|slot| target.retained || slot.may_hold(target.channel.as_bytes())))
        };
        announce_resync(shared, dboid, overtaking);
        inline.clear();
    });
}

/// Queues a resync for the watches `targets` yields (if any) behind what is queued, for
/// `dboid`'s worker to send in turn (see `Shared::announce`).
fn announce_resync<'a, I: Iterator<Item = &'a Rc<Target>>>(shared: &Shared, dboid: u32, targets: impl Fn() -> I) {
    if targets().next().is_none() {
        return;
    }
    let mut record = Vec::new();
    targets().for_each(|target| record::encode_resync(&mut record, target));
    let channels: Vec<&[u8]> = targets().map(|target| target.channel.as_bytes()).collect();
    shared.announce(dboid, &record, &channels);
}

/// Asks the subscribers of `targets` to refetch once this transaction commits, in sequence
/// behind what was queued before it: the watches a prepared transaction committed by this one
/// changed (see `prepared`).
pub fn resync_at_commit(targets: Vec<Rc<Target>>) {
    XACT.with_borrow_mut(|xact| {
        for target in &targets {
            let at = xact.buffer(target);
            xact.buffers[at].folded.mark_resync();
        }
    });
    COMMITTED_PREPARED.with_borrow_mut(|committed| committed.extend(targets));
}

/// Asks the subscribers of `targets` to refetch after this transaction's changes, once it
/// commits: DDL in it changed which rows their tables hold or how they read (see
/// `define::follow`). Recorded like a change, so that a subtransaction rolled back takes it back.
/// Not a gap: on a retained channel the reset marker (reason `ddl`) is in the log like any
/// payload.
pub fn refetch_at_commit(targets: Vec<Rc<Target>>) {
    XACT.with_borrow_mut(|xact| {
        for target in &targets {
            let at = xact.buffer(target);
            xact.push(at, Recorded::Reshape);
        }
    });
}

/// This transaction's changes, to be handed back with `put_back` once sent.
fn take() -> Xact {
    XACT.with_borrow_mut(std::mem::take)
}

/// Empties a taken transaction and keeps it for the next one's memory.
fn put_back(mut xact: Xact) {
    xact.clear();
    XACT.set(xact);
}

/// Forgets this transaction's changes.
fn forget() {
    XACT.with_borrow_mut(Xact::clear);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: XactEvent::Type, _arg: *mut c_void) {
    match event {
        XactEvent::XACT_EVENT_PRE_COMMIT => {
            let mut xact = take();
            xact.fold_tail();
            xact.buffers.retain(|buffer| buffer.folded.has_news());
            notify::resync_shared_channels(
                xact.buffers.iter_mut().map(|b| (b.target.channel.as_c_str(), &mut b.folded)),
            );
            if !xact.buffers.is_empty() && !queue_for_worker(&mut xact) {
                for buffer in &xact.buffers {
                    notify::send_changes(&buffer.target, &buffer.folded, &mut || None, &mut |_| {});
                }
                note_inline(&xact);
            }
            put_back(xact);
        }
        XactEvent::XACT_EVENT_PRE_PREPARE => {
            // A prepared DROP EXTENSION commits in another session, unseen by this flag: the
            // worker's periodic check finds it.
            CHECK_EXTENSION.set(false);
            let mut xact = take();
            xact.fold_tail();
            let rows: usize = xact.buffers.iter().map(|b| b.folded.net_rows().count()).sum();
            let truncates =
                xact.buffers.iter().filter(|b| b.folded.truncated() || b.folded.refetch_after_truncate()).count();
            let announced = prepared::prepare(
                xact.buffers.iter().filter(|b| b.folded.has_news()).map(|b| b.target.clone()).collect(),
            );
            UNSENT_AT_PREPARE.set((rows + truncates > 0).then_some((rows, truncates, announced)));
            put_back(xact);
        }
        XactEvent::XACT_EVENT_PREPARE => {
            prepared::prepared();
            if let Some((rows, truncates, announced)) = UNSENT_AT_PREPARE.take() {
                stats::add(Counter::PreparedUnsent, (rows + truncates) as u64);
                let then = if announced { ": their subscribers are told to refetch when it commits" } else { "" };
                warning!(
                    "pgwatch: {rows} changed rows and {truncates} truncated tables of this prepared transaction will not be notified{then}"
                );
            }
        }
        XactEvent::XACT_EVENT_COMMIT => {
            forget();
            COMMITTED_PREPARED.with_borrow_mut(Vec::clear);
            if let Some(shared) = shmem::shared() {
                if let Some(queued) = QUEUED.take() {
                    if !shared.publish(queued) {
                        // Passed over while it committed: its changes were not sent, and later
                        // ones may have been; its subscribers refetch behind them.
                        stats::add(Counter::PassedOver, 1);
                        // SAFETY: reading the id of the database this backend is connected to.
                        let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
                        QUEUED_TARGETS.with_borrow(|targets| announce_resync(shared, dboid, || targets.iter()));
                    }
                }
                announce_after_commit(shared);
                if CHECK_EXTENSION.take() {
                    // SAFETY: reading the id of the database this backend is connected to.
                    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
                    shared.find_slot(dboid).inspect(|slot| slot.request_extension_check());
                }
            }
            stats::flush();
        }
        XactEvent::XACT_EVENT_ABORT | XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            forget();
            prepared::abandon();
            UNSENT_AT_PREPARE.set(None);
            INLINE.with_borrow_mut(Vec::clear);
            CHECK_EXTENSION.set(false);
            if let (Some(queued), Some(shared)) = (QUEUED.take(), shmem::shared()) {
                shared.cancel(queued);
            }
            let committed = COMMITTED_PREPARED.take();
            if let (false, Some(shared)) = (committed.is_empty(), shmem::shared()) {
                // SAFETY: reading the id of the database this backend is connected to.
                let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
                // A database notified inline until now gets a worker for it.
                if shared.claim_slot(dboid).is_some() {
                    announce_resync(shared, dboid, || committed.iter());
                } else {
                    let channels: Vec<_> = committed.iter().map(|t| t.channel.to_string_lossy()).collect();
                    warning!(
                        "pgwatch: the prepared transaction this one committed is not announced on {} (every database's delivery slot is taken): their subscribers must refetch",
                        channels.join(", ")
                    );
                }
            }
            stats::flush();
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: SubXactEvent::Type,
    subxact: SubTransactionId,
    _parent: SubTransactionId,
    _arg: *mut c_void,
) {
    if event == SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        XACT.with_borrow_mut(|x| x.roll_back_to(subxact));
    }
}

/// Hooks the buffer into every transaction of this backend (once, when the library loads).
pub fn register_callbacks() {
    // SAFETY: registering plain functions with no argument; PostgreSQL keeps them for the
    // backend's lifetime, as long as this library stays loaded (it is never unloaded).
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}
