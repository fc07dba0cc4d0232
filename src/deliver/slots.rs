//! The per-database slots of the shared segment: the database's worker, its backlog, what it has
//! not sent yet (bytes, and per channel bucket), and the resync it owes; and the table of each
//! channel's last sequence number.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use pgrx::pg_sys;

use crate::encode::record::decode;
use crate::model::watch::MAX_CHANNEL;

/// Databases that can use worker delivery at once; others are notified inline.
pub const MAX_DATABASES: usize = 64;

/// Channels whose sequence numbers are kept in shared memory (and so survive worker restarts).
pub const MAX_CHANNELS: usize = 4096;

/// How many of them one database may use.
pub const MAX_CHANNELS_PER_DATABASE: usize = MAX_CHANNELS / 4;

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
    pub latch: AtomicUsize,
    pub state: AtomicU32,
    /// Published records not yet delivered.
    pub backlog: AtomicU64,
    /// When the worker last committed notifications (TimestampTz; 0 = never).
    pub last_send: AtomicI64,
    /// The pid of the backend running a statement that needs the database to itself (DROP
    /// DATABASE, or see `utility`; 0: none): no worker may start, nor records be queued. Set only
    /// for a role that may run the statement; cleared once it ends without dropping the
    /// database, and by the launcher once that backend is gone.
    pub held_by: AtomicI32,
    /// A DROP EXTENSION committed in the database: its worker is to check whether pgwatch is
    /// still installed (and exit if not).
    pub recheck_extension: AtomicBool,
    /// A transaction notified inline when its resync record found no room: once every record
    /// reserved before this ring position (+ 1; 0 = none) is sent, the worker tells the channels
    /// it knows in `resync_buckets` to refetch.
    pub resync_after: AtomicU64,
    /// Channel buckets (see [`bucket`]) of the channels `resync_after` is for, one bit each.
    pub resync_buckets: [AtomicU64; BUCKETS / 64],
    /// The buckets of a resync the worker took and has not sent yet: a worker that dies sending
    /// it (an ERROR) leaves them for the next one (see [`DbSlot::take_resync`]).
    pub resync_inflight: [AtomicU64; BUCKETS / 64],
    /// Bytes of this database's records in the ring that are not sent yet (reserved or
    /// published): a database may hold at most [`DATABASE_SHARE`] of the ring.
    pub unsent_bytes: AtomicU64,
    /// Per channel bucket, how many of this database's records not sent yet have changes on a
    /// channel of that bucket: whether a transaction notified inline may overtake older ones.
    pub unsent_channels: [AtomicU32; BUCKETS],
    /// The database's retained feeds are ready to be read: the server started clean, or its
    /// worker has written their reset markers (see `feed`).
    pub feeds_ready: AtomicBool,
    /// A reader of the feeds waits for them to be ready: the launcher starts a worker even with
    /// no backlog.
    pub worker_wanted: AtomicBool,
}

/// Channel buckets of a database slot: a channel's changes are counted under its hash's bucket,
/// so that a commit finds out without a lock or a walk of the ring whether older changes of its
/// channels are still queued (two channels share a bucket at most rarely, which only costs a
/// resync notice that was not needed).
pub const BUCKETS: usize = 1024;

/// How much of the ring one database's records not sent yet may take: the rest is always left
/// to the other databases.
pub const DATABASE_SHARE: (u64, u64) = (3, 4);

