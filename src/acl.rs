//! Privilege checks of the current role on schemas and databases, which PostgreSQL 16 folded
//! from one function per kind of object into one.

use pgrx::pg_sys;

/// An object a privilege is checked on, which must exist.
pub enum Object {
    Schema(pg_sys::Oid),
    Database(pg_sys::Oid),
}

/// Whether the current role holds `mode` on `object`.
pub fn allowed(object: Object, mode: u32) -> bool {
    // SAFETY: reading the current user's id.
    let user = unsafe { pg_sys::GetUserId() };
    // SAFETY: a plain ACL check of an existing object.
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    let result = unsafe {
        match object {
            Object::Schema(oid) => pg_sys::pg_namespace_aclcheck(oid, user, mode as _),
            Object::Database(oid) => pg_sys::pg_database_aclcheck(oid, user, mode as _),
        }
    };
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    let (class, oid) = match object {
        Object::Schema(oid) => (pg_sys::NamespaceRelationId, oid),
        Object::Database(oid) => (pg_sys::DatabaseRelationId, oid),
    };
    // SAFETY: as above.
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    let result = unsafe { pg_sys::object_aclcheck(class, oid, user, mode as _) };
    result == pg_sys::AclResult::ACLCHECK_OK
}
