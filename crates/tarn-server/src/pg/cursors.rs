//! Cursors of one PostgreSQL connection: `DECLARE name CURSOR FOR query`, `FETCH`, `MOVE` and
//! `CLOSE`, as `psql` (with `FETCH_COUNT`), psycopg's named cursors and BI tools such as
//! Tableau use them to read a large result a piece at a time.
//!
//! A cursor holds its query running in the engine (with its turn among the queries at once,
//! its budget checked at DECLARE, its time limit counted from DECLARE) and at most one batch
//! of rows read but not yet fetched, so a cursor over a huge result holds one batch, never the
//! result (a FETCH of up to [`FETCH_AT_ONCE_MAX`] rows holds those rows until they are sent).
//! Cursors move forward only. As in PostgreSQL, one declared without `WITH HOLD` lives in a
//! transaction block: outside one it is refused (`25P01`), except in a string of several
//! statements, which is a transaction of its own, and it closes when its transaction ends.
//! `ROLLBACK` also closes the `WITH HOLD` cursors declared in the transaction it rolls back.
//! Every cursor closes with its connection. A cursor left without a FETCH or MOVE for the
//! server's idle limit (`--pg-cursor-idle-s`), or whose query reaches its time limit (counted
//! from DECLARE), stops its query, giving back its turn among the queries at once, even if no
//! statement comes; a later FETCH from it is answered `57014`. A connection holds at most
//! [`CURSORS_MAX`] at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::SchemaRef;
use futures::StreamExt as _;
use pgwire::api::portal::Format;
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;

use super::{engine_error, user_error};

/// Cursors one connection may hold open at once.
pub const CURSORS_MAX: usize = 16;
/// A FETCH of at most this many rows is read before it is answered; a larger one (or `ALL`)
/// streams its rows as they are read.
pub const FETCH_AT_ONCE_MAX: u64 = 10_000;

/// A cursor statement, parsed.
#[derive(Debug, PartialEq)]
pub enum CursorOp {
    Declare {
        name: String,
        hold: bool,
        query: String,
    },
    /// `FETCH` (rows answered) or `MOVE` (rows skipped, counted); `count: None` is `ALL`.
    Fetch {
        name: String,
        count: Option<u64>,
        skip: bool,
    },
    /// `CLOSE name`, or `CLOSE ALL` (`None`).
    Close {
        name: Option<String>,
    },
}

/// The words of a statement with where each ends; a double-quoted identifier is one word.
fn words(sql: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut it = sql.char_indices().peekable();
    while let Some(&(start, c)) = it.peek() {
        if c.is_whitespace() {
            it.next();
            continue;
        }
        let mut word = String::new();
        let mut end = start;
        if c == '"' {
            word.push('"');
            it.next();
            while let Some((i, c)) = it.next() {
                end = i + c.len_utf8();
                if c == '"' {
                    if it.peek().is_some_and(|&(_, n)| n == '"') {
                        it.next();
                        word.push('"');
                        continue;
                    }
                    break;
                }
                word.push(c);
            }
            word.push('"');
        } else {
            while let Some(&(i, c)) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                end = i + c.len_utf8();
                it.next();
            }
        }
        out.push((word, end));
    }
    out
}

/// A cursor's name as PostgreSQL folds it: a quoted name as written, an unquoted one in
/// lower case.
fn ident(word: &str) -> String {
    match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(quoted) => quoted.to_string(),
        None => word.to_ascii_lowercase(),
    }
}

fn syntax(message: impl Into<String>) -> PgWireError {
    user_error("42601", message)
}

fn unsupported(message: impl Into<String>) -> PgWireError {
    user_error("0A000", message)
}

