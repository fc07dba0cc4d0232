//! The ring of the delivery queue: reserving, publishing, collecting and freeing records.
//!
//! At pre-commit a transaction's net changes are encoded into one record and space is reserved
//! for it in a byte ring; at commit the record is published and its database's delivery worker is
//! woken; at abort it is dropped. The worker copies published records out, sends them in its own
//! transaction, and only then marks them done, so a worker that dies loses nothing. Records are
//! 32-byte aligned and never wrap: the end of the ring is skipped with a padding record.
//!
//! Committing writers take no lock: a reservation moves the head with a compare-and-swap, then
//! writes the record's header, which readers take as valid only once its `at` matches its place
//! (until then the ring is read up to it). The lock is for the workers: finding records and
//! freeing done ones at the tail (a writer takes it only when the ring looks full).
//!
//! A worker stops at its database's oldest reserved record, and the ring's tail at the oldest
//! record of any database. A transaction that reserved its record and then does not finish
//! committing (waiting on a lock held elsewhere, as its temporary tables are emptied at commit,
//! say) would hold up delivery for everyone: after [`pass_after`] its worker passes it over,
//! taking the record back (see [`Shared::pass`]); the transaction, once it commits, has its
//! subscribers refetch instead. Which of the two a reservation goes to, its writer or the worker,
//! is settled by one compare-and-swap on the writer's entry in `Shared::pending`, never by the
//! record itself, whose space the writer no longer touches once it was passed.

use std::mem::size_of;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use pgrx::pg_sys;

use super::shmem::{Locked, Shared, ALIGN, MAX_PROCS};
use super::slots::{bucket, set_latch, DbSlot, DATABASE_SHARE};

/// How long a worker waits for a reserved record (a transaction between its pre-commit and its
/// commit) before it passes it over: `pgwatch.stuck_commit_timeout`. A commit takes that long
/// only when it waits: on a lock, on a synchronous standby, on a disk that has stalled.
pub fn pass_after() -> std::time::Duration {
    std::time::Duration::from_millis(crate::guc::STUCK_COMMIT_TIMEOUT_MS.get().max(1) as u64)
}

/// The record that keeps a worker (or the launcher, at the ring's tail) waiting, and since when
/// it has: a reservation, or at the tail a published record no worker takes.
#[derive(Default)]
pub struct Stuck(Option<(u64, std::time::Instant)>);

impl Stuck {
    /// Takes in where the reservation waited for now starts (`None`: none is); returns it once
    /// the same one has been waited for [`pass_after`], to be passed over.
    pub fn due(&mut self, waiting: Option<u64>) -> Option<u64> {
        self.due_after(waiting, pass_after())
    }

    /// As [`Self::due`], once the same one has been waited for `after`.
    pub fn due_after(&mut self, waiting: Option<u64>, after: std::time::Duration) -> Option<u64> {
        match (waiting, self.0) {
            (None, _) => {
                self.0 = None;
                None
            }
            (Some(at), Some((seen, since))) if seen == at => (since.elapsed() >= after).then(|| {
                self.0 = None;
                at
            }),
            (Some(at), _) => {
                self.0 = Some((at, std::time::Instant::now()));
                None
            }
        }
    }

    /// Whether a reservation is being waited for.
    pub fn is_waiting(&self) -> bool {
        self.0.is_some()
    }
}

const RESERVED: u32 = 1;

const PUBLISHED: u32 = 2;

const DONE: u32 = 3;

const PADDING: u32 = 4;

#[repr(C)]
struct RecordHeader {
    /// The record's position + 1, stored last: a header whose `at` does not match its place is
    /// still being written. Freed space has it zeroed (see `advance_tail`), so neither an earlier
    /// lap's header nor leftover record bytes can match.
    at: AtomicU64,
    state: AtomicU32,
    /// The whole record with header and padding, a multiple of ALIGN.
    len: AtomicU32,
    dboid: AtomicU32,
    body_len: AtomicU32,
    /// The process number of the backend that reserved it (see `Shared::pending`).
    owner: AtomicU32,
}

const HEADER: usize = size_of::<RecordHeader>();

const _: () = assert!(HEADER <= ALIGN);

/// A record reserved at pre-commit, to publish at commit or drop at abort.
pub struct Reservation {
    at: u64,
    slot: usize,
    /// The reserving backend's process number: its entry in `Shared::pending`.
    owner: usize,
}

