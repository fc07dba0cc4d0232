//! Sending notifications from the current transaction: by the writing backend (inline delivery)
//! or by a delivery worker.

use std::ffi::{c_char, CStr, CString};

use pgrx::pg_sys::ffi::pg_guard_ffi_boundary;

use crate::encode::fold::Folded;
use crate::encode::image::{PayloadBuf, MAX_PAYLOAD};
use crate::encode::packer::{
    overflow_payload, reset_payload, resync_payload, truncate_payload, Packer, Payload, ResetReason,
};
use crate::model::events::Op;
use crate::model::watch::Target;
use crate::stats::{self, Counter};

unsafe extern "C-unwind" {
    /// The C function behind `NOTIFY`/`pg_notify()`; pgrx does not bind it.
    fn Async_Notify(channel: *const c_char, payload: *const c_char);
}

/// Marks for a resync every watch's changes that follow another's on the same channel (a
/// labelled watch whose table was renamed between changes, or one redefined): each is sent
/// whole, one after the other, not in the order their rows changed, so the channel's
/// subscribers refetch after the later ones. `watches` is in sending order.
pub fn resync_shared_channels<'a>(watches: impl Iterator<Item = (&'a CStr, &'a mut Folded)>) {
    let mut seen: Vec<&CStr> = Vec::new();
    for (channel, folded) in watches {
        if seen.contains(&channel) {
            folded.mark_resync();
        } else {
            seen.push(channel);
        }
    }
}

/// Queues `payload` on `channel` for delivery when the current transaction commits.
pub fn send(channel: &CStr, payload: &CStr, rows: usize) {
    let len = payload.to_bytes().len();
    assert!(len <= MAX_PAYLOAD, "payloads are built under the NOTIFY limit");
    // SAFETY: both are NUL-terminated strings that outlive the call; Async_Notify copies them,
    // and the guard turns a PostgreSQL ERROR into a Rust panic instead of a longjmp over Rust frames.
    unsafe { pg_guard_ffi_boundary(|| Async_Notify(channel.as_ptr(), payload.as_ptr())) };
    stats::add(Counter::Notifications, 1);
    stats::add(Counter::PayloadBytes, len as u64);
    stats::add(Counter::RowsSent, rows as u64);
}

/// Order in which a watch's rows are sent. The net changes are of distinct keys, so a copy that
/// applies them in any order ends equal to the table; removals go first so that, in between, a
/// value of another unique column freed by a delete is never held twice.
const SEND_ORDER: [Op; 3] = [Op::Delete, Op::Update, Op::Insert];

/// Whether one watch's changes end with a refetch for its subscribers (a resync, on a retained
/// channel a reset marker), and why: a resync was asked for (changes notified inline may have
/// overtaken these: a gap in the log), or the table was truncated and the watch does not report
/// truncate, or DDL changed which rows it holds (no gap: the marker is in the log like any
/// payload). One refetch covers them all.
fn refetch_due(folded: &Folded) -> Option<ResetReason> {
    if folded.resync() {
        Some(ResetReason::Fallback)
    } else if folded.refetch_after_truncate() {
        Some(ResetReason::Truncate)
    } else if folded.reshaped() {
        Some(ResetReason::Ddl)
    } else {
        None
    }
}

/// Sends the net effect of one watch's changes: first a truncate notice if the table was
/// truncated (and the watch reports truncate), then the rows in as few payloads as fit, each
/// numbered by `seq()` when that gives a number (worker delivery), then an overflow notice for
/// each op whose rows could not all be listed, and last a resync notice if one is due (see
/// [`refetch_due`]; on a retained channel a reset marker). `sent` sees each payload's text as it
/// is sent.
///
/// The notices come after every listed row: a listed row may be older than a change the
/// overflow stands for (an insert listed, its later update past the limit), and a subscriber
/// that refetches at the notice must not then apply that older row over what it fetched.
pub fn send_changes(
    target: &Target,
    folded: &Folded,
    seq: &mut impl FnMut() -> Option<u64>,
    sent: &mut impl FnMut(&[u8]),
) {
    let mut emit = |text: &CStr, rows: usize| {
        send(&target.channel, text, rows);
        sent(text.to_bytes());
    };
    // A notice lists no rows (truncate, overflow, resync, reset).
    let notice = |notice: PayloadBuf| CString::new(notice.as_slice()).expect("JSON text holds no NUL byte");
    if folded.truncated() {
        emit(&notice(truncate_payload(&target.tbl, seq())), 0);
    }
    let mut row = PayloadBuf::new();
    let mut packer = Packer::new(&target.tbl, target.cols(), Op::Insert);
    let mut overflows = Vec::new();
    for op in SEND_ORDER {
        let mut overflowed = folded.overflowed(op);
        if !overflowed && !folded.net_rows().any(|net| net.op == op) {
            continue;
        }
        packer.start(&target.tbl, target.cols(), op);
        for net in folded.net_rows().filter(|net| net.op == op) {
            match net.render(&mut row, packer.row_budget(), target.compact()) {
                Ok(partial) => {
                    stats::add(Counter::PartialRows, u64::from(partial));
                    if !packer.push(&row) {
                        packer.flush(seq, &mut |p: Payload<'_>| emit(p.text, p.rows));
                        assert!(packer.push(&row), "a row within the budget fits an empty payload");
                    }
                }
                Err(_) => overflowed = true,
            }
        }
        packer.flush(seq, &mut |p: Payload<'_>| emit(p.text, p.rows));
        if overflowed {
            overflows.push(op);
        }
    }
    for op in overflows {
        stats::add(Counter::Overflows, 1);
        emit(&notice(overflow_payload(&target.tbl, op, seq())), 0);
    }
    if let Some(reason) = refetch_due(folded) {
        stats::add(Counter::Resyncs, 1);
        let payload = if target.retained {
            if reason == ResetReason::Fallback {
                stats::add(Counter::FeedResets, 1);
            }
            reset_payload(&target.tbl, seq(), reason)
        } else {
            resync_payload(&target.tbl, seq())
        };
        emit(&notice(payload), 0);
    }
}
