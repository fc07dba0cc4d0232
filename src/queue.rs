//! The shared-memory delivery queue (needs `shared_preload_libraries = 'pgwatch'`).
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
//! Beside the ring the segment holds one slot per database (its worker and backlog), the last
//! sequence number of each channel, and the cluster-wide counters.

use std::ffi::CString;
use std::mem::size_of;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::OnceLock;

use pgrx::pg_sys;

use crate::coalesce::{Change, Folded};
use crate::guc;
use crate::notify::Target;
use crate::payload::{Image, Op, MAX_CHANNEL, MAX_COLS_HEADER, MAX_TABLE_NAME};
use crate::stats::COUNTERS;
use crate::xact::clear_keeping;

/// Databases that can use worker delivery at once; others are notified inline.
pub const MAX_DATABASES: usize = 64;
/// Channels whose sequence numbers are kept in shared memory (and so survive worker restarts).
pub const MAX_CHANNELS: usize = 4096;
/// How many of them one database may use.
pub const MAX_CHANNELS_PER_DATABASE: usize = MAX_CHANNELS / 4;
/// Record alignment: every aligned place has room for a header, even right before the ring's end.
const ALIGN: usize = 32;

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
}

const HEADER: usize = size_of::<RecordHeader>();
const _: () = assert!(HEADER <= ALIGN);

/// What a database's delivery worker is doing, as `pgwatch.workers` shows it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum WorkerState {
    Stopped = 0,
    Starting = 1,
    Idle = 2,
    Sending = 3,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Stopped => "stopped",
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Sending => "sending",
        }
    }
}

/// One database using worker delivery.
#[repr(C)]
pub struct DbSlot {
    /// 0 when the slot is free.
    pub dboid: AtomicU32,
    /// The worker's pid, 0 when none runs.
    pub pid: AtomicI32,
    /// The worker's latch, 0 when none runs.
    latch: AtomicUsize,
    state: AtomicU32,
    /// Published records not yet delivered.
    pub backlog: AtomicU64,
    /// When the worker last committed notifications (TimestampTz; 0 = never).
    pub last_send: AtomicI64,
    /// DROP DATABASE is under way: no worker may start.
    pub dropping: AtomicBool,
    /// A DROP EXTENSION committed in the database: its worker is to check whether pgwatch is
    /// still installed (and exit if not).
    recheck_extension: AtomicBool,
    /// A transaction notified inline when its resync record found no room: once every record
    /// reserved before this ring position (+ 1; 0 = none) is sent, the worker tells the channels
    /// it knows in `resync_buckets` to refetch.
    resync_after: AtomicU64,
    /// Channel buckets (see [`bucket`]) of the channels `resync_after` is for, one bit each.
    resync_buckets: [AtomicU64; BUCKETS / 64],
    /// Bytes of this database's records in the ring that are not sent yet (reserved or
    /// published): a database may hold at most [`DATABASE_SHARE`] of the ring.
    unsent_bytes: AtomicU64,
    /// Per channel bucket, how many of this database's records not sent yet have changes on a
    /// channel of that bucket: whether a transaction notified inline may overtake older ones.
    unsent_channels: [AtomicU32; BUCKETS],
}

/// Channel buckets of a database slot: a channel's changes are counted under its hash's bucket,
/// so that a commit finds out without a lock or a walk of the ring whether older changes of its
/// channels are still queued (two channels share a bucket at most rarely, which only costs a
/// resync notice that was not needed).
const BUCKETS: usize = 1024;

/// How much of the ring one database's records not sent yet may take: the rest is always left
/// to the other databases.
const DATABASE_SHARE: (u64, u64) = (3, 4);

fn bucket(channel: &[u8]) -> usize {
    (channel_hash(channel) % BUCKETS as u64) as usize
}

/// Whether `channel`'s bucket is among `buckets` (see [`DbSlot::take_resync`]).
pub fn in_buckets(buckets: &[u64; BUCKETS / 64], channel: &[u8]) -> bool {
    let bucket = bucket(channel);
    buckets[bucket / 64] & (1 << (bucket % 64)) != 0
}

