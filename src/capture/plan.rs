//! What a watch trigger needs to encode a row, resolved once per trigger and backend.
//!
//! A plan comes from the fields of the trigger's argument (`args`: channel, table name, key count,
//! column names, as written by `watch_table`; the key count is followed by ` compact` for a compact
//! watch) and the table's tuple descriptor. It is cached by trigger OID and
//! dropped when the table's relcache entry is invalidated (ALTER TABLE, CREATE/DROP TRIGGER, …),
//! so the per-row path does no catalog lookups.

use std::cell::{OnceCell, RefCell, UnsafeCell};
use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys::{self, Oid};
use pgrx::{pg_guard, warning, PgSqlErrorCode};

use super::transition::TransitionSlots;
use crate::define::store::made_by_pgwatch;
use crate::encode::image::{pair_prefix, Full, ImageBuilder, MAX_PAYLOAD};
use crate::encode::packer::{cols_header, row_budget, MAX_TABLE_NAME};
use crate::error::fail;
use crate::fxhash::FxHashMap;
use crate::model::trigger_arg::{Layout, Moves, TriggerArg};
use crate::model::watch::{OnTruncate, Rows, Target};
use crate::unguarded;

/// How a column's value becomes JSON.
pub enum Encoding {
    Int2,
    Int4,
    Int8,
    Oid,
    Bool,
    /// text, varchar, char(n): the bytes themselves, escaped.
    Text,
    /// float and numeric: their text output as a JSON number, or a string for NaN and infinities.
    Number(OutputFunction),
    /// Any other type: its text output as a JSON string.
    Output(OutputFunction),
}

pub struct Column {
    pub attno: i16,
    /// `"name":`, ready to copy.
    pub prefix: Box<[u8]>,
    pub encoding: Encoding,
}

pub struct Columns {
    pub list: Vec<Column>,
    pub keys: usize,
    /// The most bytes one rendered row may take.
    pub row_budget: usize,
    /// The highest attribute number listed: a slot is deformed up to it, no further.
    last_attno: i16,
}

pub struct Plan {
    pub target: Rc<Target>,
    /// What a TRUNCATE of the table sends the watch's subscribers.
    pub on_truncate: OnTruncate,
    /// Which rows moved between partitions the trigger reports (see `Watch::move_events`).
    pub moves: Moves,
    relid: Oid,
    /// `None` when a watched column is gone from the table: rows are reported as overflows.
    pub columns: Option<Columns>,
    /// Made when a statement trigger first reads its transition tables.
    pub transition_slots: OnceCell<TransitionSlots>,
}

thread_local! {
    static PLANS: RefCell<FxHashMap<Oid, Rc<Plan>>> = RefCell::default();
}

/// The plan of the trigger being fired, built on its first row in this backend.
///
/// # Safety
/// `data` must be the `TriggerData` of a running `pgwatch.capture` trigger.
pub unsafe fn for_trigger(data: &pg_sys::TriggerData) -> Rc<Plan> {
    // SAFETY: a firing trigger's TriggerData points to its Trigger and open Relation.
    let (trigger, rel) = unsafe { (&*data.tg_trigger, data.tg_relation) };
    if let Some(plan) = PLANS.with_borrow(|plans| plans.get(&trigger.tgoid).cloned()) {
        return plan;
    }
    // SAFETY: as above; building may look up catalogs, and the borrow of PLANS is released.
    let plan = Rc::new(unsafe { build(trigger, rel) });
    PLANS.with_borrow_mut(|plans| plans.insert(trigger.tgoid, plan.clone()));
    plan
}