/// Parses a `DECLARE`, `FETCH`, `MOVE` or `CLOSE` statement (comments stripped, no trailing
/// semicolon); `None` for any other statement.
pub fn parse(sql: &str) -> Option<PgWireResult<CursorOp>> {
    let w = words(sql);
    let upper: Vec<String> = w.iter().map(|(s, _)| s.to_ascii_uppercase()).collect();
    let first = upper.first()?.as_str();
    Some(match first {
        "DECLARE" => parse_declare(sql, &w, &upper),
        "FETCH" | "MOVE" => parse_fetch(&w, &upper, first == "MOVE"),
        "CLOSE" => match (&w[1..], upper.get(1).map(String::as_str)) {
            ([_], Some("ALL")) => Ok(CursorOp::Close { name: None }),
            ([(name, _)], _) => Ok(CursorOp::Close {
                name: Some(ident(name)),
            }),
            _ => Err(syntax("CLOSE takes one cursor name, or ALL")),
        },
        _ => return None,
    })
}

fn parse_declare(sql: &str, w: &[(String, usize)], upper: &[String]) -> PgWireResult<CursorOp> {
    let Some((name, _)) = w.get(1) else {
        return Err(syntax("DECLARE needs a cursor name"));
    };
    let mut i = 2;
    while let Some(word) = upper.get(i) {
        match word.as_str() {
            "CURSOR" => break,
            "ASENSITIVE" | "INSENSITIVE" | "NO" | "SCROLL" => i += 1,
            "BINARY" => return Err(unsupported("tarn has no binary cursors; declare it without BINARY")),
            other => return Err(syntax(format!("unexpected {other} in DECLARE"))),
        }
    }
    if upper.get(i).map(String::as_str) != Some("CURSOR") {
        return Err(syntax("DECLARE name CURSOR FOR query"));
    }
    i += 1;
    let mut hold = false;
    match (upper.get(i).map(String::as_str), upper.get(i + 1).map(String::as_str)) {
        (Some("WITH"), Some("HOLD")) => {
            hold = true;
            i += 2;
        }
        (Some("WITHOUT"), Some("HOLD")) => i += 2,
        _ => {}
    }
    if upper.get(i).map(String::as_str) != Some("FOR") {
        return Err(syntax("DECLARE name CURSOR FOR query"));
    }
    let query = sql[w[i].1..].trim().to_string();
    if query.is_empty() {
        return Err(syntax("DECLARE ... FOR needs a query"));
    }
    let name = ident(name);
    if name.is_empty() {
        return Err(user_error("42602", "a cursor needs a name"));
    }
    Ok(CursorOp::Declare { name, hold, query })
}

fn parse_fetch(w: &[(String, usize)], upper: &[String], skip: bool) -> PgWireResult<CursorOp> {
    let what = if skip { "MOVE" } else { "FETCH" };
    let mut i = 1;
    let number = |s: &str| s.trim_start_matches('+').parse::<u64>().ok();
    let count = match upper.get(i).map(String::as_str) {
        Some("NEXT") => {
            i += 1;
            Some(1)
        }
        Some("ALL") => {
            i += 1;
            None
        }
        Some("FORWARD") => {
            i += 1;
            match upper.get(i).map(String::as_str) {
                Some("ALL") => {
                    i += 1;
                    None
                }
                Some(n) if number(n).is_some() => {
                    i += 1;
                    number(n)
                }
                _ => Some(1),
            }
        }
        Some(d @ ("PRIOR" | "FIRST" | "LAST" | "ABSOLUTE" | "RELATIVE" | "BACKWARD")) => {
            return Err(unsupported(format!(
                "tarn cursors move forward only ({what} {d} is not supported)"
            )));
        }
        Some(n) if n.starts_with('-') => {
            return Err(unsupported(format!("tarn cursors move forward only ({what} {n})")));
        }
        Some(n) if number(n).is_some() => {
            i += 1;
            number(n)
        }
        _ => Some(1),
    };
    if matches!(upper.get(i).map(String::as_str), Some("FROM" | "IN")) {
        i += 1;
    }
    match &w[i.min(w.len())..] {
        [(name, _)] => Ok(CursorOp::Fetch {
            name: ident(name),
            count,
            skip,
        }),
        _ => Err(syntax(format!("{what} [FORWARD] [count | ALL] [FROM] cursor"))),
    }
}