impl DbSlot {
    pub fn state(&self) -> WorkerState {
        match self.state.load(Ordering::Relaxed) {
            1 => WorkerState::Starting,
            2 => WorkerState::Idle,
            3 => WorkerState::Sending,
            _ => WorkerState::Stopped,
        }
    }

    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u32, Ordering::Relaxed);
    }

    /// Called by the worker once it runs: from now on commits wake it directly. `false` when
    /// another worker of the database is attached: only one may copy out and finish its records.
    pub fn attach_worker(&self) -> bool {
        // SAFETY: reading this process's pid.
        let pid = unsafe { pg_sys::MyProcPid };
        if self.pid.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }
        // SAFETY: MyProc and its latch live in shared memory for the whole life of this process.
        let latch = unsafe { std::ptr::addr_of_mut!((*pg_sys::MyProc).procLatch) } as usize;
        self.latch.store(latch, Ordering::Release);
        self.set_state(WorkerState::Idle);
        true
    }

    /// Wakes the worker, if one runs.
    pub fn wake(&self) {
        set_latch(&self.latch);
    }

    /// Has the worker check whether pgwatch is still installed, after a DROP EXTENSION.
    pub fn request_extension_check(&self) {
        self.recheck_extension.store(true, Ordering::Release);
        self.wake();
    }

    /// Whether a check was requested since the last call.
    pub fn extension_check_requested(&self) -> bool {
        self.recheck_extension.swap(false, Ordering::AcqRel)
    }

    /// The ring position (+ 1) before which records must be sent before every channel is told
    /// to refetch (see `resync_after`); 0 when none is due.
    pub fn resync_due_after(&self) -> u64 {
        self.resync_after.load(Ordering::Acquire)
    }

    /// Takes the channel buckets the resync due after `after` is for, and marks it done; `None`
    /// when a later one was asked for meanwhile (its buckets are left for it, with these).
    pub fn take_resync(&self, after: u64) -> Option<[u64; BUCKETS / 64]> {
        let buckets = self.resync_buckets.each_ref().map(|bits| bits.swap(0, Ordering::AcqRel));
        if self.resync_after.compare_exchange(after, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            return Some(buckets);
        }
        for (bits, taken) in self.resync_buckets.iter().zip(buckets) {
            bits.fetch_or(taken, Ordering::AcqRel);
        }
        None
    }

    /// Whether a record not sent yet may have changes on `channel`.
    pub fn may_hold(&self, channel: &[u8]) -> bool {
        self.unsent_channels[bucket(channel)].load(Ordering::Acquire) > 0
    }

    /// Counts (`up`) or stops counting a record of `len` bytes with body `body` as not sent yet.
    fn count_unsent(&self, len: u64, body: &[u8], up: bool) {
        if up {
            self.unsent_bytes.fetch_add(len, Ordering::AcqRel);
        } else {
            self.unsent_bytes.fetch_sub(len, Ordering::AcqRel);
        }
        for watch in decode(body) {
            let counter = &self.unsent_channels[bucket(watch.channel)];
            if up {
                counter.fetch_add(1, Ordering::AcqRel);
            } else {
                counter.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Called as the attached worker exits, however it exits.
    pub fn detach_worker(&self) {
        self.latch.store(0, Ordering::Release);
        self.set_state(WorkerState::Stopped);
        self.pid.store(0, Ordering::Release);
    }
}

/// The last sequence number of one channel of one database. The channel is kept whole (the hash
/// only speeds up the search), so that no two channels can share a number, whatever their names.
/// Written under the exclusive lock, read under the shared one.
#[repr(C)]
struct ChannelSeq {
    dboid: AtomicU32,
    len: AtomicU32,
    hash: AtomicU64,
    seq: AtomicU64,
    name: [AtomicU8; MAX_CHANNEL],
}

impl ChannelSeq {
    fn is(&self, dboid: u32, hash: u64, channel: &[u8]) -> bool {
        self.dboid.load(Ordering::Relaxed) == dboid
            && self.hash.load(Ordering::Relaxed) == hash
            && self.len.load(Ordering::Relaxed) as usize == channel.len()
            && self.name.iter().zip(channel).all(|(stored, &b)| stored.load(Ordering::Relaxed) == b)
    }
}

#[repr(C)]
pub struct Shared {
    lock: AtomicPtr<pg_sys::LWLock>,
    capacity: u64,
    /// Byte positions since start: the ring holds [tail, head).
    head: AtomicU64,
    tail: AtomicU64,
    pub high_water: AtomicU64,
    launcher_latch: AtomicUsize,
    pub slots: [DbSlot; MAX_DATABASES],
    channels: [ChannelSeq; MAX_CHANNELS],
    pub counters: [AtomicU64; COUNTERS],
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
static PREV_SHMEM_STARTUP: OnceLock<pg_sys::shmem_startup_hook_type> = OnceLock::new();
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static PREV_SHMEM_REQUEST: OnceLock<pg_sys::shmem_request_hook_type> = OnceLock::new();

const NAME: &std::ffi::CStr = c"pgwatch";

fn ring_bytes() -> usize {
    (guc::QUEUE_SIZE_KB.get() as usize * 1024) / ALIGN * ALIGN
}

fn segment_size() -> usize {
    size_of::<Shared>() + ring_bytes()
}

/// The shared segment, once this backend has it (only when pgwatch is preloaded).
pub fn shared() -> Option<&'static Shared> {
    // SAFETY: set once in the postmaster before any backend forks, to memory that lives until
    // the postmaster exits; all fields are atomics or written before publication.
    unsafe { SHARED.load(Ordering::Acquire).as_ref() }
}

/// Asks for the segment and its lock; called from `_PG_init` while preloading.
pub fn init() {
    // SAFETY: hooks are installed by the postmaster while it loads preloaded libraries, single-threaded.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        request();
        // PG 15 moved shared memory requests into a hook that runs after every library is loaded.
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            PREV_SHMEM_REQUEST.get_or_init(|| pg_sys::shmem_request_hook);
            pg_sys::shmem_request_hook = Some(on_shmem_request);
        }
        PREV_SHMEM_STARTUP.get_or_init(|| pg_sys::shmem_startup_hook);
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
    }
}