/// # Safety
/// `trigger` and `rel` must be a firing trigger's.
unsafe fn build(trigger: &pg_sys::Trigger, rel: pg_sys::Relation) -> Plan {
    // SAFETY: tgargs holds tgnargs NUL-terminated strings.
    let args: Vec<&[u8]> =
        (0..trigger.tgnargs as usize).map(|i| unsafe { CStr::from_ptr(*trigger.tgargs.add(i)) }.to_bytes()).collect();
    let refuse = |why: &str| -> ! {
        fail(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            format!("pgwatch.capture() was fired with arguments watch_table() never gives it: {why}"),
            "watch tables with watch_table(), which creates pgwatch's triggers",
        )
    };
    // What the delivery worker could not send must never reach its queue.
    let arg = TriggerArg::read(&args).unwrap_or_else(|why| refuse(&why));
    // SAFETY: a firing trigger's name is a NUL-terminated string; rel is open.
    let (name, relid) = unsafe { (CStr::from_ptr(trigger.tgname).to_string_lossy(), (*rel).rd_id) };
    let Some(tbl) = made_by_pgwatch(&name, relid, &arg) else {
        refuse(&format!(
            "trigger \"{name}\" is not a trigger of a watch of this table on channel \"{}\" with its columns",
            String::from_utf8_lossy(&arg.channel)
        ));
    };
    let compact = arg.layout == Layout::Compact;
    let rows = if compact {
        let names: Vec<_> = arg.columns.iter().map(|n| String::from_utf8_lossy(n)).collect();
        cols_header(names.iter().map(|n| n.as_ref())).ok().map(Rows::Compact)
    } else {
        Some(Rows::Objects)
    };
    let channel = CString::new(arg.channel).expect("a trigger argument holds no NUL byte");
    // The watched table's name now, not the one the argument was written with (see
    // `made_by_pgwatch`).
    let tbl = String::from_utf8_lossy(&tbl).into_owned();
    if tbl.len() > MAX_TABLE_NAME {
        refuse(&format!("a table name of {} bytes (at most {MAX_TABLE_NAME})", tbl.len()));
    }
    let target = Rc::new(Target { channel, tbl, rows: rows.clone().unwrap_or(Rows::Objects), retained: arg.retained });
    // SAFETY: rel is open for the trigger's whole run.
    let columns = unsafe { resolve(rel, &arg.columns, compact) };
    let columns = match (columns, rows) {
        (Ok(list), Some(_)) if arg.keys <= list.len() => {
            let last_attno = list.iter().map(|c| c.attno).max().unwrap_or(0);
            let row_budget = row_budget(&target.tbl, target.cols());
            Some(Columns { list, keys: arg.keys, row_budget, last_attno })
        }
        (Ok(_), None) => {
            warning!(
                "pgwatch: the column names watched on {} are too long for a compact payload; its changes are sent as overflow notices",
                target.tbl
            );
            None
        }
        (Ok(_), Some(_)) => None,
        (Err(missing), _) => {
            warning!(
                "pgwatch: column \"{missing}\" watched on {} is gone; its changes are sent as overflow notices until it is watched again",
                target.tbl
            );
            None
        }
    };
    Plan { target, on_truncate: arg.on_truncate, moves: arg.moves, relid, columns, transition_slots: OnceCell::new() }
}

/// Finds each named column in `rel` and how to encode it (a compact watch's values go without
/// names); `Err` names the first one missing.
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn resolve(rel: pg_sys::Relation, names: &[Vec<u8>], compact: bool) -> Result<Vec<Column>, String> {
    // SAFETY: an open relation has a valid tuple descriptor.
    let attrs = unsafe { attributes(&*(*rel).rd_att) };
    names
        .iter()
        .map(|name| {
            let missing = || String::from_utf8_lossy(name).into_owned();
            let named = |a: &&pg_sys::FormData_pg_attribute| {
                // SAFETY: an attribute's name is a NUL-terminated string in its NameData.
                unsafe { CStr::from_ptr(a.attname.data.as_ptr()) }.to_bytes() == name
            };
            let attr = attrs.iter().find(|a| !a.attisdropped && named(a)).ok_or_else(missing)?;
            let prefix = if compact {
                Box::default()
            } else {
                pair_prefix(&String::from_utf8_lossy(name)).map_err(|_| missing())?
            };
            // SAFETY: the attribute's type exists while the column does.
            let encoding = unsafe { encoding(attr.atttypid) };
            Ok(Column { attno: attr.attnum, prefix, encoding })
        })
        .collect()
}

