//! The WHEN conditions of a watch's row triggers, parsed and resolved once and never again.
//!
//! A watch's `condition` and the comparisons of its `trigger_columns` are parsed under the
//! settings of the `watch_table` call and resolved (names looked up, types chosen) as the user who
//! made that call, into PostgreSQL's expression tree. The trigger keeps that tree
//! (`pg_trigger.tgqual`), and whenever pgwatch makes a watch's triggers again (following DDL,
//! upgrading) it copies the tree its trigger had. So the user's text is never parsed again, under
//! other settings (`standard_conforming_strings`, `search_path`) or as another role, and a
//! condition can use nothing its author could not.

use std::ffi::CString;

use pgrx::pg_sys::{self, Node};
use pgrx::spi::quote_identifier;
use pgrx::{PgList, PgRelation, PgSqlErrorCode};

use crate::api::fail;

/// A resolved WHEN expression, in the current memory context.
#[derive(Clone, Copy)]
pub struct When(*mut Node);

impl When {
    pub fn as_ptr(self) -> *mut Node {
        self.0
    }

    /// The WHEN of an existing trigger, from its `pg_trigger.tgqual` text.
    ///
    /// # Safety
    /// `tgqual` must be a trigger's stored WHEN expression.
    pub unsafe fn from_stored(tgqual: &str) -> When {
        let text = CString::new(tgqual).expect("a stored node tree holds no NUL byte");
        // SAFETY: the text is a node tree PostgreSQL wrote; reading it allocates in the current
        // memory context.
        When(unsafe { pg_sys::stringToNode(text.as_ptr()) }.cast())
    }

    /// Both conditions: what an update trigger with trigger columns and a condition checks.
    pub fn and(self, other: When) -> When {
        let mut args = PgList::<Node>::new();
        args.push(self.0);
        args.push(other.0);
        // SAFETY: two boolean expressions make a boolean AND expression.
        When(unsafe { pg_sys::makeBoolExpr(pg_sys::BoolExprType::AND_EXPR, args.into_pg(), -1) }.cast())
    }
}

/// A watch's `condition`, parsed: one SQL expression, checked with PostgreSQL's own parser so
/// that it cannot reach past the WHEN clause it is put in (anything else fails with 42601).
pub fn parse_condition(condition: &str) -> *mut Node {
    let Some(expression) = parse_expression(condition) else {
        fail(
            PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
            format!("condition is not a single SQL expression: {condition}"),
            "pass a boolean expression over NEW and OLD, e.g. NEW.status = 'active'",
        );
    };
    expression
}

/// `OLD.c IS DISTINCT FROM NEW.c OR ...` for each trigger column, parsed: an update that changes
/// none of them sends nothing. A type without an equality operator (json, point, …) is compared
/// as text. Built from quoted names only, so nothing a user wrote is parsed here.
pub fn parse_comparisons(rel: &PgRelation, columns: &[String]) -> Option<*mut Node> {
    if columns.is_empty() {
        return None;
    }
    let tupdesc = rel.tuple_desc();
    let comparisons: Vec<String> = columns
        .iter()
        .map(|column| {
            let typid = tupdesc.iter().find(|a| !a.is_dropped() && a.name() == column).map(|a| a.type_oid().value());
            // SAFETY: a type cache lookup of an existing column's type.
            let comparable = typid.is_some_and(|typid| unsafe {
                (*pg_sys::lookup_type_cache(typid, pg_sys::TYPECACHE_EQ_OPR as i32)).eq_opr != pg_sys::Oid::INVALID
            });
            let column = quote_identifier(column);
            let cast = if comparable { "" } else { "::pg_catalog.text" };
            format!("OLD.{column}{cast} IS DISTINCT FROM NEW.{column}{cast}")
        })
        .collect();
    Some(parse_expression(&comparisons.join(" OR ")).expect("pgwatch's comparisons are one expression"))
}

/// The expression `text` holds, if it holds exactly one; syntax errors are raised as PostgreSQL
/// reports them.
fn parse_expression(text: &str) -> Option<*mut Node> {
    // On lines of its own, so that a trailing `--` comment ends there.
    let Ok(select) = CString::new(format!("SELECT\n{text}\n")) else {
        fail(PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE, "condition contains a NUL byte".into(), "");
    };
    // SAFETY: parsing builds nodes in the current memory context; a syntax error is raised as an
    // ERROR with the parser's message.
    let parsed = unsafe { PgList::<pg_sys::RawStmt>::from_pg(raw_parse(select.as_ptr())) };
    if parsed.len() != 1 {
        return None;
    }
    // SAFETY: the parser returns RawStmts holding valid nodes, checked by tag before each cast.
    unsafe { single_expression((*parsed.get_ptr(0)?).stmt) }
}

