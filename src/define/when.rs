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

use crate::error::fail;
use crate::text;

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
    pub unsafe fn from_stored(tgqual: &[u8]) -> When {
        let text = CString::new(tgqual).expect("a stored node tree holds no NUL byte");
        // SAFETY: the text is a node tree PostgreSQL wrote; reading it allocates in the current
        // memory context.
        When(unsafe { pg_sys::stringToNode(text.as_ptr()) }.cast())
    }

    /// Both conditions: what an update trigger with trigger columns and a condition checks.
    pub fn and(self, other: When) -> When {
        self.combine(other, pg_sys::BoolExprType::AND_EXPR)
    }

    /// Either condition.
    pub fn or(self, other: When) -> When {
        self.combine(other, pg_sys::BoolExprType::OR_EXPR)
    }

    /// The second operand of a WHEN made by [`When::and`] (a stored one too: PostgreSQL keeps a
    /// trigger's WHEN as it was given); `None` for any other expression.
    pub fn second_of_and(self) -> Option<When> {
        // SAFETY: a WHEN is a valid expression node; a BoolExpr's args are a list of nodes.
        unsafe {
            if !pgrx::is_a(self.0, pg_sys::NodeTag::T_BoolExpr) {
                return None;
            }
            let expr = self.0.cast::<pg_sys::BoolExpr>();
            let args = PgList::<Node>::from_pg((*expr).args);
            ((*expr).boolop == pg_sys::BoolExprType::AND_EXPR && args.len() == 2)
                .then(|| When(args.get_ptr(1).expect("two args")))
        }
    }

    fn combine(self, other: When, op: pg_sys::BoolExprType::Type) -> When {
        let mut args = PgList::<Node>::new();
        args.push(self.0);
        args.push(other.0);
        // SAFETY: two boolean expressions make a boolean expression.
        When(unsafe { pg_sys::makeBoolExpr(op, args.into_pg(), -1) }.cast())
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

/// `OLD.c IS DISTINCT FROM NEW.c OR ...` for each trigger column, resolved: an update that
/// changes none of them sends nothing. Each comparison uses the equality operator of the
/// column's type, as the type cache has it (whatever schema it is in); a type without one (json,
/// point, …) is compared as text. Made from nodes (or, for text, from quoted names only): nothing
/// a user wrote is parsed here.
pub fn comparisons(rel: &PgRelation, columns: &[String]) -> Option<When> {
    let tupdesc = rel.tuple_desc();
    let compared: Vec<When> = columns
        .iter()
        .map(|column| {
            let attr = tupdesc
                .iter()
                .find(|a| !a.is_dropped() && text::column_name(rel, a) == column)
                .expect("trigger columns are checked to exist");
            let typid = attr.type_oid().value();
            // SAFETY: a type cache lookup of an existing column's type.
            let eq = unsafe { (*pg_sys::lookup_type_cache(typid, pg_sys::TYPECACHE_EQ_OPR as i32)).eq_opr };
            if eq == pg_sys::Oid::INVALID {
                let column = quote_identifier(column);
                let text = format!("OLD.{column}::pg_catalog.text IS DISTINCT FROM NEW.{column}::pg_catalog.text");
                let expression = parse_expression(&text).expect("pgwatch's comparisons are one expression");
                return resolve(rel, expression, Images { old: true, new: true });
            }
            // SAFETY: a DistinctExpr node over the old and new values of an existing column,
            // as the parser makes for IS DISTINCT FROM with the type's equality operator.
            unsafe {
                let var = |varno: u32| {
                    pg_sys::makeVar(varno as _, attr.attnum, typid, attr.atttypmod, attr.attcollation, 0).cast::<Node>()
                };
                let mut args = PgList::<Node>::new();
                args.push(var(pg_sys::PRS2_OLD_VARNO));
                args.push(var(pg_sys::PRS2_NEW_VARNO));
                let mut distinct = pgrx::PgBox::<pg_sys::OpExpr>::alloc_node(pg_sys::NodeTag::T_DistinctExpr);
                distinct.opno = eq;
                distinct.opfuncid = pg_sys::get_opcode(eq);
                distinct.opresulttype = pg_sys::BOOLOID;
                distinct.opretset = false;
                distinct.opcollid = pg_sys::InvalidOid;
                distinct.inputcollid = attr.attcollation;
                distinct.args = args.into_pg();
                distinct.location = -1;
                When(distinct.into_pg().cast())
            }
        })
        .collect();
    compared.into_iter().reduce(When::or)
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
        // A bare `*` is a column reference only a target list expands: transformExpr would read
        // its star as a column name (PostgreSQL's grammar never hands it one).
        (!bare_star((*target).val)).then_some((*target).val)
    }
}

/// Whether `node` is `*` alone: a column reference whose only field is a star.
///
/// # Safety
/// `node` must be a valid parse node or null.
unsafe fn bare_star(node: *mut Node) -> bool {
    // SAFETY: checked to be a ColumnRef before the cast; its fields are parse nodes.
    unsafe {
        if node.is_null() || !pgrx::is_a(node, pg_sys::NodeTag::T_ColumnRef) {
            return false;
        }
        let fields = PgList::<Node>::from_pg((*node.cast::<pg_sys::ColumnRef>()).fields);
        fields.len() == 1 && fields.get_ptr(0).is_some_and(|field| pgrx::is_a(field, pg_sys::NodeTag::T_A_Star))
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
        // The same checks as CreateTrigger's.
        let when = When(when);
        let refused = if !reads_only(when, Images { old: images.old, new: true }) {
            Some("INSERT trigger's WHEN condition cannot reference OLD values")
        } else if !reads_only(when, Images { old: true, new: images.new }) {
            Some("DELETE trigger's WHEN condition cannot reference NEW values")
        } else {
            None
        };
        if let Some(message) = refused {
            fail(
                PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
                message.into(),
                "an insert has no OLD row and a delete no NEW row: watch only the events the condition applies to",
            );
        }
        pg_sys::free_parsestate(pstate);
        when
    }
}

/// Whether `when` reads only the row images `images` allows (a stored WHEN taken over for a new
/// trigger must not read a row its event does not have: the executor would read a missing row).
pub fn reads_only(when: When, images: Images) -> bool {
    // SAFETY: a resolved WHEN has no subqueries, so pull_var_clause sees every Var.
    let vars = unsafe { PgList::<pg_sys::Var>::from_pg(pg_sys::pull_var_clause(when.0, 0)) };
    let allowed = vars.iter_ptr().all(|var| {
        // SAFETY: pull_var_clause returns Vars.
        let varno = unsafe { (*var).varno };
        // `Var.varno` is an `Index` (u32) on PostgreSQL 13 and an int from 14.
        #[allow(clippy::unnecessary_cast)]
        match varno as u32 {
            pg_sys::PRS2_OLD_VARNO => images.old,
            pg_sys::PRS2_NEW_VARNO => images.new,
            _ => false,
        }
    });
    allowed
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