/// The attributes of `tupdesc`, as `TupleDescAttr` reads them.
///
/// # Safety
/// `tupdesc` must be a valid tuple descriptor.
#[cfg(not(feature = "pg18"))]
unsafe fn attributes(tupdesc: &pg_sys::TupleDescData) -> &[pg_sys::FormData_pg_attribute] {
    // SAFETY: a valid descriptor holds `natts` attributes.
    unsafe { tupdesc.attrs.as_slice(tupdesc.natts as usize) }
}

/// The attributes of `tupdesc`, as `TupleDescAttr` reads them: from PostgreSQL 18 on they follow
/// the descriptor's `natts` compact attributes.
///
/// # Safety
/// `tupdesc` must be a valid tuple descriptor.
#[cfg(feature = "pg18")]
unsafe fn attributes(tupdesc: &pg_sys::TupleDescData) -> &[pg_sys::FormData_pg_attribute] {
    let natts = tupdesc.natts as usize;
    // SAFETY: a valid descriptor holds `natts` compact attributes followed by `natts` attributes.
    unsafe {
        let first = tupdesc.compact_attrs.as_ptr().add(natts).cast::<pg_sys::FormData_pg_attribute>();
        std::slice::from_raw_parts(first, natts)
    }
}

/// # Safety
/// `typid` must be an existing type.
unsafe fn encoding(typid: Oid) -> Encoding {
    // SAFETY: syscache lookups of an existing type.
    let base = unsafe { pg_sys::getBaseType(typid) };
    let output = || {
        let (mut func, mut varlena) = (Oid::INVALID, false);
        // SAFETY: as above; the FmgrInfo lives in TopMemoryContext like the cached plan.
        unsafe {
            pg_sys::getTypeOutputInfo(typid, &mut func, &mut varlena);
            let info = OutputFunction(Box::new(UnsafeCell::new(std::mem::zeroed())));
            pg_sys::fmgr_info_cxt(func, info.0.get(), pg_sys::TopMemoryContext);
            info
        }
    };
    match base {
        pg_sys::INT2OID => Encoding::Int2,
        pg_sys::INT4OID => Encoding::Int4,
        pg_sys::INT8OID => Encoding::Int8,
        pg_sys::OIDOID => Encoding::Oid,
        pg_sys::BOOLOID => Encoding::Bool,
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Encoding::Text,
        pg_sys::FLOAT4OID | pg_sys::FLOAT8OID | pg_sys::NUMERICOID => Encoding::Number(output()),
        _ => Encoding::Output(output()),
    }
}

/// Drops the plans of `relid`'s triggers (of every table when `relid` is invalid).
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: Oid) {
    PLANS.with_borrow_mut(|plans| plans.retain(|_, plan| relid != Oid::INVALID && plan.relid != relid));
}

/// Keeps cached plans in step with table definitions (once, when the library loads).
pub fn register_invalidation() {
    // SAFETY: registers a plain function for the backend's lifetime.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0)) };
}

impl Columns {
    /// Whether imaging a row may allocate PostgreSQL memory: output functions do, and detoasting
    /// a text value may. Integers, booleans and OIDs never do.
    pub fn allocates(&self) -> bool {
        self.list.iter().any(|c| matches!(c.encoding, Encoding::Text | Encoding::Number(_) | Encoding::Output(_)))
    }

    /// The watched columns of a row trigger's tuple; `None` when even its key does not fit a
    /// payload.
    ///
    /// # Safety
    /// `tuple` must be a valid tuple described by `tupdesc`.
    pub unsafe fn image_of_tuple(
        &self,
        tuple: pg_sys::HeapTuple,
        tupdesc: pg_sys::TupleDesc,
    ) -> Option<crate::encode::image::Image> {
        self.image(|attno| {
            let mut isnull = false;
            // SAFETY: as the caller promised; attno is a live column of this descriptor (checked
            // when the plan was built).
            let datum = unsafe { pg_sys::heap_getattr(tuple, attno as i32, tupdesc, &mut isnull) };
            (datum, isnull)
        })
    }