/// What `Shared::pending` holds for a reservation at `at` while its writer may still publish it
/// or drop it; once the worker passed it over, [`passed`]; 0 for none.
fn reserved(at: u64) -> u64 {
    at + 1
}

fn passed(at: u64) -> u64 {
    at + 2
}

/// This backend's process number, its index in `Shared::pending`.
fn my_proc_number() -> usize {
    // SAFETY: reading this backend's own process number, set before any transaction runs.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let number = unsafe { pg_sys::MyProcNumber };
    // SAFETY: as above; every backend that runs transactions has its PGPROC.
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    let number = unsafe { (*pg_sys::MyProc).pgprocno };
    usize::try_from(number).unwrap_or(usize::MAX)
}

/// Why a transaction could not be queued (it is then notified inline).
#[derive(Debug)]
pub enum NotQueued {
    /// The ring has no room for the record.
    Full,
    /// Every database slot is taken, or this database is being dropped.
    NoSlot,
}

impl Shared {
    /// The record starting at ring position `at`.
    fn record(&self, at: u64) -> *mut u8 {
        // SAFETY: the ring follows this struct in the same allocation, and record positions are
        // ALIGN-aligned offsets inside it.
        unsafe { std::ptr::from_ref(self).cast_mut().add(1).cast::<u8>().add((at % self.capacity) as usize) }
    }

    fn header(&self, at: u64) -> &RecordHeader {
        // SAFETY: a header always fits before the end of the ring (records never wrap), and its
        // fields are written before the head moves past it.
        unsafe { &*self.record(at).cast::<RecordHeader>() }
    }

    /// Bytes in use, for the high-water mark.
    fn used(&self) -> u64 {
        let tail = self.tail.load(Ordering::Acquire);
        self.head.load(Ordering::Acquire).saturating_sub(tail)
    }

    /// The header at `at`, once its writer has finished it.
    fn written_header(&self, at: u64) -> Option<&RecordHeader> {
        let header = self.header(at);
        (header.at.load(Ordering::Acquire) == at + 1).then_some(header)
    }

    /// Visits the records from the tail on, oldest first, until `visit` returns `false` or the
    /// head is reached; `false` when a header still being written stopped the walk instead.
    fn walk(&self, _locked: &Locked<'_>, mut visit: impl FnMut(u64, &RecordHeader) -> bool) -> bool {
        let (mut at, head) = (self.tail.load(Ordering::Relaxed), self.head.load(Ordering::Acquire));
        while at < head {
            let Some(header) = self.written_header(at) else { return false };
            if !visit(at, header) {
                break;
            }
            at += header.len();
        }
        true
    }

    /// Frees the records at the tail that are done.
    fn advance_tail(&self, exclusive: &Locked<'_>) {
        let old_tail = self.tail.load(Ordering::Relaxed);
        let mut tail = old_tail;
        self.walk(exclusive, |at, header| {
            let done = matches!(header.state.load(Ordering::Acquire), DONE | PADDING);
            if done {
                tail = at + header.len();
            }
            done
        });
        // Every place a header may start in the freed space gets `at` zeroed, so that a reader
        // meeting a claimed header not yet written never takes record bytes for a valid one.
        for at in (old_tail..tail).step_by(ALIGN) {
            self.header(at).at.store(0, Ordering::Relaxed);
        }
        // Release: a writer that sees the new tail reuses the space after every read of it.
        self.tail.store(tail, Ordering::Release);
    }

    /// The slot of `dboid`, taking a free one if it has none.
    fn slot_of(&self, dboid: u32, _exclusive: &Locked<'_>) -> Option<usize> {
        if let Some(i) = self.find_slot_index(dboid) {
            return Some(i);
        }
        let free = self.slots.iter().position(|s| s.dboid.load(Ordering::Relaxed) == 0)?;
        let slot = &self.slots[free];
        slot.backlog.store(0, Ordering::Relaxed);
        slot.last_send.store(0, Ordering::Relaxed);
        slot.recheck_extension.store(false, Ordering::Relaxed);
        slot.resync_after.store(0, Ordering::Relaxed);
        slot.resync_buckets.iter().for_each(|bits| bits.store(0, Ordering::Relaxed));
        slot.resync_inflight.iter().for_each(|bits| bits.store(0, Ordering::Relaxed));
        slot.unsent_bytes.store(0, Ordering::Relaxed);
        slot.unsent_channels.iter().for_each(|count| count.store(0, Ordering::Relaxed));
        slot.held_by.store(0, Ordering::Relaxed);
        let clean = self.started_clean.load(Ordering::Relaxed) && !self.unlogged.load(Ordering::Acquire);
        slot.feeds_ready.store(clean, Ordering::Relaxed);
        slot.worker_wanted.store(false, Ordering::Relaxed);
        // Release: writers find the slot without the lock, and must see it reset.
        slot.dboid.store(dboid, Ordering::Release);
        Some(free)
    }