/// A declared cursor.
pub struct Cursor {
    schema: SchemaRef,
    /// The running query; `None` once it has no more rows.
    query: Option<tarn_query::QueryStream>,
    /// Rows read from the query and not fetched yet.
    held: Option<RecordBatch>,
    deadline: tokio::time::Instant,
    /// The last DECLARE, FETCH or MOVE of it.
    used: tokio::time::Instant,
    hold: bool,
    /// The query was stopped, idle or at its time limit.
    expired: bool,
    /// The task that stops the query at its time limit; stopped with the cursor.
    reaper: Option<tokio::task::AbortHandle>,
}

impl Drop for Cursor {
    fn drop(&mut self) {
        if let Some(r) = self.reaper.take() {
            r.abort();
        }
    }
}

impl Cursor {
    pub fn new(query: tarn_query::QueryStream, deadline: tokio::time::Instant, hold: bool) -> Self {
        Self {
            schema: query.schema.clone(),
            query: Some(query),
            held: None,
            deadline,
            used: tokio::time::Instant::now(),
            hold,
            expired: false,
            reaper: None,
        }
    }

    /// Stops the query, idle or at its time limit: its turn among the queries and its rows go
    /// now.
    fn expire(&mut self) {
        if self.query.is_some() || self.held.is_some() {
            self.expired = true;
        }
        self.query = None;
        self.held = None;
    }

    fn expired_error() -> PgWireError {
        user_error(
            "57014",
            "the cursor's query was stopped: it was left without a FETCH past the idle limit, or ran past its time limit; CLOSE it and declare it again",
        )
    }

    /// Up to `max` more rows (`None`: all that are left); `None` at the end.
    async fn next_rows(&mut self, max: Option<u64>) -> Option<PgWireResult<RecordBatch>> {
        self.used = tokio::time::Instant::now();
        let r = self.read_rows(max).await;
        // A read that took long (a big sort's first batch) is use too, not idleness.
        self.used = tokio::time::Instant::now();
        r
    }

    async fn read_rows(&mut self, max: Option<u64>) -> Option<PgWireResult<RecordBatch>> {
        loop {
            if max == Some(0) {
                return None;
            }
            if self.expired {
                return Some(Err(Self::expired_error()));
            }
            if let Some(b) = self.held.take() {
                let n = b.num_rows();
                let take = max.map_or(n, |m| (m.min(n as u64)) as usize);
                if take < n {
                    self.held = Some(b.slice(take, n - take));
                }
                if take > 0 {
                    return Some(Ok(b.slice(0, take)));
                }
                continue;
            }
            let q = self.query.as_mut()?;
            match tokio::time::timeout_at(self.deadline, q.next()).await {
                Err(_) => {
                    self.expire();
                    return Some(Err(Self::expired_error()));
                }
                Ok(None) => {
                    self.query = None;
                    return None;
                }
                Ok(Some(Err(e))) => {
                    self.query = None;
                    return Some(Err(engine_error(e)));
                }
                Ok(Some(Ok(b))) => self.held = Some(b),
            }
        }
    }
}

/// Stops a cursor's query once it has gone `idle` without a FETCH or MOVE, or at `deadline`;
/// ends with the cursor.
async fn reap(
    me: std::sync::Weak<tokio::sync::Mutex<Cursor>>,
    deadline: tokio::time::Instant,
    idle: std::time::Duration,
) {
    let mut wake = deadline.min(tokio::time::Instant::now() + idle);
    loop {
        tokio::time::sleep_until(wake).await;
        let Some(c) = me.upgrade() else { return };
        // A FETCH holding the cursor is reading or sending its rows: not idle (its own reads
        // stop at the time limit). Look again later, without waiting for the lock, so that the
        // next FETCH never finds it taken.
        let Ok(mut c) = c.try_lock() else {
            wake = deadline.min(tokio::time::Instant::now() + idle);
            continue;
        };
        let now = tokio::time::Instant::now();
        if now >= deadline || now >= c.used + idle {
            c.expire();
            return;
        }
        wake = deadline.min(c.used + idle);
    }
}