/// # Safety
/// Only while shared memory is being requested.
unsafe fn request() {
    // SAFETY: as the caller promised.
    unsafe {
        pg_sys::RequestAddinShmemSpace(segment_size());
        pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_shmem_request() {
    // SAFETY: chained hook call, then our request, while shared memory is being sized.
    unsafe {
        if let Some(Some(prev)) = PREV_SHMEM_REQUEST.get() {
            prev();
        }
        request();
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    // SAFETY: chained hook call; the segment is created (or found) under AddinShmemInitLock and
    // zero-initialised, which is a valid state for every field (all atomics), before publication.
    unsafe {
        if let Some(Some(prev)) = PREV_SHMEM_STARTUP.get() {
            prev();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(NAME.as_ptr(), segment_size(), &mut found).cast::<Shared>();
        assert!(shared.is_aligned(), "shared memory is not aligned");
        if !found {
            std::ptr::write_bytes(shared.cast::<u8>(), 0, segment_size());
            (*shared).capacity = ring_bytes() as u64;
            (*shared).lock.store(&raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock, Ordering::Relaxed);
        }
        SHARED.store(shared, Ordering::Release);
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Holds the queue's lock until dropped.
struct Locked<'a>(&'a Shared);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // During an ERROR the transaction abort releases every LWLock itself.
        if !std::thread::panicking() {
            // SAFETY: acquired by Shared::lock.
            unsafe { pg_sys::LWLockRelease(self.0.lock.load(Ordering::Relaxed)) };
        }
    }
}

/// A record reserved at pre-commit, to publish at commit or drop at abort.
pub struct Reservation {
    at: u64,
    slot: usize,
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
    fn lock(&self, mode: pg_sys::LWLockMode::Type) -> Locked<'_> {
        // SAFETY: the lock was set up with the segment.
        unsafe { pg_sys::LWLockAcquire(self.lock.load(Ordering::Relaxed), mode) };
        Locked(self)
    }

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
        slot.unsent_bytes.store(0, Ordering::Relaxed);
        slot.unsent_channels.iter().for_each(|count| count.store(0, Ordering::Relaxed));
        slot.dropping.store(false, Ordering::Relaxed);
        // Release: writers find the slot without the lock, and must see it reset.
        slot.dboid.store(dboid, Ordering::Release);
        Some(free)
    }

    pub fn find_slot(&self, dboid: u32) -> Option<&DbSlot> {
        self.find_slot_index(dboid).map(|i| &self.slots[i])
    }

    fn find_slot_index(&self, dboid: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.dboid.load(Ordering::Acquire) == dboid)
    }

    /// Reserves room for `body` and copies it in, unpublished. A record larger than half the
    /// ring, or one that would give its database more than its share, does not go in.
    pub fn reserve(&self, dboid: u32, body: &[u8]) -> Result<Reservation, NotQueued> {
        let len = (HEADER + body.len()).div_ceil(ALIGN) * ALIGN;
        let slot = match self.find_slot_index(dboid) {
            Some(slot) => slot,
            None => self.slot_of(dboid, &self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE)).ok_or(NotQueued::NoSlot)?,
        };
        if self.slots[slot].dropping.load(Ordering::Relaxed) {
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
        self.header(at).write(at, len as u32, dboid, body.len() as u32, RESERVED);
        self.high_water.fetch_max(self.used(), Ordering::Relaxed);
        // SAFETY: the reserved record is this backend's alone until it is published or dropped,
        // and it has room for the body after the header.
        unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), self.record(at).add(HEADER), body.len()) };
        Ok(Reservation { at, slot })
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
                        self.header(head).write(head, skip as u32, 0, 0, PADDING);
                    }
                    return Some(head + skip);
                }
                Err(moved) => head = moved,
            }
        }
    }

    /// Hands a reserved record to its database's worker and wakes it (or the launcher). Cannot fail.
    pub fn publish(&self, reservation: Reservation) {
        self.header(reservation.at).state.store(PUBLISHED, Ordering::Release);
        let slot = &self.slots[reservation.slot];
        slot.backlog.fetch_add(1, Ordering::Relaxed);
        slot.wake();
        if slot.pid.load(Ordering::Relaxed) == 0 {
            set_latch(&self.launcher_latch);
        }
    }

    /// Drops a reserved record of a transaction that aborted. Cannot fail. The worker is woken:
    /// it stops at a reserved record (see [`Shared::collect`]), and may wait behind this one.
    pub fn cancel(&self, reservation: Reservation) {
        let slot = &self.slots[reservation.slot];
        self.done(slot, reservation.at);
        slot.wake();
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
                self.header(at).write(at, len as u32, dboid, body.len() as u32, RESERVED);
                // SAFETY: as in reserve(): the claimed record is this backend's until published.
                unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), self.record(at).add(HEADER), body.len()) };
                self.publish(Reservation { at, slot: slot_index });
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
                    RESERVED => return false,
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

    /// The last sequence number sent on `channel` of `dboid` (0 if none).
    pub fn last_seq(&self, dboid: u32, channel: &[u8]) -> u64 {
        let hash = channel_hash(channel);
        let _shared = self.lock(pg_sys::LWLockMode::LW_SHARED);
        self.channels.iter().find(|c| c.is(dboid, hash, channel)).map_or(0, |c| c.seq.load(Ordering::Relaxed))
    }

    /// Records the last sequence number sent on `channel` of `dboid`; `false` if the table is full,
    /// or holds [`MAX_CHANNELS_PER_DATABASE`] of `dboid`'s channels (so that one database's
    /// channels cannot take every entry).
    pub fn store_seq(&self, dboid: u32, channel: &[u8], seq: u64) -> bool {
        let hash = channel_hash(channel);
        let _exclusive = self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
        let of_database = || self.channels.iter().filter(|c| c.dboid.load(Ordering::Relaxed) == dboid);
        let entry = of_database().find(|c| c.is(dboid, hash, channel)).or_else(|| {
            (of_database().count() < MAX_CHANNELS_PER_DATABASE && channel.len() <= MAX_CHANNEL)
                .then(|| self.channels.iter().find(|c| c.dboid.load(Ordering::Relaxed) == 0))
                .flatten()
        });
        let Some(entry) = entry else { return false };
        entry.hash.store(hash, Ordering::Relaxed);
        entry.len.store(channel.len() as u32, Ordering::Relaxed);
        for (stored, &b) in entry.name.iter().zip(channel) {
            stored.store(b, Ordering::Relaxed);
        }
        entry.seq.store(seq, Ordering::Relaxed);
        entry.dboid.store(dboid, Ordering::Relaxed);
        true
    }

    /// Called by the launcher once it runs: commits needing a worker wake it.
    pub fn attach_launcher(&self) {
        // SAFETY: as in DbSlot::attach_worker.
        let latch = unsafe { std::ptr::addr_of_mut!((*pg_sys::MyProc).procLatch) } as usize;
        self.launcher_latch.store(latch, Ordering::Release);
    }
}

