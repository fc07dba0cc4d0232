//! The trigger each watch installs: encodes the changed rows' watched columns (or notes a
//! TRUNCATE) and records them for this transaction. No SPI, no catalog lookups for rows and
//! nothing that can fail a user's write.
//!
//! Plain tables get statement triggers that read the statement's transition tables: PostgreSQL
//! then only appends each row to a tuplestore, instead of queueing an AFTER-trigger event per row
//! and fetching the row again to fire it. Row triggers remain where a statement trigger would
//! miss rows or see them out of order, or cannot express the watch (`catalog` decides).

use std::convert::Infallible;

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use super::mute;
use super::plan::{self, Columns, Plan};
use super::transition::{RowMemory, TransitionSlots, TransitionTable};
use crate::deliver::xact;
use crate::encode::fold::Change;
use crate::encode::image::Image;
use crate::error::fail;
use crate::model::events::Op;
use crate::model::watch::OnTruncate;
use crate::{guc, unguarded};

/// What `pgwatch.capture()` does when it fires (see `sql.rs`).
pub fn capture<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    let data = trigger.trigger_data();
    if guc::MUTE.get() && may_mute(data) {
        return Ok(None);
    }
    let event = data.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    let is_row = data.tg_event & pg_sys::TRIGGER_EVENT_ROW != 0;
    let op = match event {
        pg_sys::TRIGGER_EVENT_INSERT => Op::Insert,
        pg_sys::TRIGGER_EVENT_UPDATE => Op::Update,
        pg_sys::TRIGGER_EVENT_DELETE => Op::Delete,
        _ if !is_row => {
            // SAFETY: this is a firing trigger of pgwatch.capture.
            let plan = unsafe { plan::for_trigger(data) };
            xact::record_truncate(&plan.target, plan.on_truncate);
            // SAFETY: a firing statement trigger's relation, which its TRUNCATE emptied and
            // locked with its partitions.
            if plan.on_truncate == OnTruncate::Notice && unsafe { refilled(data.tg_relation) } {
                xact::refetch_at_commit(vec![plan.target.clone()]);
            }
            return Ok(None);
        }
        _ => misfired("a row trigger on TRUNCATE"),
    };
    let missing_tables = match op {
        Op::Insert => data.tg_newtable.is_null(),
        Op::Update => data.tg_oldtable.is_null() || data.tg_newtable.is_null(),
        Op::Delete => data.tg_oldtable.is_null(),
    };
    if !is_row && missing_tables {
        misfired("a statement trigger without the transition tables watch_table() asks for");
    }
    // A statement that changed no row has nothing to report, not even an overflow.
    let table = if op == Op::Delete { data.tg_oldtable } else { data.tg_newtable };
    // SAFETY: a transition table of the firing statement, checked above to be there.
    let statement_rows = if is_row { 1 } else { unsafe { unguarded::tuplestore_tuple_count(table) } };
    if statement_rows <= 0 {
        return Ok(None);
    }
    // SAFETY: this is a firing trigger of pgwatch.capture.
    let plan = unsafe { plan::for_trigger(data) };
    // SAFETY: a firing row trigger's data, of the plan's trigger.
    let half = if is_row { unsafe { moves::half(data, &plan, op) } } else { moves::Half::Record };
    let image = |tuple| {
        // SAFETY: a row trigger's tuples are valid and described by its relation's descriptor.
        plan.columns.as_ref().map(|columns| unsafe { columns.image_of_tuple(tuple, (*data.tg_relation).rd_att) })
    };
    match half {
        moves::Half::Skip => return Ok(None),
        moves::Half::Hold(pending) => {
            // An image that does not fit, or a column gone, is held as an overflow.
            moves::hold(pending, image(data.tg_trigtuple).flatten());
            return Ok(None);
        }
        moves::Half::AfterHeld(held) => record(&plan, Op::Delete, Some(held), None),
        moves::Half::Record => {}
    }
    let Some(columns) = &plan.columns else {
        xact::record_overflow(&plan.target, op);
        return Ok(None);
    };
    if is_row {
        // SAFETY: a row trigger's tuples are valid and described by its relation's descriptor:
        // the old row (or the inserted one) in tg_trigtuple, the new row of an update in
        // tg_newtuple.
        let image = |tuple| unsafe { columns.image_of_tuple(tuple, (*data.tg_relation).rd_att) };
        let (before, after) = match op {
            Op::Insert => (None, Some(data.tg_trigtuple)),
            Op::Update => (Some(data.tg_trigtuple), Some(data.tg_newtuple)),
            Op::Delete => (Some(data.tg_trigtuple), None),
        };
        // SAFETY: a firing AFTER row trigger's new row, fetched from its table.
        let stale = after.is_some_and(|tuple| unsafe { changed_since(tuple) });
        let after = after.map(|tuple| image(tuple).map(|image| if stale { image.key_only() } else { image }));
        record(&plan, op, before.map(image), after);
    } else {
        // SAFETY: the transition tables of a firing statement trigger on the plan's table.
        unsafe { record_transition_tables(data, &plan, columns, op, statement_rows) };
    }
    Ok(None)
}

