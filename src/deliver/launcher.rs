//! The launcher (with pgwatch preloaded): one background worker that starts each database's
//! delivery worker when the first record of that database is published, and again whenever it
//! stopped with records left.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;

use super::shmem;
use super::slots::{WorkerState, MAX_DATABASES};
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
    loop {
        for (i, slot) in shared.slots.iter().enumerate() {
            let dboid = slot.dboid.load(Ordering::Relaxed);
            let alive = workers[i].as_ref().is_some_and(|w| match w.pid() {
                Ok(_) => true,
                Err(status) => matches!(status, pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted),
            });
            // Attached: a worker this launcher started before it restarted.
            let attached = slot.pid.load(Ordering::Acquire) != 0;
            if alive || attached || dboid == 0 || slot.dropping.load(Ordering::Relaxed) {
                continue;
            }
            if slot.backlog.load(Ordering::Relaxed) == 0 && !slot.worker_wanted.load(Ordering::Acquire) {
                continue;
            }
            slot.set_state(WorkerState::Starting);
            match start_worker(dboid) {
                Some(worker) => {
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
        // Woken by commits that find no worker, and by the postmaster when a worker starts or stops.
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            break;
        }
    }
    // Asked to stop (SIGTERM, e.g. pg_terminate_backend) or the postmaster died. Exit code 1 has
    // the postmaster start the launcher again after its restart time; 0 would unregister it, and
    // no worker would ever be started again. (A postmaster shutting down restarts nothing.)
    // SAFETY: ends this process the way PostgreSQL's own background workers do.
    unsafe { pg_sys::proc_exit(1) };
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
