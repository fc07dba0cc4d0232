//! Settings (`pgwatch.*` GUCs).

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Row changes one transaction may track per watch before the rest are reported as an overflow.
pub static MAX_ROWS_PER_XACT: GucSetting<i32> = GucSetting::<i32>::new(100_000);

pub fn register() {
    GucRegistry::define_int_guc(
        c"pgwatch.max_rows_per_xact",
        c"Rows one transaction may track per watch before the rest are sent as an overflow notice.",
        c"Bounds the memory a large write uses: past the limit, subscribers get {\"overflow\":true} and refetch.",
        &MAX_ROWS_PER_XACT,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
}
