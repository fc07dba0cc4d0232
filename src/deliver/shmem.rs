//! The shared-memory segment of the delivery queue (needs `shared_preload_libraries = 'pgwatch'`):
//! its layout, how it is asked for and set up, its lock, and the lookups of database slots and
//! channel sequence numbers.
//!
//! Beside the ring the segment holds one slot per database (its worker and backlog), the last
//! sequence number of each channel, and the cluster-wide counters.

use std::mem::size_of;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use pgrx::pg_sys;

use super::slots::{channel_hash, ChannelSeq, DbSlot, MAX_CHANNELS, MAX_CHANNELS_PER_DATABASE, MAX_DATABASES};
use crate::guc;
use crate::model::watch::MAX_CHANNEL;
use crate::stats::{self, Counters};

#[repr(C)]
pub struct Shared {
    lock: AtomicPtr<pg_sys::LWLock>,
    pub capacity: u64,
    /// Byte positions since start: the ring holds [tail, head).
    pub head: AtomicU64,
    pub tail: AtomicU64,
    pub high_water: AtomicU64,
    pub launcher_latch: AtomicUsize,
    /// This server run began where a clean shutdown left off (see `runs`): retained feeds go on
    /// without a reset marker.
    pub started_clean: AtomicBool,
    /// A retained watch's changes were notified without being logged in this run (their database
    /// had no slot): every slot claimed from then on resets its database's feeds, and the run
    /// does not end clean, so that the gap is marked wherever it may be.
    pub unlogged: AtomicBool,
    /// The transactions prepared in this run and not yet committed or rolled back (see
    /// `prepared`).
    prepared: [PreparedXact; PREPARED_XACTS],
    /// Per backend (by process number), the reservation it may still publish or drop (see
    /// `ring`).
    pub pending: [AtomicU64; MAX_PROCS],
    pub slots: [DbSlot; MAX_DATABASES],
    pub channels: [ChannelSeq; MAX_CHANNELS],
    pub counters: Counters,
}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());

static PREV_SHMEM_STARTUP: OnceLock<pg_sys::shmem_startup_hook_type> = OnceLock::new();

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static PREV_SHMEM_REQUEST: OnceLock<pg_sys::shmem_request_hook_type> = OnceLock::new();

/// How many prepared transactions `Shared::prepared` notes at once; those past it are told
/// apart no better than those prepared before the server started.
const PREPARED_XACTS: usize = 1024;

/// The longest GID PostgreSQL takes (GIDSIZE less its NUL).
pub const MAX_GID: usize = 199;

/// A prepared transaction, by its xid (0: a free entry), database and GID, and whether it
/// changed watched tables.
#[repr(C)]
struct PreparedXact {
    xid: AtomicU32,
    dboid: AtomicU32,
    changed: AtomicBool,
    /// Claimed at pre-prepare, confirmed once prepared: only confirmed entries are looked up.
    confirmed: AtomicBool,
    gid_len: AtomicU32,
    gid: [AtomicU8; MAX_GID],
}

impl PreparedXact {
    fn has_gid(&self, gid: &[u8]) -> bool {
        self.xid.load(Ordering::Relaxed) != 0
            && self.gid_len.load(Ordering::Relaxed) as usize == gid.len()
            && self.gid.iter().zip(gid).all(|(stored, &b)| stored.load(Ordering::Relaxed) == b)
    }

    fn is_confirmed(&self, dboid: u32) -> bool {
        self.confirmed.load(Ordering::Acquire) && self.dboid.load(Ordering::Relaxed) == dboid
    }
}

/// Process numbers the queue has an entry for; a backend numbered above (a server with more
/// than about 65,000 connections) notifies inline.
pub const MAX_PROCS: usize = 1 << 16;

/// Record alignment: every aligned place has room for a header, even right before the ring's end.
pub const ALIGN: usize = 32;

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
            if !pg_sys::IsUnderPostmaster {
                super::runs::begin_run(&*shared);
            }
        }
        stats::attach(&(*shared).counters);
        SHARED.store(shared, Ordering::Release);
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Holds the queue's lock until dropped.
pub struct Locked<'a>(&'a Shared);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // During an ERROR the transaction abort releases every LWLock itself.
        if !std::thread::panicking() {
            // SAFETY: acquired by Shared::lock.
            unsafe { pg_sys::LWLockRelease(self.0.lock.load(Ordering::Relaxed)) };
        }
    }
}

