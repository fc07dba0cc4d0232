//! Whether this server run began where a clean shutdown left off: the one case in which retained
//! feeds go on without a reset marker (see `feed`).
//!
//! A clean shutdown (`pg_ctl stop`, fast or smart) sends what is queued before the workers exit,
//! and its shutdown checkpoint makes their last transactions durable. Any other end (a crash, an
//! immediate stop) may lose changes that were committed but not sent, or a worker's transaction
//! whose NOTIFYs listeners already saw. The postmaster writes `pgwatch_feed.state` in the data
//! directory: `running` when shared memory is set up, `clean <system identifier> <checkpoint>` as
//! it exits normally with nothing of any database left unsent. The next run starts clean only if
//! it finds that line (or no file: pgwatch never ran here), `pg_control` says the cluster was shut
//! down at that very checkpoint (a run in between without pgwatch preloaded, whose changes were
//! notified inline and not logged, ends at another), and it is not a standby, a recovery or a
//! restored backup (those start as after a crash).

use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use pgrx::warning;

use super::shmem::{self, Shared};

const STATE_FILE: &str = "pgwatch_feed.state";

/// `DBState::DB_SHUTDOWNED` in `pg_control`, which every release since 9.x lays out alike: the
/// system identifier (8 bytes), two version numbers (4 bytes each), the state (4 bytes), the time
/// of the last update (8 bytes, aligned), then the last checkpoint's location (8 bytes).
const DB_SHUTDOWNED: u32 = 1;

/// What `pg_control` says of the cluster (the postmaster runs in the data directory).
#[derive(Clone, Copy)]
struct Control {
    sysid: u64,
    state: u32,
    checkpoint: u64,
}

fn control_file() -> Option<Control> {
    let bytes = std::fs::read("global/pg_control").ok()?;
    let word = |at: usize| Some(u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    let state = u32::from_ne_bytes(bytes.get(16..20)?.try_into().ok()?);
    Some(Control { sysid: word(0)?, state, checkpoint: word(32)? })
}

/// The state file's line for a run that ended clean at `control`'s checkpoint.
fn clean_line(control: Control) -> String {
    format!("clean {} {:X}", control.sysid, control.checkpoint)
}

/// Whether a state file reading `found` and `pg_control`'s `control` make a clean start. No
/// file: pgwatch has not run on this cluster before (the first start after `initdb`, or after
/// `shared_preload_libraries` gained pgwatch), so it has no feeds to reset.
fn starts_clean(found: Option<&str>, control: Option<Control>, recovering: bool) -> bool {
    match (found, control) {
        (Some(found), Some(control)) if control.state == DB_SHUTDOWNED => {
            !recovering && found.trim() == clean_line(control)
        }
        (None, Some(control)) if control.state == DB_SHUTDOWNED => !recovering,
        _ => false,
    }
}

/// Called by the postmaster when it sets up shared memory (at start, and again after a crash).
pub fn begin_run(shared: &Shared) {
    let found = std::fs::read_to_string(STATE_FILE).ok();
    let recovering =
        ["standby.signal", "recovery.signal", "backup_label"].iter().any(|f| std::path::Path::new(f).exists());
    let clean = starts_clean(found.as_deref(), control_file(), recovering);
    shared.started_clean.store(clean, Ordering::Relaxed);
    if let Err(e) = std::fs::write(STATE_FILE, "running\n") {
        // A "clean" line left behind would make the next start after a crash look clean.
        if std::fs::remove_file(STATE_FILE).is_err() && found.is_some() {
            warning!("pgwatch: cannot write or remove {STATE_FILE}: {e}");
        }
    }
    // SAFETY: registers a plain function in the postmaster; its children forget it at fork.
    unsafe { pg_sys::on_shmem_exit(Some(end_run), pg_sys::Datum::from(0)) };
}

/// Runs as the postmaster exits (and before it sets up shared memory again after a crash, with
/// a code other than 0): marks the run clean if nothing of any database is left unsent, and no
/// retained watch's changes went unlogged.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn end_run(code: i32, _arg: pg_sys::Datum) {
    let Some(shared) = shmem::shared() else { return };
    let unsent = shared.slots.iter().any(|slot| {
        slot.dboid.load(Ordering::Acquire) != 0
            && (slot.unsent_bytes.load(Ordering::Acquire) > 0 || slot.resync_after.load(Ordering::Acquire) != 0)
    });
    if code != 0 || unsent || shared.unlogged.load(Ordering::Acquire) {
        return;
    }
    // The shutdown checkpoint is in pg_control by now: the checkpointer has exited.
    if let Some(control) = control_file() {
        let _ = std::fs::write(STATE_FILE, clean_line(control) + "\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clean_line_of_this_cluster_and_checkpoint_after_a_shutdown_starts_clean() {
        let control = |sysid, state, checkpoint| Some(Control { sysid, state, checkpoint });
        let shut_down = control(42, DB_SHUTDOWNED, 0x1A2B);
        assert!(starts_clean(Some("clean 42 1A2B\n"), shut_down, false));
        assert!(!starts_clean(Some("clean 42 1A2B\n"), shut_down, true));
        assert!(!starts_clean(Some("clean 43 1A2B\n"), shut_down, false));
        assert!(!starts_clean(Some("running\n"), shut_down, false));
        // An older line without the checkpoint, or a run without pgwatch since (another checkpoint).
        assert!(!starts_clean(Some("clean 42\n"), shut_down, false));
        assert!(!starts_clean(Some("clean 42 1A2B\n"), control(42, DB_SHUTDOWNED, 0x2000), false));
        // The first run with pgwatch preloaded.
        assert!(starts_clean(None, shut_down, false));
        assert!(!starts_clean(None, shut_down, true));
        assert!(!starts_clean(None, control(42, 6, 0x1A2B), false));
        // An immediate stop or a crash leaves pg_control "in production".
        assert!(!starts_clean(Some("clean 42 1A2B\n"), control(42, 6, 0x1A2B), false));
        assert!(!starts_clean(Some("clean 42 1A2B\n"), None, false));
    }
}