    /// The slot of `dboid`, taking a free one if it has none; `None` when every slot is taken.
    pub fn claim_slot(&self, dboid: u32) -> Option<&DbSlot> {
        let index = match self.find_slot_index(dboid) {
            Some(index) => index,
            None => self.slot_of(dboid, &self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE))?,
        };
        Some(&self.slots[index])
    }

    /// Reserves room for `body` and copies it in, unpublished. A record larger than half the
    /// ring, or one that would give its database more than its share, does not go in.
    pub fn reserve(&self, dboid: u32, body: &[u8]) -> Result<Reservation, NotQueued> {
        let len = (HEADER + body.len()).div_ceil(ALIGN) * ALIGN;
        let owner = my_proc_number();
        if owner >= MAX_PROCS {
            return Err(NotQueued::NoSlot);
        }
        let slot = match self.find_slot_index(dboid) {
            Some(slot) => slot,
            None => self.slot_of(dboid, &self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE)).ok_or(NotQueued::NoSlot)?,
        };
        if self.slots[slot].is_held() {
            return Err(NotQueued::NoSlot);
        }
        let share = self.capacity / DATABASE_SHARE.1 * DATABASE_SHARE.0;
        if len as u64 > self.capacity / 2 || self.slots[slot].unsent_bytes.load(Ordering::Acquire) + len as u64 > share
        {
            return Err(NotQueued::Full);
        }
        let at = match self.claim(len as u64) {
            Some(at) => at,
            None => {
                // Full as far as this writer can tell: free what workers have finished, then retry.
                self.advance_tail(&self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE));
                self.claim(len as u64).ok_or(NotQueued::Full)?
            }
        };
        self.slots[slot].count_unsent(len as u64, body, true);
        // SAFETY: the claimed space is this backend's alone until its header is written, and it
        // has room for the body after the header.
        unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), self.record(at).add(HEADER), body.len()) };
        // Before the header: a worker that finds the record reserved finds this entry too.
        self.pending[owner].store(reserved(at), Ordering::Release);
        self.header(at).write(at, len as u32, dboid, body.len() as u32, RESERVED, owner as u32);
        self.high_water.fetch_max(self.used(), Ordering::Relaxed);
        Ok(Reservation { at, slot, owner })
    }

    /// The body of the record at `at`.
    ///
    /// # Safety
    /// The record must be written and not freed while the slice is used.
    unsafe fn body(&self, at: u64) -> &[u8] {
        let len = self.header(at).body_len();
        // SAFETY: as the caller promised; the body follows the header.
        unsafe { std::slice::from_raw_parts(self.record(at).add(HEADER), len) }
    }

    /// Marks the record at `at` done, and no longer counted as not sent.
    fn done(&self, slot: &DbSlot, at: u64) {
        // SAFETY: the record is still the caller's (reserved, or published and being finished):
        // its space is not freed before it is marked done below.
        slot.count_unsent(self.header(at).len(), unsafe { self.body(at) }, false);
        self.header(at).state.store(DONE, Ordering::Release);
    }

    /// Moves the head past `len` bytes of free ring space (and the end of the ring when they do
    /// not fit before it, leaving a padding record there); `None` when the ring lacks the room.
    fn claim(&self, len: u64) -> Option<u64> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let to_end = self.capacity - head % self.capacity;
            let skip = if len > to_end { to_end } else { 0 };
            // Acquire: the space freed up to the tail was last read before the tail moved past it.
            // A tail read late only ever shows more room than one read early.
            let tail = self.tail.load(Ordering::Acquire);
            if self.capacity - head.saturating_sub(tail) < skip + len {
                return None;
            }
            match self.head.compare_exchange_weak(head, head + skip + len, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if skip > 0 {
                        self.header(head).write(head, skip as u32, 0, 0, PADDING, 0);
                    }
                    return Some(head + skip);
                }
                Err(moved) => head = moved,
            }
        }
    }

    /// Takes a reservation back from the worker: `false` when the worker passed it over (see
    /// [`Shared::pass`]), and its space is no longer the writer's.
    fn settle(&self, reservation: &Reservation) -> bool {
        let entry = &self.pending[reservation.owner];
        let settled = entry.compare_exchange(reserved(reservation.at), 0, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if !settled {
            entry.store(0, Ordering::Release);
        }
        settled
    }

    /// Hands a reserved record to its database's worker and wakes it (or the launcher); `false`
    /// when the worker passed it over while this transaction was committing (its subscribers are
    /// then to refetch). Cannot fail.
    pub fn publish(&self, reservation: Reservation) -> bool {
        if !self.settle(&reservation) {
            return false;
        }
        self.header(reservation.at).state.store(PUBLISHED, Ordering::Release);
        self.published(reservation.slot);
        true
    }

    /// Counts a published record and wakes its database's worker (or the launcher).
    fn published(&self, slot: usize) {
        let slot = &self.slots[slot];
        slot.backlog.fetch_add(1, Ordering::Relaxed);
        slot.wake();
        if slot.pid.load(Ordering::Relaxed) == 0 {
            set_latch(&self.launcher_latch);
        }
    }

    /// Drops a reserved record of a transaction that aborted (unless the worker passed it over
    /// and dropped it already). Cannot fail. The worker is woken: it stops at a reserved record
    /// (see [`Shared::collect`]), and may wait behind this one.
    pub fn cancel(&self, reservation: Reservation) {
        if !self.settle(&reservation) {
            return;
        }
        let slot = &self.slots[reservation.slot];
        self.done(slot, reservation.at);
        slot.wake();
    }

    /// Passes over the record of `slot`'s database reserved at `at`, whose transaction has been
    /// committing for [`pass_after`] (see the module's introduction): drops it, so that the
    /// records behind it can be sent and its space freed. `false` when its writer settled it
    /// first (it is published or dropped in a moment). The writer, once committed, has the
    /// subscribers of its watches refetch, behind what was queued by then.
    pub fn pass(&self, slot: &DbSlot, at: u64) -> bool {
        let Some(header) = self.written_header(at) else { return false };
        if header.state.load(Ordering::Acquire) != RESERVED {
            return false;
        }
        let Some(entry) = self.pending.get(header.owner.load(Ordering::Relaxed) as usize) else { return false };
        if entry.compare_exchange(reserved(at), passed(at), Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        self.done(slot, at);
        self.advance_tail(&self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE));
        true
    }

    /// Queues `body`, a committed transaction's resync record (see [`encode_resync`]) for
    /// `channels`, behind every record reserved before it, for `dboid`'s worker to send in turn.
    /// Called at commit: takes no lock and cannot fail. Without room in the ring, the worker is
    /// asked instead to tell those of `channels` it knows, once the records before this point are
    /// sent.
    pub fn announce(&self, dboid: u32, body: &[u8], channels: &[&[u8]]) {
        let Some(slot_index) = self.find_slot_index(dboid) else { return };
        let slot = &self.slots[slot_index];
        let len = (HEADER + body.len()).div_ceil(ALIGN) * ALIGN;
        match self.claim(len as u64) {
            Some(at) => {
                slot.count_unsent(len as u64, body, true);
                // SAFETY: as in reserve(): the claimed space is this backend's until its header
                // is written, published at once.
                unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), self.record(at).add(HEADER), body.len()) };
                self.header(at).write(at, len as u32, dboid, body.len() as u32, PUBLISHED, my_proc_number() as u32);
                self.published(slot_index);
            }
            None => {
                for channel in channels {
                    let bucket = bucket(channel);
                    slot.resync_buckets[bucket / 64].fetch_or(1 << (bucket % 64), Ordering::AcqRel);
                }
                slot.resync_after.fetch_max(self.head.load(Ordering::Acquire) + 1, Ordering::AcqRel);
                slot.wake();
                if slot.pid.load(Ordering::Relaxed) == 0 {
                    set_latch(&self.launcher_latch);
                }
            }
        }
    }

    /// The oldest record not done: where it starts, its database, and whether it is still a
    /// reservation (else published).
    pub fn at_tail(&self) -> Option<(u64, u32, bool)> {
        let mut found = None;
        self.walk(&self.lock(pg_sys::LWLockMode::LW_SHARED), |at, header| match header.state.load(Ordering::Acquire) {
            DONE | PADDING => true,
            state => {
                found = Some((at, header.dboid(), state == RESERVED));
                false
            }
        });
        found
    }

    /// Whether a record of `dboid` that starts before ring position `before` is still to be sent
    /// (reserved or published, not yet done).
    pub fn unsent_before(&self, dboid: u32, before: u64) -> bool {
        let mut unsent = false;
        let complete = self.walk(&self.lock(pg_sys::LWLockMode::LW_SHARED), |at, header| {
            if at >= before {
                return false;
            }
            unsent |= header.dboid() == dboid && matches!(header.state.load(Ordering::Acquire), RESERVED | PUBLISHED);
            !unsent
        });
        // A header still being written before `before` may be this database's.
        unsent || (!complete && self.tail.load(Ordering::Acquire) < before)
    }

    /// Copies published records of `dboid` into `batch`, oldest first, up to about `max_bytes`;
    /// `false` when a header still being written stopped it first.
    ///
    /// It stops at a record of `dboid` still reserved: that transaction may have committed (it
    /// publishes just after), and a later one may already have changed the same rows; sending the
    /// later one first would leave subscribers with the older values.
    ///
    /// Only finding them holds the lock: a published record keeps its place until its database's
    /// worker (the caller) marks it done.
    pub fn collect(&self, dboid: u32, max_bytes: usize, batch: &mut Batch) -> bool {
        batch.clear(4 * max_bytes);
        let mut bytes = 0;
        let complete = self.walk(&self.lock(pg_sys::LWLockMode::LW_SHARED), |at, header| {
            if bytes >= max_bytes {
                return false;
            }
            if header.dboid() == dboid {
                match header.state.load(Ordering::Acquire) {
                    PUBLISHED => {
                        bytes += header.body_len();
                        batch.positions.push(at);
                        batch.ends.push(bytes);
                    }
                    RESERVED => {
                        batch.blocked = Some(at);
                        return false;
                    }
                    _ => {}
                }
            }
            true
        });
        batch.bodies.reserve(bytes);
        let mut start = 0;
        for (&at, &end) in batch.positions.iter().zip(&batch.ends) {
            // SAFETY: a published record's body is complete and no longer written, and it stays
            // in place until this worker marks it done (see above).
            let body = unsafe { std::slice::from_raw_parts(self.record(at).add(HEADER), end - start) };
            batch.bodies.extend_from_slice(body);
            start = end;
        }
        complete
    }

    /// Marks delivered records done and frees what it can.
    pub fn finish(&self, slot: &DbSlot, delivered: &[u64]) {
        for &at in delivered {
            self.done(slot, at);
        }
        slot.backlog.fetch_sub(delivered.len() as u64, Ordering::Relaxed);
        let exclusive = self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
        self.advance_tail(&exclusive);
    }

    /// Drops the published records of `dboid`, whose worker cannot start (see `launcher`), so
    /// that they stop holding the ring's tail, and with it every database's delivery: once a
    /// worker of the database runs again, it tells the channels of all its watches to refetch
    /// (see `worker::resync_if_due`). Returns how many were dropped.
    pub fn abandon(&self, dboid: u32) -> u64 {
        let Some(slot) = self.find_slot(dboid) else { return 0 };
        let exclusive = self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut dropped = Vec::new();
        self.walk(&exclusive, |at, header| {
            if header.dboid() == dboid && header.state.load(Ordering::Acquire) == PUBLISHED {
                dropped.push(at);
            }
            true
        });
        for &at in &dropped {
            self.done(slot, at);
        }
        slot.backlog.fetch_sub(dropped.len() as u64, Ordering::Relaxed);
        self.advance_tail(&exclusive);
        if !dropped.is_empty() {
            slot.resync_buckets.iter().for_each(|bits| bits.store(u64::MAX, Ordering::Release));
            slot.resync_after.fetch_max(self.head.load(Ordering::Acquire) + 1, Ordering::AcqRel);
        }
        dropped.len() as u64
    }

    /// Drops every record of `dboid` and frees its slot (its database is gone). A header still
    /// being written (by a writer of another database) is waited for without the lock held.
    pub fn forget_database(&self, dboid: u32) {
        loop {
            let exclusive = self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
            let complete = self.walk(&exclusive, |_, header| {
                if header.dboid() == dboid && header.state.load(Ordering::Acquire) == PUBLISHED {
                    header.state.store(DONE, Ordering::Release);
                }
                true
            });
            if complete {
                self.advance_tail(&exclusive);
                for channel in self.channels.iter().filter(|c| c.dboid.load(Ordering::Relaxed) == dboid) {
                    channel.dboid.store(0, Ordering::Relaxed);
                }
                if let Some(slot) = self.find_slot(dboid) {
                    slot.dboid.store(0, Ordering::Relaxed);
                }
                return;
            }
            drop(exclusive);
            // SAFETY: a plain sleep, with no lock held.
            unsafe { pg_sys::pg_usleep(100) };
        }
    }
}