/// An open cursor: what is known without waiting for it, and the cursor.
#[derive(Clone)]
struct Open {
    schema: SchemaRef,
    hold: bool,
    /// The explicit transaction block it was declared in, if any.
    declared_in: Option<u64>,
    /// The simple-query string of several statements it was declared in, if any.
    string: Option<u64>,
    cursor: Arc<tokio::sync::Mutex<Cursor>>,
}

/// The connection's transaction block: whether one is open (from `BEGIN` to `COMMIT` or
/// `ROLLBACK`), its number, whether a statement in it failed (then, as in PostgreSQL, every
/// statement until its end is refused and a `COMMIT` rolls it back), and the number of the
/// current simple-query string.
#[derive(Default)]
struct Block {
    open: bool,
    number: u64,
    failed: bool,
    string: u64,
}

/// The cursors of one connection.
pub struct Cursors {
    open: Mutex<HashMap<String, Open>>,
    block: Mutex<Block>,
    /// How long a cursor may go without a FETCH or MOVE before its query is stopped.
    idle: std::time::Duration,
}

impl Cursors {
    pub fn new(idle: std::time::Duration) -> Self {
        Self {
            open: Mutex::default(),
            block: Mutex::default(),
            idle,
        }
    }

    fn get(&self, name: &str) -> PgWireResult<Open> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| user_error("34000", format!("cursor \"{name}\" does not exist")))
    }

    pub fn is_open(&self, name: &str) -> bool {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).contains_key(name)
    }

    /// Refuses a name in use, or one cursor too many.
    pub fn check_room(&self, name: &str) -> PgWireResult<()> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.contains_key(name) {
            return Err(user_error("42P03", format!("cursor \"{name}\" already exists")));
        }
        if open.len() >= CURSORS_MAX {
            return Err(user_error(
                "54000",
                format!("a connection holds at most {CURSORS_MAX} cursors at once; CLOSE one first"),
            ));
        }
        Ok(())
    }

    /// Refuses a cursor without `WITH HOLD` outside a transaction block, unless the statement
    /// is one of a string of several (`in_string`), which PostgreSQL runs as one transaction.
    pub fn check_block(&self, hold: bool, in_string: bool) -> PgWireResult<()> {
        if hold || in_string || self.block.lock().unwrap_or_else(|e| e.into_inner()).open {
            return Ok(());
        }
        Err(user_error(
            "25P01",
            "DECLARE CURSOR can only be used in transaction blocks: BEGIN first, or declare it WITH HOLD",
        ))
    }

    /// Opens a cursor; `in_string`: declared by a statement of a simple-query string of several.
    pub fn add(&self, name: String, mut cursor: Cursor, in_string: bool) -> PgWireResult<Response> {
        self.check_room(&name)?;
        let (declared_in, string) = {
            let b = self.block.lock().unwrap_or_else(|e| e.into_inner());
            (b.open.then_some(b.number), in_string.then_some(b.string))
        };
        let (deadline, idle) = (cursor.deadline, self.idle);
        let open = Open {
            schema: cursor.schema.clone(),
            hold: cursor.hold,
            declared_in,
            string,
            cursor: Arc::new_cyclic(|me| {
                let reaper = tokio::spawn(reap(me.clone(), deadline, idle));
                cursor.reaper = Some(reaper.abort_handle());
                tokio::sync::Mutex::new(cursor)
            }),
        };
        self.open.lock().unwrap_or_else(|e| e.into_inner()).insert(name, open);
        Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
    }

    /// The columns `FETCH` from `name` answers with.
    pub async fn fields(&self, name: &str, format: &Format) -> PgWireResult<Vec<FieldInfo>> {
        let schema = self.get(name)?.schema;
        arrow_pg::datatypes::arrow_schema_to_pg_fields(&schema, format, None)
    }

    /// `FETCH`: streams up to `count` rows (`None`: the rest) as they are read; `MOVE`
    /// (`skip`): reads past them and answers how many.
    pub async fn fetch(&self, name: &str, count: Option<u64>, skip: bool, format: &Format) -> PgWireResult<Response> {
        // A FETCH that streams holds its cursor until its rows are sent, which for a string of
        // statements is after the whole string has run: a later FETCH of it there is refused
        // rather than left waiting for ever.
        let Ok(mut cursor) = self.get(name)?.cursor.try_lock_owned() else {
            return Err(user_error(
                "55006",
                format!(
                    "cursor \"{name}\" is still sending the rows of an earlier FETCH of more than {FETCH_AT_ONCE_MAX} rows; send the next FETCH on its own"
                ),
            ));
        };
        if skip {
            let mut moved = 0u64;
            while let Some(b) = cursor.next_rows(count.map(|c| c - moved)).await {
                moved += b?.num_rows() as u64;
            }
            return Ok(Response::Execution(Tag::new("MOVE").with_rows(moved as usize)));
        }
        let fields = Arc::new(arrow_pg::datatypes::arrow_schema_to_pg_fields(
            &cursor.schema,
            format,
            None,
        )?);
        if let Some(n) = count.filter(|n| *n <= FETCH_AT_ONCE_MAX) {
            // Read now, so the cursor is free for the next statement of the same string.
            let mut rows: Vec<PgWireResult<DataRow>> = Vec::new();
            let mut sent = 0u64;
            while let Some(b) = cursor.next_rows(Some(n - sent)).await {
                let b = b?;
                sent += b.num_rows() as u64;
                rows.extend(arrow_pg::datatypes::encode_recordbatch(fields.clone(), b));
            }
            drop(cursor);
            let mut r = QueryResponse::new(fields, futures::stream::iter(rows));
            r.set_command_tag("FETCH");
            return Ok(Response::Query(r));
        }
        let f = fields.clone();
        let rows = futures::stream::unfold(Some((cursor, 0u64)), move |state| {
            let fields = f.clone();
            async move {
                let (mut cursor, sent) = state?;
                match cursor.next_rows(count.map(|c| c - sent)).await? {
                    Err(e) => Some((vec![Err(e)], None)),
                    Ok(b) => {
                        let n = b.num_rows() as u64;
                        let rows: Vec<PgWireResult<DataRow>> =
                            arrow_pg::datatypes::encode_recordbatch(fields, b).collect();
                        Some((rows, Some((cursor, sent + n))))
                    }
                }
            }
        })
        .flat_map(futures::stream::iter);
        let mut r = QueryResponse::new(fields, rows);
        r.set_command_tag("FETCH");
        Ok(Response::Query(r))
    }

    /// `CLOSE name`, or every cursor (`None`).
    pub fn close(&self, name: Option<&str>) -> PgWireResult<Response> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        match name {
            None => open.clear(),
            Some(n) => {
                if open.remove(n).is_none() {
                    return Err(user_error("34000", format!("cursor \"{n}\" does not exist")));
                }
            }
        }
        Ok(Response::Execution(Tag::new("CLOSE CURSOR")))
    }

    /// `BEGIN`: a transaction block opens (one already open stays the same block).
    pub fn begin(&self) {
        let mut b = self.block.lock().unwrap_or_else(|e| e.into_inner());
        if !b.open {
            b.open = true;
            b.failed = false;
            b.number += 1;
        }
    }

    /// A statement failed: an open transaction block is aborted until it ends.
    pub fn fail(&self) {
        let mut b = self.block.lock().unwrap_or_else(|e| e.into_inner());
        if b.open {
            b.failed = true;
        }
    }

    /// Whether the open transaction block is aborted (a statement in it failed).
    pub fn aborted(&self) -> bool {
        let b = self.block.lock().unwrap_or_else(|e| e.into_inner());
        b.open && b.failed
    }

    /// A transaction ended: cursors declared without `WITH HOLD` close, and on a `ROLLBACK` so
    /// do those declared `WITH HOLD` in the block rolled back.
    pub fn end_transaction(&self, rollback: bool) {
        let block = {
            let mut b = self.block.lock().unwrap_or_else(|e| e.into_inner());
            let open = std::mem::take(&mut b.open);
            open.then_some(b.number)
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, c| c.hold && !(rollback && block.is_some() && c.declared_in == block));
    }

    /// A string of statements ended: outside a transaction block it was a transaction of its
    /// own, so the cursors it declared without `WITH HOLD` close, and if it `failed` it is
    /// rolled back, so do those it declared outside a block `WITH HOLD`.
    pub fn end_string(&self, failed: bool) {
        let (in_block, string) = {
            let mut b = self.block.lock().unwrap_or_else(|e| e.into_inner());
            b.string += 1;
            (b.open, b.string - 1)
        };
        if !in_block {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.retain(|_, c| c.hold && !(failed && c.declared_in.is_none() && c.string == Some(string)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(sql: &str) -> CursorOp {
        match parse(sql) {
            Some(Ok(op)) => op,
            other => panic!("{sql}: {other:?}"),
        }
    }

    fn refused(sql: &str) -> String {
        match parse(sql) {
            Some(Err(PgWireError::UserError(info))) => format!("{} {}", info.code, info.message),
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn cursor_statements_parse_as_postgresql_reads_them() {
        assert_eq!(
            op("DECLARE _psql_cursor NO SCROLL CURSOR FOR SELECT a, 'x  y' FROM t"),
            CursorOp::Declare {
                name: "_psql_cursor".into(),
                hold: false,
                query: "SELECT a, 'x  y' FROM t".into()
            }
        );
        assert_eq!(
            op("declare \"My \"\"Cur\" cursor with hold for\n  select 1"),
            CursorOp::Declare {
                name: "My \"Cur".into(),
                hold: true,
                query: "select 1".into()
            }
        );
        let fetch = |name: &str, count, skip| CursorOp::Fetch {
            name: name.into(),
            count,
            skip,
        };
        assert_eq!(
            op("FETCH FORWARD 100 FROM _psql_cursor"),
            fetch("_psql_cursor", Some(100), false)
        );
        assert_eq!(op("fetch c"), fetch("c", Some(1), false));
        assert_eq!(op("FETCH NEXT IN C"), fetch("c", Some(1), false));
        assert_eq!(op("FETCH ALL FROM c"), fetch("c", None, false));
        assert_eq!(op("FETCH FORWARD ALL c"), fetch("c", None, false));
        assert_eq!(op("FETCH 5 \"C\""), fetch("C", Some(5), false));
        assert_eq!(op("MOVE FORWARD 3 IN c"), fetch("c", Some(3), true));
        assert_eq!(op("CLOSE ALL"), CursorOp::Close { name: None });
        assert_eq!(op("close \"X\""), CursorOp::Close { name: Some("X".into()) });
        assert!(parse("SELECT 1").is_none());

        assert!(refused("FETCH PRIOR FROM c").starts_with("0A000"));
        assert!(refused("FETCH -2 FROM c").starts_with("0A000"));
        assert!(refused("DECLARE c BINARY CURSOR FOR SELECT 1").starts_with("0A000"));
        assert!(refused("DECLARE c CURSOR SELECT 1").starts_with("42601"));
        assert!(refused("DECLARE c CURSOR FOR").starts_with("42601"));
        assert!(refused("FETCH 1 FROM a b").starts_with("42601"));
        assert!(refused("DECLARE \"\" CURSOR FOR SELECT 1").starts_with("42602"));
    }
}