impl RecordHeader {
    /// Fills in the header of ring space at `at` that the caller claimed; readers take it as
    /// written once `at` is stored, last, with release ordering.
    fn write(&self, at: u64, len: u32, dboid: u32, body_len: u32, state: u32) {
        self.len.store(len, Ordering::Relaxed);
        self.dboid.store(dboid, Ordering::Relaxed);
        self.body_len.store(body_len, Ordering::Relaxed);
        self.state.store(state, Ordering::Relaxed);
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

/// Wakes the process whose latch is stored in `latch`, if any.
fn set_latch(latch: &AtomicUsize) {
    let latch = latch.load(Ordering::Acquire) as *mut pg_sys::Latch;
    if !latch.is_null() {
        // SAFETY: a PGPROC latch in shared memory; setting it is safe at any time, even for a
        // process that just exited.
        unsafe { pg_sys::SetLatch(latch) };
    }
}

/// FNV-1a: stable across processes, unlike std's randomly seeded hasher.
fn channel_hash(channel: &[u8]) -> u64 {
    channel.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
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
}

impl Batch {
    /// Empties the batch. Its buffers stay unless a huge record grew the body buffer past `limit`
    /// bytes: a batch cut at `max_bytes` holds up to about twice that, and a growing buffer doubles.
    fn clear(&mut self, limit: usize) {
        self.positions.clear();
        self.ends.clear();
        clear_keeping(&mut self.bodies, limit);
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

/// One watch's changes in a record, read in place: the worker compares the watch's [`Target`]
/// with the ones it already has and decodes the changes straight into its fold.
pub struct WatchRecord<'a> {
    channel: &'a [u8],
    tbl: &'a [u8],
    cols: &'a [u8],
    flags: u8,
    count: u32,
    changes: &'a [u8],
}

impl<'a> WatchRecord<'a> {
    pub fn is_for(&self, target: &Target) -> bool {
        target.channel.as_bytes() == self.channel && target.tbl.as_bytes() == self.tbl && *target.cols == *self.cols
    }

    pub fn target(&self) -> Target {
        Target {
            channel: CString::new(self.channel).expect("channels have no NUL"),
            tbl: String::from_utf8_lossy(self.tbl).into_owned(),
            cols: self.cols.into(),
        }
    }

    /// The table was truncated before these changes.
    pub fn truncated(&self) -> bool {
        self.flags & TRUNCATED != 0
    }

    pub fn overflowed(&self, op: Op) -> bool {
        self.flags & (1 << op.index()) != 0
    }

    /// Subscribers are to refetch once what came before is sent.
    pub fn resync(&self) -> bool {
        self.flags & RESYNC != 0
    }

    /// Why these changes cannot be sent, if they cannot: what a trigger of pgwatch's records
    /// always can be, but a hand-made trigger's may not.
    pub fn unsendable(&self) -> Option<String> {
        if self.channel.is_empty() || self.channel.len() > MAX_CHANNEL || self.channel.contains(&0) {
            return Some(format!("the channel name takes {} bytes (1 to {MAX_CHANNEL})", self.channel.len()));
        }
        if self.tbl.len() > MAX_TABLE_NAME {
            return Some(format!("the table name takes {} bytes (at most {MAX_TABLE_NAME})", self.tbl.len()));
        }
        if self.cols.len() > MAX_COLS_HEADER {
            return Some(format!("the column names take {} bytes (at most {MAX_COLS_HEADER})", self.cols.len()));
        }
        None
    }

    /// The channel and table, for messages.
    pub fn describe(&self) -> String {
        format!(
            "table \"{}\" on channel \"{}\"",
            String::from_utf8_lossy(self.tbl),
            String::from_utf8_lossy(self.channel)
        )
    }

    pub fn changes(&self) -> impl Iterator<Item = Change> + 'a {
        let (mut rest, count) = (self.changes, self.count);
        (0..count).map(move |at| {
            let change = Change { before: read_image(&mut rest), after: read_image(&mut rest) };
            debug_assert!(at + 1 < count || rest.is_empty(), "the rows' bytes hold exactly their count");
            change
        })
    }

    /// Folds these changes, which came after what `folded` holds, into it.
    pub fn fold_into(&self, folded: &mut Folded) {
        if self.truncated() {
            folded.truncate();
        }
        if folded.len() == 0 {
            folded.extend_net(self.changes());
        } else {
            self.changes().for_each(|change| folded.apply(change));
        }
        for op in Op::ALL.into_iter().filter(|&op| self.overflowed(op)) {
            folded.mark_overflow(op);
        }
        if self.resync() {
            folded.mark_resync();
        }
    }
}

/// Bit of the flags byte that says the table was truncated; bits 0–2 are the per-op overflows.
const TRUNCATED: u8 = 1 << 3;
/// Bit of the flags byte that asks for a resync notice (see [`encode_resync`]).
const RESYNC: u8 = 1 << 4;

/// Appends a watch's resync request to a record body: no changes, only the request that its
/// subscribers refetch once everything queued before it is sent. A transaction notified inline
/// queues one, since its notifications may reach subscribers before older queued ones.
pub fn encode_resync(out: &mut Vec<u8>, target: &Target) {
    encode_header(out, target, RESYNC);
    out.extend_from_slice(&[0; 8]);
}

fn encode_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A watch's part of a record up to its rows: the target and the flags.
fn encode_header(out: &mut Vec<u8>, target: &Target, flags: u8) {
    encode_bytes(out, target.channel.as_bytes());
    encode_bytes(out, target.tbl.as_bytes());
    encode_bytes(out, &target.cols);
    out.push(flags);
}

/// Appends one watch's net changes to a record body.
pub fn encode(out: &mut Vec<u8>, target: &Target, folded: &Folded) {
    fn image(out: &mut Vec<u8>, image: Option<&Image>) {
        if let Some(image) = image {
            let (data, key_len, partial) = image.parts();
            out.push(1 + u8::from(partial));
            out.extend_from_slice(&key_len.to_le_bytes());
            encode_bytes(out, data);
        } else {
            out.push(0);
        }
    }
    let overflow = Op::ALL.into_iter().fold(0, |bits, op| bits | u8::from(folded.overflowed(op)) << op.index());
    let truncated = if folded.truncated() { TRUNCATED } else { 0 };
    let resync = if folded.resync() { RESYNC } else { 0 };
    encode_header(out, target, overflow | truncated | resync);
    // The row count, then the rows' bytes, length-prefixed so that a reader can step over them.
    let count_at = out.len();
    out.extend_from_slice(&[0; 8]);
    let mut count = 0u32;
    for row in folded.net_rows() {
        image(out, row.before);
        image(out, row.after);
        count += 1;
    }
    let rows_len = (out.len() - count_at - 8) as u32;
    out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    out[count_at + 4..count_at + 8].copy_from_slice(&rows_len.to_le_bytes());
}

/// Reads a record body written by [`encode`], one watch at a time.
pub fn decode(body: &[u8]) -> impl Iterator<Item = WatchRecord<'_>> {
    let mut rest = body;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (channel, tbl, cols) = (read_bytes(&mut rest), read_bytes(&mut rest), read_bytes(&mut rest));
        let flags = take(&mut rest, 1)[0];
        let count = read_u32(&mut rest);
        let changes = read_bytes(&mut rest);
        Some(WatchRecord { channel, tbl, cols, flags, count, changes })
    })
}