/// Rows an UPDATE moves from one partition to another (see `Watch::move_events`).
mod moves {
    use std::cell::RefCell;
    use std::ffi::CString;

    use pgrx::pg_sys;

    use crate::capture::plan::Plan;
    use crate::encode::image::Image;
    use crate::model::events::Op;
    use crate::model::trigger_arg::Moves;

    /// A moved row's delete half that waits for its insert half: the channel of its watch, the
    /// command that moved it, and the old row when it is held (`Some(None)`: one that does not
    /// fit, sent as an overflow) rather than sent already.
    struct Waiting {
        channel: CString,
        command: pg_sys::CommandId,
        held: Option<Option<Image>>,
    }

    thread_local! {
        /// This transaction's waiting delete halves, with the top-level xid they belong to.
        static WAITING: RefCell<(pg_sys::TransactionId, Vec<Waiting>)> =
            const { RefCell::new((pg_sys::InvalidTransactionId, Vec::new())) };
    }

    /// What a row trigger does with its row.
    pub enum Half {
        /// Records it: a row of the trigger's event, or a moved row's half it reports.
        Record,
        /// Nothing: a move trigger's row that was not moved (or whose delete half the watch did
        /// not report).
        Skip,
        /// Holds the old row of a moved row until its insert half comes (see [`hold`]).
        Hold(Pending),
        /// Records the held delete half (`None`: as an overflow) before this insert half.
        AfterHeld(Option<Image>),
    }

    /// A delete half to hold.
    pub struct Pending {
        channel: CString,
        command: pg_sys::CommandId,
    }

