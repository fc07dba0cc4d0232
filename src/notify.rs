//! Sending one NOTIFY from the current transaction.

use std::ffi::{c_char, CStr};

use pgrx::pg_sys::ffi::pg_guard_ffi_boundary;

use crate::payload::MAX_PAYLOAD;
use crate::stats::{self, Counter};

unsafe extern "C-unwind" {
    /// The C function behind `NOTIFY`/`pg_notify()`; pgrx does not bind it.
    fn Async_Notify(channel: *const c_char, payload: *const c_char);
}

/// Queues `payload` on `channel` for delivery when the current transaction commits.
pub fn send(channel: &CStr, payload: &[u8], rows: usize) {
    assert!(payload.len() <= MAX_PAYLOAD, "payloads are built under the NOTIFY limit");
    let mut text = [0u8; MAX_PAYLOAD + 1];
    text[..payload.len()].copy_from_slice(payload);
    // SAFETY: both are NUL-terminated strings that outlive the call; Async_Notify copies them,
    // and the guard turns a PostgreSQL ERROR into a Rust panic instead of a longjmp over Rust frames.
    unsafe { pg_guard_ffi_boundary(|| Async_Notify(channel.as_ptr(), text.as_ptr().cast())) };
    stats::add(Counter::Notifications, 1);
    stats::add(Counter::PayloadBytes, payload.len() as u64);
    stats::add(Counter::RowsSent, rows as u64);
}