pub fn bucket(channel: &[u8]) -> usize {
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

    /// Runs `f` with no worker attached, and none able to attach meanwhile (the launcher dropping
    /// the database's records); `None`, without running it, when one is attached.
    pub fn without_worker<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        /// Puts the slot back to no worker, also when `f` raises an ERROR.
        struct Unblock<'a>(&'a AtomicI32);
        impl Drop for Unblock<'_> {
            fn drop(&mut self) {
                self.0.store(0, Ordering::Release);
            }
        }
        // -1: no process's pid; a worker's attach_worker finds the slot taken, and it exits.
        self.pid.compare_exchange(0, -1, Ordering::AcqRel, Ordering::Relaxed).ok()?;
        let _unblock = Unblock(&self.pid);
        Some(f())
    }

    /// Wakes the worker, if one runs.
    pub fn wake(&self) {
        set_latch(&self.latch);
    }

    /// Whether a statement that needs the database to itself is under way on it.
    pub fn is_held(&self) -> bool {
        self.held_by.load(Ordering::Acquire) != 0
    }

    /// Ends backend `pid`'s hold, which did not drop the database.
    pub fn release(&self, pid: i32) {
        let _ = self.held_by.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed);
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
    /// when a later one was asked for meanwhile (its buckets are left for it, with these). They
    /// stay in flight until [`DbSlot::resync_sent`].
    pub fn take_resync(&self, after: u64) -> Option<[u64; BUCKETS / 64]> {
        let buckets = self.resync_buckets.each_ref().map(|bits| bits.swap(0, Ordering::AcqRel));
        if self.resync_after.compare_exchange(after, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            for (bits, taken) in self.resync_inflight.iter().zip(buckets) {
                bits.fetch_or(taken, Ordering::AcqRel);
            }
            return Some(buckets);
        }
        for (bits, taken) in self.resync_buckets.iter().zip(buckets) {
            bits.fetch_or(taken, Ordering::AcqRel);
        }
        None
    }

    /// The resync taken last has been sent (committed).
    pub fn resync_sent(&self) {
        self.resync_inflight.iter().for_each(|bits| bits.store(0, Ordering::Release));
    }

    /// As a worker starts: a resync its predecessor took and did not send is due again, after
    /// everything queued up to `head`.
    pub fn resume_resync(&self, head: u64) {
        let inflight = self.resync_inflight.each_ref().map(|bits| bits.swap(0, Ordering::AcqRel));
        if inflight.iter().all(|&bits| bits == 0) {
            return;
        }
        for (bits, taken) in self.resync_buckets.iter().zip(inflight) {
            bits.fetch_or(taken, Ordering::AcqRel);
        }
        self.resync_after.fetch_max(head + 1, Ordering::AcqRel);
    }

    /// Whether a record not sent yet may have changes on `channel`.
    pub fn may_hold(&self, channel: &[u8]) -> bool {
        self.unsent_channels[bucket(channel)].load(Ordering::Acquire) > 0
    }

    /// Counts (`up`) or stops counting a record of `len` bytes with body `body` as not sent yet.
    pub fn count_unsent(&self, len: u64, body: &[u8], up: bool) {
        if up {
            self.unsent_bytes.fetch_add(len, Ordering::AcqRel);
        } else {
            self.unsent_bytes.fetch_sub(len, Ordering::AcqRel);
        }
        for watch in decode(body) {
            let counter = &self.unsent_channels[bucket(watch.channel())];
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
pub struct ChannelSeq {
    pub dboid: AtomicU32,
    pub len: AtomicU32,
    pub hash: AtomicU64,
    pub seq: AtomicU64,
    pub name: [AtomicU8; MAX_CHANNEL],
}

impl ChannelSeq {
    pub fn is(&self, dboid: u32, hash: u64, channel: &[u8]) -> bool {
        self.dboid.load(Ordering::Relaxed) == dboid
            && self.hash.load(Ordering::Relaxed) == hash
            && self.len.load(Ordering::Relaxed) as usize == channel.len()
            && self.name.iter().zip(channel).all(|(stored, &b)| stored.load(Ordering::Relaxed) == b)
    }
}

/// FNV-1a: stable across processes, unlike std's randomly seeded hasher.
pub fn channel_hash(channel: &[u8]) -> u64 {
    channel.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Wakes the process whose latch is stored in `latch`, if any.
pub fn set_latch(latch: &AtomicUsize) {
    let latch = latch.load(Ordering::Acquire) as *mut pg_sys::Latch;
    if !latch.is_null() {
        // SAFETY: a PGPROC latch in shared memory; setting it is safe at any time, even for a
        // process that just exited.
        unsafe { pg_sys::SetLatch(latch) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_hash_is_stable() {
        assert_eq!(channel_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(channel_hash(b"public.a"), channel_hash(b"public.b"));
    }
}