impl RecordHeader {
    /// Fills in the header of ring space at `at` that the caller claimed; readers take it as
    /// written once `at` is stored, last, with release ordering.
    fn write(&self, at: u64, len: u32, dboid: u32, body_len: u32, state: u32, owner: u32) {
        self.len.store(len, Ordering::Relaxed);
        self.dboid.store(dboid, Ordering::Relaxed);
        self.body_len.store(body_len, Ordering::Relaxed);
        self.state.store(state, Ordering::Relaxed);
        self.owner.store(owner, Ordering::Relaxed);
        self.at.store(at + 1, Ordering::Release);
    }

    fn len(&self) -> u64 {
        u64::from(self.len.load(Ordering::Relaxed))
    }

    fn dboid(&self) -> u32 {
        self.dboid.load(Ordering::Relaxed)
    }

    fn body_len(&self) -> usize {
        self.body_len.load(Ordering::Relaxed) as usize
    }
}

/// Records copied out of the ring for one worker transaction. The worker keeps one for good, so
/// that copying records out allocates nothing once it has grown to its usual size.
#[derive(Default)]
pub struct Batch {
    /// Each record's place in the ring, to mark it done once sent.
    positions: Vec<u64>,
    /// Where each record's body ends in `bodies`.
    ends: Vec<usize>,
    bodies: Vec<u8>,
    /// The reserved record of the database that stopped the collection, if one did.
    blocked: Option<u64>,
}