    /// What the row trigger of `plan` does with its row (see [`Half`]). PostgreSQL runs a move
    /// as a delete from one partition (the old row's header then says "moved to another
    /// partition") and an insert into another, by the same command, and fires the delete's
    /// AFTER triggers right before the insert's: an insert of that command that follows a moved
    /// row's delete for the same watch is its other half. A delete half whose insert half does
    /// not come (its WHEN failed; a BEFORE trigger dropped the insert) stays a delete alone, or
    /// when held is dropped with the next command's.
    ///
    /// # Safety
    /// `data` must be a firing AFTER row trigger's, of `plan`'s trigger.
    pub unsafe fn half(data: &pg_sys::TriggerData, plan: &Plan, op: Op) -> Half {
        let otherwise = if plan.moves == Moves::All { Half::Record } else { Half::Skip };
        if plan.moves == Moves::Clear && op != Op::Insert {
            return Half::Skip;
        }
        // SAFETY: a firing trigger's relation is open, with its pg_class row. Row triggers on a
        // partitioned table fire on its partitions.
        if !unsafe { (*(*data.tg_relation).rd_rel).relispartition } {
            return otherwise;
        }
        // SAFETY: as the caller promised, the row of a firing AFTER insert or delete trigger,
        // fetched from its table, written by this transaction.
        let header = unsafe { (*data.tg_trigtuple).t_data };
        match op {
            // SAFETY: as above: the old row of a firing AFTER delete trigger.
            Op::Delete if unsafe { moved_away(header) } => {
                // SAFETY: this transaction deleted the row.
                let command = unsafe { pg_sys::HeapTupleHeaderGetCmax(header) };
                let channel = plan.target.channel.clone();
                if plan.moves == Moves::OnlyWithInsert {
                    return Half::Hold(Pending { channel, command });
                }
                wait(Waiting { channel, command, held: None });
                Half::Record
            }
            Op::Insert => {
                let waited = waiting(|waiting| {
                    let channel = &plan.target.channel;
                    if waiting.is_empty() {
                        return None;
                    }
                    // SAFETY: the header of a row of the trigger's table.
                    let ours = unsafe { pg_sys::TransactionIdIsCurrentTransactionId((*header).t_choice.t_heap.t_xmin) };
                    let at = if ours {
                        // SAFETY: this transaction inserted the row.
                        let command = unsafe { pg_sys::HeapTupleHeaderGetCmin(header) };
                        waiting.iter().position(|w| w.command == command && &w.channel == channel)?
                    } else {
                        // A row a foreign partition hands back has no inserting transaction, and
                        // no command: the move's delete half is the watch's last one.
                        waiting.iter().rposition(|w| &w.channel == channel)?
                    };
                    Some(waiting.remove(at))
                });
                match (waited, plan.moves) {
                    (_, Moves::Clear) => Half::Skip,
                    (Some(Waiting { held: Some(held), .. }), _) => Half::AfterHeld(held),
                    (Some(_), _) => Half::Record,
                    (None, _) => otherwise,
                }
            }
            _ => otherwise,
        }
    }

    /// Holds a delete half's old row (`None`: as an overflow) until its insert half comes.
    pub fn hold(pending: Pending, old: Option<Image>) {
        wait(Waiting { channel: pending.channel, command: pending.command, held: Some(old) });
    }

    /// Adds a delete half to wait for its insert half, in place of one of the same watch and
    /// command whose insert half never came, and of those of later commands (nested statements
    /// that have ended; earlier ones may be the statement around this one, whose halves are
    /// still to come).
    fn wait(half: Waiting) {
        waiting(|waiting| {
            waiting.retain(|w| w.command < half.command || w.command == half.command && w.channel != half.channel);
            if waiting.len() >= MOST_WAITING {
                waiting.remove(0);
            }
            waiting.push(half);
        });
    }

    /// Delete halves kept waiting at most: one per watch of a statement and of the statements
    /// around it, whose insert halves did not come (a BEFORE trigger that dropped the insert).
    const MOST_WAITING: usize = 64;

    /// Runs `f` on this transaction's waiting halves (those of an earlier one are dropped).
    fn waiting<T>(f: impl FnOnce(&mut Vec<Waiting>) -> T) -> T {
        // SAFETY: reading the transaction's id; a row was deleted or inserted, so it has one.
        let xid = unsafe { pg_sys::GetTopTransactionIdIfAny() };
        WAITING.with_borrow_mut(|(of, waiting)| {
            if *of != xid {
                *of = xid;
                waiting.clear();
            }
            f(waiting)
        })
    }

    /// Whether a deleted row was moved to another partition: its header's next-version pointer
    /// says so instead of pointing to a row.
    ///
    /// # Safety
    /// `header` must be the header of a firing AFTER delete trigger's old row.
    unsafe fn moved_away(header: pg_sys::HeapTupleHeader) -> bool {
        // SAFETY: as the caller promised, the header is valid.
        let ctid = unsafe { (*header).t_ctid };
        let block = (u32::from(ctid.ip_blkid.bi_hi) << 16) | u32::from(ctid.ip_blkid.bi_lo);
        // MovedPartitionsBlockNumber is InvalidBlockNumber.
        u32::from(ctid.ip_posid) == pg_sys::MovedPartitionsOffsetNumber && block == u32::MAX
    }
}

