//! The trigger each watch installs: encodes the changed row's watched columns (or notes a
//! TRUNCATE) and records them for this transaction. No SPI, no catalog lookups and nothing that can
//! fail a user's write.

use std::convert::Infallible;

use pgrx::prelude::*;

use crate::coalesce::Change;
use crate::payload::Op;
use crate::{guc, plan, xact};

#[pg_trigger(
    sql = "CREATE FUNCTION pgwatch.capture() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
fn capture<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    if guc::MUTE.get() {
        return Ok(None);
    }
    let data = trigger.trigger_data();
    let event = data.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    let is_row = data.tg_event & pg_sys::TRIGGER_EVENT_ROW != 0;
    if is_row == (event == pg_sys::TRIGGER_EVENT_TRUNCATE) {
        error!("pgwatch.capture() must be fired FOR EACH ROW, or FOR EACH STATEMENT on TRUNCATE, as watch_table() creates it");
    }
    // SAFETY: this is a firing trigger of pgwatch.capture.
    let plan = unsafe { plan::for_trigger(data) };
    let op = match event {
        pg_sys::TRIGGER_EVENT_INSERT => Op::Insert,
        pg_sys::TRIGGER_EVENT_UPDATE => Op::Update,
        pg_sys::TRIGGER_EVENT_DELETE => Op::Delete,
        _ => {
            xact::record_truncate(&plan.target);
            return Ok(None);
        }
    };
    let Some(columns) = &plan.columns else {
        xact::record_overflow(&plan.target, op);
        return Ok(None);
    };
    // SAFETY: a row trigger's tuples are valid and described by its relation's descriptor: the
    // old row (or the inserted one) in tg_trigtuple, the new row of an update in tg_newtuple.
    let image = |tuple| unsafe { columns.image(tuple, (*data.tg_relation).rd_att) };
    let change = match op {
        Op::Insert => image(data.tg_trigtuple).map(|after| Change { before: None, after: Some(after) }),
        Op::Update => image(data.tg_trigtuple)
            .zip(image(data.tg_newtuple))
            .map(|(before, after)| Change { before: Some(before), after: Some(after) }),
        Op::Delete => image(data.tg_trigtuple).map(|before| Change { before: Some(before), after: None }),
    };
    match change {
        Some(change) => xact::record(&plan.target, op, change),
        // Not even the key fits a payload: the row cannot be identified, only announced.
        None => xact::record_overflow(&plan.target, op),
    }
    Ok(None)
}