impl Batch {
    /// Empties the batch. Its buffers stay unless a huge record grew the body buffer past `limit`
    /// bytes: a batch cut at `max_bytes` holds up to about twice that, and a growing buffer doubles.
    fn clear(&mut self, limit: usize) {
        self.positions.clear();
        self.ends.clear();
        clear_keeping(&mut self.bodies, limit);
        self.blocked = None;
    }

    /// Where the reserved record that stopped the collection starts, if one did.
    pub fn blocked(&self) -> Option<u64> {
        self.blocked
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// The number of records (each one committed transaction's changes).
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// The bytes of all bodies: what the batch's size limit counts.
    pub fn bytes(&self) -> usize {
        self.bodies.len()
    }

    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// The record bodies, oldest first.
    pub fn bodies(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(start, &end)| &self.bodies[start..end])
    }
}

/// Empties `items`, keeping its memory unless it grew past `kept` of them.
pub fn clear_keeping<T>(items: &mut Vec<T>, kept: usize) {
    items.clear();
    if items.capacity() > kept {
        *items = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_hands_out_each_body_whole_and_in_order() {
        let mut batch = Batch::default();
        assert_eq!(batch.bodies().count(), 0);
        for (at, body) in [(64, &b"first"[..]), (96, b""), (128, b"third")] {
            batch.bodies.extend_from_slice(body);
            batch.positions.push(at);
            batch.ends.push(batch.bodies.len());
        }
        assert_eq!(batch.bodies().collect::<Vec<_>>(), [&b"first"[..], b"", b"third"]);
        assert_eq!((batch.len(), batch.bytes(), batch.positions()), (3, 10, &[64, 96, 128][..]));
        batch.clear(16);
        assert!(batch.is_empty() && batch.bodies().next().is_none() && batch.bodies.capacity() >= 10);
    }
}