/// # Safety
/// `sql` must be a NUL-terminated string.
unsafe fn raw_parse(sql: *const std::ffi::c_char) -> *mut pg_sys::List {
    // PG 14 added the parse mode argument.
    #[cfg(feature = "pg13")]
    // SAFETY: as the caller promised.
    return unsafe { pg_sys::raw_parser(sql) };
    #[cfg(not(feature = "pg13"))]
    // SAFETY: as the caller promised.
    return unsafe { pg_sys::raw_parser(sql, pg_sys::RawParseMode::RAW_PARSE_DEFAULT) };
}

/// The expression of `SELECT <expression>`, if `stmt` is that and nothing else.
///
/// # Safety
/// `stmt` must be a valid parse node.
unsafe fn single_expression(stmt: *mut Node) -> Option<*mut Node> {
    // SAFETY: checked to be a SelectStmt before the cast.
    unsafe {
        if !pgrx::is_a(stmt, pg_sys::NodeTag::T_SelectStmt) {
            return None;
        }
        let select = &*stmt.cast::<pg_sys::SelectStmt>();
        let targets = PgList::<pg_sys::ResTarget>::from_pg(select.targetList);
        let clauses = [
            select.distinctClause,
            select.fromClause,
            select.groupClause,
            select.windowClause,
            select.valuesLists,
            select.sortClause,
            select.lockingClause,
        ];
        let expressions = [select.whereClause, select.havingClause, select.limitOffset, select.limitCount];
        let plain = select.op == pg_sys::SetOperation::SETOP_NONE
            && select.intoClause.is_null()
            && select.withClause.is_null()
            && clauses.iter().all(|list| list.is_null())
            && expressions.iter().all(|node| node.is_null())
            && targets.len() == 1;
        let target = targets
            .get_ptr(0)
            .filter(|&target| plain && (*target).name.is_null() && (*target).indirection.is_null())?;
        Some((*target).val)
    }
}

/// Which row images a trigger's WHEN may read.
#[derive(Clone, Copy)]
pub struct Images {
    /// OLD: not in an insert trigger.
    pub old: bool,
    /// NEW: not in a delete trigger.
    pub new: bool,
}

/// Resolves `expression` (from [`parse_condition`] or [`parse_comparisons`]) as the current user,
/// as CREATE TRIGGER resolves a row trigger's WHEN on `rel`, with its checks and errors: a WHEN
/// must be boolean, may not hold a subquery or aggregate, and may read only `images`.
pub fn resolve(rel: &PgRelation, expression: *mut Node, images: Images) -> When {
    // SAFETY: the steps of CreateTrigger's own WHEN transformation, on an open relation, in a
    // parse state freed before returning; an ERROR leaves the state to the transaction's memory.
    unsafe {
        let pstate = old_and_new(rel);
        let when = pg_sys::transformExpr(
            pstate,
            pg_sys::copyObjectImpl(expression.cast()).cast(),
            pg_sys::ParseExprKind::EXPR_KIND_TRIGGER_WHEN,
        );
        let when = pg_sys::coerce_to_boolean(pstate, when, c"WHEN".as_ptr());
        pg_sys::assign_expr_collations(pstate, when);
        // The same checks as CreateTrigger's (pull_var_clause suffices: no subqueries).
        for var in PgList::<pg_sys::Var>::from_pg(pg_sys::pull_var_clause(when, 0)).iter_ptr() {
            let (message, allowed) = match (*var).varno as u32 {
                pg_sys::PRS2_OLD_VARNO => ("INSERT trigger's WHEN condition cannot reference OLD values", images.old),
                _ => ("DELETE trigger's WHEN condition cannot reference NEW values", images.new),
            };
            if !allowed {
                fail(
                    PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
                    message.into(),
                    "an insert has no OLD row and a delete no NEW row: watch only the events the condition applies to",
                );
            }
        }
        pg_sys::free_parsestate(pstate);
        When(when)
    }
}

/// A parse state whose range table holds `rel` as OLD (1) and NEW (2), as a trigger's WHEN sees
/// them.
///
/// # Safety
/// `rel` must be open.
pub unsafe fn old_and_new(rel: &PgRelation) -> *mut pg_sys::ParseState {
    // SAFETY: as CreateTrigger sets up its WHEN's parse state.
    unsafe {
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        for alias in [c"old", c"new"] {
            let item = pg_sys::addRangeTableEntryForRelation(
                pstate,
                rel.as_ptr(),
                pg_sys::AccessShareLock as i32,
                pg_sys::makeAlias(alias.as_ptr(), std::ptr::null_mut()),
                false,
                false,
            );
            pg_sys::addNSItemToQuery(pstate, item, false, true, true);
        }
        pstate
    }
}