/// Whether a row trigger's new row was changed again by this transaction before the trigger fired:
/// another trigger that fires before pgwatch's updated or deleted it inside the statement, and
/// that later change reached pgwatch first. The change is then recorded with the row cut to its
/// key (partial), which subscribers fetch; the fold keeps the row so (see `encode::fold`), even
/// when the later change put the row back as it was before the statement. Most rows carry no
/// deleting transaction at all, which is read from the header's flags.
///
/// # Safety
/// `tuple` is a firing AFTER row trigger's tuple, fetched from its table.
unsafe fn changed_since(tuple: *mut pg_sys::HeapTupleData) -> bool {
    // SAFETY: as the caller promises, the tuple and its header are valid; a later change by this
    // very backend is all that matters, and it is complete.
    unsafe {
        let header = (*tuple).t_data;
        let infomask = u32::from((*header).t_infomask);
        let raw_xmax = (*header).t_choice.t_heap.t_xmax;
        if infomask & pg_sys::HEAP_XMAX_INVALID != 0 || raw_xmax == pg_sys::InvalidTransactionId {
            return false;
        }
        let locked_only = infomask & pg_sys::HEAP_XMAX_LOCK_ONLY != 0
            || infomask & (pg_sys::HEAP_XMAX_IS_MULTI | pg_sys::HEAP_LOCK_MASK) == pg_sys::HEAP_XMAX_EXCL_LOCK;
        if locked_only {
            return false;
        }
        let xmax =
            if infomask & pg_sys::HEAP_XMAX_IS_MULTI != 0 { pg_sys::HeapTupleGetUpdateXid(header) } else { raw_xmax };
        pg_sys::TransactionIdIsCurrentTransactionId(xmax)
    }
}

/// Whether `pgwatch.mute` silences this trigger's table for the current user (see `mute`).
fn may_mute(data: &pg_sys::TriggerData) -> bool {
    // SAFETY: a firing trigger's relation is open, its pg_class row in rd_rel.
    mute::silences(unsafe { (*(*data.tg_relation).rd_rel).relowner })
}

/// Whether `rel`, which the firing TRUNCATE just emptied, holds pages again: another AFTER
/// TRUNCATE trigger of the command (the table's own, named before pgwatch's, or one of another
/// table the command truncated) wrote it before pgwatch's fired, and the truncate just recorded
/// drops the rows recorded before it. Its subscribers then refetch after the truncate. Reads
/// the relation cache only; a partitioned table's partitions are looked at.
///
/// # Safety
/// `rel` must be open, and it and its partitions locked by the TRUNCATE.
unsafe fn refilled(rel: pg_sys::Relation) -> bool {
    // SAFETY: as the caller promised; partitions are opened by OID under the TRUNCATE's lock
    // and closed again.
    unsafe {
        match (*(*rel).rd_rel).relkind as u8 {
            pg_sys::RELKIND_RELATION => {
                pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM) > 0
            }
            pg_sys::RELKIND_PARTITIONED_TABLE => {
                #[cfg(feature = "pg13")]
                let desc = pg_sys::RelationGetPartitionDesc(rel);
                #[cfg(not(feature = "pg13"))]
                let desc = pg_sys::RelationGetPartitionDesc(rel, true);
                let Some(desc) = desc.as_ref() else { return false };
                (0..desc.nparts as usize).any(|i| {
                    let partition = pg_sys::RelationIdGetRelation(*desc.oids.add(i));
                    if partition.is_null() {
                        return false;
                    }
                    let filled = refilled(partition);
                    pg_sys::RelationClose(partition);
                    filled
                })
            }
            _ => false,
        }
    }
}