fn take<'a>(body: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = body.split_at(n);
    *body = tail;
    head
}

fn read_u32(body: &mut &[u8]) -> u32 {
    u32::from_le_bytes(take(body, 4).try_into().expect("4 bytes"))
}

fn read_bytes<'a>(body: &mut &'a [u8]) -> &'a [u8] {
    let len = read_u32(body) as usize;
    take(body, len)
}

fn read_image(body: &mut &[u8]) -> Option<Image> {
    let tag = take(body, 1)[0];
    if tag == 0 {
        return None;
    }
    let key_len = read_u32(body);
    Some(Image::from_parts(read_bytes(body), key_len, tag == 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{pair_prefix, ImageBuilder, PayloadBuf};

    fn img(id: i64, note: &str, partial: bool) -> Image {
        let mut b = ImageBuilder::new(1000);
        b.int_pair(&pair_prefix("id").unwrap(), id).unwrap();
        b.end_key();
        if !partial {
            b.string_pair(&pair_prefix("note").unwrap(), note.as_bytes()).unwrap();
        }
        b.finish(partial)
    }

    fn rendered(folded: &Folded) -> Vec<String> {
        folded
            .net_rows()
            .map(|row| {
                let mut out = PayloadBuf::new();
                row.render(&mut out, 1000, false).unwrap();
                format!("{} {}", row.op.as_str(), String::from_utf8(out.to_vec()).unwrap())
            })
            .collect()
    }

    #[test]
    fn records_round_trip_and_fold_across_transactions() {
        let target = Target { channel: c"chan".into(), tbl: "public.t".into(), cols: (*b"\"cols\":[\"id\"],").into() };
        let mut first = Folded::default();
        first.apply(Change { before: None, after: Some(img(1, "a", false)) });
        first.apply(Change { before: Some(img(2, "b", false)), after: Some(img(2, "c", false)) });
        first.apply(Change { before: Some(img(3, "", true)), after: None });
        let mut second = Folded::default();
        second.apply(Change { before: Some(img(1, "a", false)), after: Some(img(1, "z", false)) });
        second.apply(Change { before: Some(img(2, "c", false)), after: None });

        first.mark_overflow(Op::Update);
        let mut body = Vec::new();
        encode(&mut body, &target, &first);
        encode(&mut body, &target, &second);
        let decoded: Vec<_> = decode(&body).collect();
        assert_eq!(decoded.len(), 2);
        assert!(decoded.iter().all(|w| w.is_for(&target) && w.target() == target));
        assert_eq!(Op::ALL.map(|op| decoded[0].overflowed(op)), [false, true, false]);
        assert_eq!(Op::ALL.map(|op| decoded[1].overflowed(op)), [false; 3]);
        assert!(!decoded[0].truncated() && !decoded[1].truncated());

        let mut worker = Folded::default();
        decoded.iter().for_each(|w| w.fold_into(&mut worker));
        assert!(worker.overflowed(Op::Update));
        assert_eq!(
            rendered(&worker),
            [r#"insert {"id":1,"note":"z"}"#, r#"delete {"id":2,"note":"b"}"#, r#"delete {"id":3,"partial":true}"#]
        );
    }

    #[test]
    fn op_order_of_decoded_changes_is_kept() {
        let target = Target { channel: c"c".into(), tbl: "t".into(), cols: Box::default() };
        let mut folded = Folded::default();
        folded.apply(Change { before: None, after: Some(img(5, "x", false)) });
        let mut body = Vec::new();
        encode(&mut body, &target, &folded);
        let change = decode(&body).next().unwrap().changes().next().unwrap();
        assert_eq!(change.op(), Some(Op::Insert));
        assert_eq!(change.after.as_ref().unwrap().key(), img(5, "", false).key());
    }

    #[test]
    fn a_truncate_clears_earlier_transactions_but_not_its_own_later_rows() {
        let target = Target { channel: c"c".into(), tbl: "t".into(), cols: Box::default() };
        let mut earlier = Folded::default();
        earlier.apply(Change { before: None, after: Some(img(1, "a", false)) });
        earlier.mark_overflow(Op::Delete);
        let mut truncating = Folded::default();
        truncating.truncate();
        truncating.apply(Change { before: None, after: Some(img(2, "b", false)) });
        let mut body = Vec::new();
        encode(&mut body, &target, &earlier);
        encode(&mut body, &target, &truncating);
        let mut worker = Folded::default();
        decode(&body).for_each(|w| w.fold_into(&mut worker));
        assert!(worker.truncated() && !worker.overflowed(Op::Delete));
        assert_eq!(rendered(&worker), [r#"insert {"id":2,"note":"b"}"#]);
    }

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

    #[test]
    fn channel_hash_is_stable() {
        assert_eq!(channel_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(channel_hash(b"public.a"), channel_hash(b"public.b"));
    }
}