impl Shared {
    pub fn lock(&self, mode: pg_sys::LWLockMode::Type) -> Locked<'_> {
        // SAFETY: the lock was set up with the segment.
        unsafe { pg_sys::LWLockAcquire(self.lock.load(Ordering::Relaxed), mode) };
        Locked(self)
    }

    pub fn find_slot(&self, dboid: u32) -> Option<&DbSlot> {
        self.find_slot_index(dboid).map(|i| &self.slots[i])
    }

    pub fn find_slot_index(&self, dboid: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.dboid.load(Ordering::Acquire) == dboid)
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

    /// Claims an entry for the transaction `xid` of `dboid`, about to be prepared as `gid`,
    /// noting whether it `changed` watched tables; its index, to confirm once prepared. An entry
    /// of this xid is stale, and so is one of this GID whose transaction ended unseen (committed
    /// by a process that runs no statement for it, a logical replication worker's say): they go,
    /// and a full table first forgets every such ended transaction. An entry of this GID still in
    /// progress stays (PostgreSQL refuses this PREPARE then). Runs at pre-prepare, where an ERROR
    /// still aborts the transaction.
    pub fn note_prepared(&self, dboid: u32, xid: u32, gid: &[u8], changed: bool) -> Option<usize> {
        if gid.len() > MAX_GID || xid == 0 {
            return None;
        }
        let _exclusive = self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
        let forget_ended = |p: &PreparedXact| {
            let noted = pg_sys::TransactionId::from_inner(p.xid.load(Ordering::Relaxed));
            // SAFETY: looks the xid up in the shared process array (a prepared transaction
            // counts as in progress until it is committed or rolled back).
            if !unsafe { pg_sys::TransactionIdIsInProgress(noted) } {
                p.xid.store(0, Ordering::Relaxed);
            }
        };
        for p in &self.prepared {
            if p.xid.load(Ordering::Relaxed) == xid {
                p.xid.store(0, Ordering::Relaxed);
            } else if p.has_gid(gid) {
                forget_ended(p);
            }
        }
        let free = || self.prepared.iter().position(|p| p.xid.load(Ordering::Relaxed) == 0);
        let index = free().or_else(|| {
            self.prepared.iter().for_each(forget_ended);
            free()
        })?;
        let entry = &self.prepared[index];
        entry.dboid.store(dboid, Ordering::Relaxed);
        entry.changed.store(changed, Ordering::Relaxed);
        entry.confirmed.store(false, Ordering::Relaxed);
        entry.gid_len.store(gid.len() as u32, Ordering::Relaxed);
        for (stored, &b) in entry.gid.iter().zip(gid) {
            stored.store(b, Ordering::Relaxed);
        }
        entry.xid.store(xid, Ordering::Relaxed);
        Some(index)
    }

    /// Confirms the entry claimed at `index` (see [`Shared::note_prepared`]) once its transaction
    /// is prepared: no lock, nothing that can fail.
    pub fn confirm_prepared(&self, index: usize) {
        self.prepared[index].confirmed.store(true, Ordering::Release);
    }

    /// Frees the entry claimed at `index` for `xid`, whose PREPARE failed.
    pub fn release_prepared(&self, index: usize, xid: u32) {
        let _exclusive = self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
        let entry = &self.prepared[index];
        if entry.xid.load(Ordering::Relaxed) == xid && !entry.confirmed.load(Ordering::Relaxed) {
            entry.xid.store(0, Ordering::Relaxed);
        }
    }

    /// The xid of the transaction of `dboid` noted as prepared as `gid`, if exactly one is, and
    /// whether it changed watched tables.
    pub fn prepared_xid(&self, dboid: u32, gid: &[u8]) -> Option<(u32, bool)> {
        let _shared = self.lock(pg_sys::LWLockMode::LW_SHARED);
        let mut found = self.prepared.iter().filter(|p| p.is_confirmed(dboid) && p.has_gid(gid));
        match (found.next(), found.next()) {
            (Some(p), None) => Some((p.xid.load(Ordering::Relaxed), p.changed.load(Ordering::Relaxed))),
            _ => None,
        }
    }

    /// Forgets the prepared transaction `xid` of `dboid` as it ends: whether it changed watched
    /// tables, `None` if it was not noted.
    pub fn take_prepared(&self, dboid: u32, xid: u32) -> Option<bool> {
        let _exclusive = self.lock(pg_sys::LWLockMode::LW_EXCLUSIVE);
        let entry = self.find_prepared(dboid, xid)?;
        entry.xid.store(0, Ordering::Relaxed);
        Some(entry.changed.load(Ordering::Relaxed))
    }

    /// Whether the transaction `xid` of `dboid` is noted as prepared.
    pub fn is_prepared(&self, dboid: u32, xid: u32) -> bool {
        let _shared = self.lock(pg_sys::LWLockMode::LW_SHARED);
        self.find_prepared(dboid, xid).is_some()
    }

    fn find_prepared(&self, dboid: u32, xid: u32) -> Option<&PreparedXact> {
        (xid != 0).then_some(())?;
        self.prepared.iter().find(|p| p.xid.load(Ordering::Relaxed) == xid && p.is_confirmed(dboid))
    }

    /// Called by the launcher once it runs: commits needing a worker wake it.
    pub fn attach_launcher(&self) {
        // SAFETY: as in DbSlot::attach_worker.
        let latch = unsafe { std::ptr::addr_of_mut!((*pg_sys::MyProc).procLatch) } as usize;
        self.launcher_latch.store(latch, Ordering::Release);
    }
}