    /// The watched columns of the row in `slot` (read from a transition table), deformed once.
    ///
    /// # Safety
    /// `slot` must hold a row of the table this plan was built for.
    pub unsafe fn image_of_slot(&self, slot: *mut pg_sys::TupleTableSlot) -> Option<crate::encode::image::Image> {
        // SAFETY: as the caller promised; afterwards tts_values and tts_isnull hold the first
        // last_attno columns.
        let (values, nulls) = unsafe {
            unguarded::slot_getsomeattrs_int(slot, self.last_attno as i32);
            ((*slot).tts_values, (*slot).tts_isnull)
        };
        // SAFETY: attno is between 1 and last_attno.
        self.image(|attno| unsafe { (*values.add(attno as usize - 1), *nulls.add(attno as usize - 1)) })
    }

    /// Builds the image from `value(attno)`: key columns, then extras while they fit.
    #[inline(always)]
    fn image(&self, value: impl Fn(i16) -> (pg_sys::Datum, bool)) -> Option<crate::encode::image::Image> {
        let mut builder = ImageBuilder::new(self.row_budget);
        for column in &self.list[..self.keys] {
            let (datum, isnull) = value(column.attno);
            // SAFETY: the datum is a value of the column's type.
            unsafe { column.write(&mut builder, datum, isnull) }.ok()?;
        }
        builder.end_key();
        let mark = builder.mark();
        for column in &self.list[self.keys..] {
            let (datum, isnull) = value(column.attno);
            // SAFETY: as above.
            if unsafe { column.write(&mut builder, datum, isnull) }.is_err() {
                builder.rollback(mark);
                return Some(builder.finish(true));
            }
        }
        Some(builder.finish(false))
    }
}

impl Column {
    /// # Safety
    /// Unless `isnull`, `datum` must be a value of the column's type.
    unsafe fn write(&self, out: &mut ImageBuilder, datum: pg_sys::Datum, isnull: bool) -> Result<(), Full> {
        let prefix = &self.prefix[..];
        if isnull {
            return out.raw_pair(prefix, b"null");
        }
        match &self.encoding {
            Encoding::Int2 => out.int_pair(prefix, datum.value() as i16 as i64),
            Encoding::Int4 => out.int_pair(prefix, datum.value() as i32 as i64),
            Encoding::Int8 => out.int_pair(prefix, datum.value() as i64),
            Encoding::Oid => out.int_pair(prefix, datum.value() as u32 as i64),
            Encoding::Bool => out.raw_pair(prefix, if datum.value() != 0 { b"true" } else { b"false" }),
            Encoding::Text => {
                // SAFETY: a non-null text datum is a varlena; checking its raw size first means an
                // oversized value is never detoasted.
                unsafe {
                    if pg_sys::toast_raw_datum_size(datum) > MAX_PAYLOAD {
                        return Err(Full);
                    }
                    let text = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
                    out.string_pair(prefix, pgrx::varlena::varlena_to_byte_slice(text))
                }
            }
            Encoding::Number(output) => {
                // SAFETY: the output function of the column's type, on a non-null datum of it.
                let text = unsafe { output.call(datum) };
                if is_json_number(text) {
                    out.raw_pair(prefix, text)
                } else {
                    out.string_pair(prefix, text)
                }
            }
            // SAFETY: as above.
            Encoding::Output(output) => out.string_pair(prefix, unsafe { output.call(datum) }),
        }
    }
}

/// A type's output function, looked up once. PostgreSQL may cache state in it on every call.
pub struct OutputFunction(Box<UnsafeCell<pg_sys::FmgrInfo>>);

impl OutputFunction {
    /// The datum's text, in the current (per-tuple) memory context.
    ///
    /// # Safety
    /// `datum` must be a non-null value of the type this function was looked up for.
    unsafe fn call<'a>(&self, datum: pg_sys::Datum) -> &'a [u8] {
        // SAFETY: the FmgrInfo is initialised and only used by this backend, one call at a time.
        unsafe { CStr::from_ptr(pg_sys::OutputFunctionCall(self.0.get(), datum)).to_bytes() }
    }
}

/// Float and numeric output is a JSON number unless it is NaN or ±Infinity.
fn is_json_number(text: &[u8]) -> bool {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    digits.first().is_some_and(u8::is_ascii_digit)
}
