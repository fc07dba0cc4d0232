//! Who `pgwatch.mute` silences: a table only for a role with its owner's rights, and only when a
//! role with them turned it on, in the session or transaction itself (never as a default).

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};

use pgrx::pg_sys;

/// The role that turned `pgwatch.mute` on, while it is on (0 while it is off). Kept by the
/// setting's assign hook from what its check hook saw, so that it follows the value through
/// SET LOCAL, function SET clauses and rollbacks. (An atomic for a plain static: one backend.)
static SETTER: AtomicU32 = AtomicU32::new(0);

/// Whether `pgwatch.mute` silences the table `owner` owns for the current user. Only a role with
/// the owner's rights, who could as well disable its triggers, may mute it, so that no other
/// writer can hide its changes from subscribers: the current role, the role the session runs as
/// outside SECURITY DEFINER functions (a function of the owner's writes for others), and the
/// role that turned mute on (a SECURITY DEFINER function of another role's may leave it on for
/// the session with `set_config`).
pub fn silences(owner: pg_sys::Oid) -> bool {
    let setter = pg_sys::Oid::from(SETTER.load(Ordering::Relaxed));
    // SAFETY: membership checks of valid role oids; they read cached role lists (a catalog read
    // only when those changed).
    unsafe {
        pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner)
            && pg_sys::has_privs_of_role(pg_sys::GetOuterUserId(), owner)
            && setter != pg_sys::InvalidOid
            && pg_sys::has_privs_of_role(setter, owner)
    }
}

/// Whether `pgwatch.mute` may be on as it comes from `source`: only where a session or a
/// transaction chose it (SET, SET LOCAL, a function's SET clause, a client's connection options).
/// A default for the server, a database or a role would silence sessions that never asked for
/// it, table owners' own among them: a database's owner may run `ALTER DATABASE ... SET`.
fn may_mute_from(on: bool, source: pg_sys::GucSource::Type) -> bool {
    use pg_sys::GucSource::*;
    !on || !matches!(
        source,
        PGC_S_ENV_VAR | PGC_S_FILE | PGC_S_ARGV | PGC_S_GLOBAL | PGC_S_DATABASE | PGC_S_USER | PGC_S_DATABASE_USER
    )
}

/// The check hook of `pgwatch.mute`: refuses `on` as a default (see [`may_mute_from`]), and
/// notes the role that turns it on. PostgreSQL checks database and role defaults only where they
/// apply (`ALTER DATABASE ... SET` is checked as `PGC_S_TEST`, as a function's SET clause is): a
/// session they would reach gets a WARNING and keeps mute off.
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn check(
    newval: *mut bool,
    extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes the proposed value.
    let on = unsafe { *newval };
    if !may_mute_from(on, source) {
        // SAFETY: static strings, which PostgreSQL only reads, for the report it makes right
        // after this returns (what GUC_check_errmsg() and the like set).
        unsafe {
            pg_sys::GUC_check_errmsg_string =
                c"pgwatch.mute = on is refused as a default of the server, a database or a role".as_ptr().cast_mut();
            pg_sys::GUC_check_errdetail_string =
                c"It applies only to the session or transaction that turns it on: a default would silence the writes of sessions that never asked for it."
                    .as_ptr()
                    .cast_mut();
            pg_sys::GUC_check_errhint_string =
                c"Run SET pgwatch.mute = on (or SET LOCAL) in the session that should send nothing."
                    .as_ptr()
                    .cast_mut();
        }
        return false;
    }
    if on {
        // SAFETY: memory PostgreSQL frees itself with the value (see `guc_extra`).
        let setter = unsafe { guc_extra(std::mem::size_of::<u32>()) }.cast::<u32>();
        if setter.is_null() {
            return false;
        }
        // SAFETY: a fresh allocation of the size of a u32, `extra` is PostgreSQL's slot for it,
        // and the current role is set in every backend that can change a setting.
        unsafe {
            setter.write(pg_sys::GetUserId().to_u32());
            *extra = setter.cast();
        }
    }
    true
}

/// The assign hook of `pgwatch.mute`: the role its check hook noted (none while it is off).
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn assign(newval: bool, extra: *mut c_void) {
    // SAFETY: `extra` is what `check` made for this value, or NULL.
    let setter = if newval && !extra.is_null() { unsafe { *extra.cast::<u32>() } } else { 0 };
    SETTER.store(setter, Ordering::Relaxed);
}

/// Memory for a setting's `extra`, which PostgreSQL frees when it no longer needs the value:
/// with free() before 16 (so from malloc()), with guc_free() from 16 on (so from guc_malloc()).
/// NULL when out of memory.
unsafe fn guc_extra(size: usize) -> *mut c_void {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    {
        extern "C" {
            fn malloc(size: usize) -> *mut c_void;
        }
        // SAFETY: the C library's allocator, which PostgreSQL's free() of it matches.
        unsafe { malloc(size) }
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    // SAFETY: PostgreSQL's allocator for settings; LOG leaves an out-of-memory failure to us.
    unsafe {
        pg_sys::guc_malloc(pg_sys::LOG as i32, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_sys::GucSource::*;

    #[test]
    fn mute_is_a_sessions_choice_never_a_default() {
        for chosen in [PGC_S_SESSION, PGC_S_CLIENT, PGC_S_INTERACTIVE, PGC_S_OVERRIDE, PGC_S_TEST] {
            assert!(may_mute_from(true, chosen), "{chosen}");
        }
        for default in [PGC_S_DATABASE, PGC_S_USER, PGC_S_DATABASE_USER, PGC_S_GLOBAL, PGC_S_FILE, PGC_S_ARGV] {
            assert!(!may_mute_from(true, default), "{default}");
            assert!(may_mute_from(false, default), "off is always fine: {default}");
        }
    }
}