/// Records one row's change from its images (`Some(None)`: an image that does not fit).
fn record(plan: &Plan, op: Op, before: Option<Option<Image>>, after: Option<Option<Image>>) {
    match (before, after) {
        (Some(None), _) | (_, Some(None)) => xact::record_overflow(&plan.target, op),
        (before, after) => xact::record(&plan.target, op, Change { before: before.flatten(), after: after.flatten() }),
    }
}

/// Records every row of a statement (`rows` of them) from its transition tables. An update's old
/// and new rows are stored pairwise, in the order the rows changed, so the two tables are read in
/// step.
///
/// # Safety
/// `data` must be a firing statement trigger's, with the transition tables `op` needs, on the
/// table `plan` was built for.
unsafe fn record_transition_tables(data: &pg_sys::TriggerData, plan: &Plan, columns: &Columns, op: Op, rows: i64) {
    // SAFETY: as the caller promised, the transition tables hold rows of the plan's table.
    let tupdesc = unsafe { (*data.tg_relation).rd_att };
    // SAFETY: the statement's transition tables hold rows `tupdesc` describes.
    let kept = plan.transition_slots.get_or_init(|| unsafe { TransitionSlots::new(tupdesc) });
    // A statement of the same trigger fired while this one reads would read through its own.
    let nested;
    let lent = match kept.lend() {
        Some(lent) => lent,
        None => {
            // SAFETY: as above.
            nested = unsafe { TransitionSlots::new(tupdesc) };
            nested.lend().expect("new slots are free")
        }
    };
    let [old_slot, new_slot] = lent.0.slots;
    let open = |table: *mut pg_sys::Tuplestorestate, slot| {
        // SAFETY: a transition table of this statement, holding rows of the trigger's table, each
        // read through a slot of its own.
        (!table.is_null()).then(|| unsafe { TransitionTable::open(table, slot) })
    };
    let (mut old, mut new) = match op {
        Op::Insert => (None, open(data.tg_newtable, new_slot)),
        Op::Update => (open(data.tg_oldtable, old_slot), open(data.tg_newtable, new_slot)),
        Op::Delete => (open(data.tg_oldtable, old_slot), None),
    };
    xact::expect_rows(&plan.target, usize::try_from(rows).unwrap_or(0));
    let per_row = columns.allocates().then(RowMemory::new);
    loop {
        // Per table: None when the op has no such table, Some(None) once it is read to its end.
        let (old_row, new_row) = (old.as_mut().map(TransitionTable::next), new.as_mut().map(TransitionTable::next));
        match (old_row, new_row) {
            (None | Some(None), None | Some(None)) => break,
            // Old and new rows of an update come in pairs; if one table ran out first, the rest
            // cannot be listed, only announced.
            (Some(None), Some(Some(_))) | (Some(Some(_)), Some(None)) => {
                xact::record_overflow(&plan.target, op);
                break;
            }
            (old_row, new_row) => {
                // SAFETY: each slot holds a row of the trigger's table until its next read. The
                // rows are read outside per_row, so a slot never holds a tuple its reset frees.
                let image = |row: Option<Option<_>>| {
                    row.flatten().map(|slot| {
                        // SAFETY: as above.
                        let image = || unsafe { columns.image_of_slot(slot) };
                        match &per_row {
                            Some(memory) => memory.run(image),
                            None => image(),
                        }
                    })
                };
                // A row whose key does not fit a payload is recorded as an overflow; the
                // statement's other rows are still listed.
                record(plan, op, image(old_row), image(new_row));
            }
        }
    }
}

/// pgwatch.capture() was attached by hand in a way watch_table() never does.
fn misfired(how: &str) -> ! {
    fail(
        PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
        format!("pgwatch.capture() was fired as {how}"),
        "watch tables with watch_table(), which creates pgwatch's triggers",
    )
}
