//! The PostgreSQL wire protocol (`tarn serve --pg ADDR`, default `127.0.0.1:7412`): `psql`,
//! psycopg and other PostgreSQL clients query tarn as they would PostgreSQL, over the simple
//! and the extended query protocols. Every statement runs through the engine that answers
//! `POST /v1/query`: read-only SQL, guardrails and byte budgets, the query history, the cap
//! on queries at once.
//!
//! Authentication: without a key file (`--read-keys`) any user name is accepted and queries
//! run as `anonymous`; with one, the user is a `*` key's name and the password its secret
//! (cleartext, so use TLS or loopback), and queries run under that key's name and budget.
//! Session statements clients send on their own (`BEGIN`, `COMMIT`, `SET`, `SHOW`,
//! `DISCARD`) are answered without touching data: tarn has no transactions to keep. Cursors
//! (`DECLARE`, `FETCH`, `MOVE`, `CLOSE`) read a result a piece at a time (see [`cursors`]).

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Sink, SinkExt, StreamExt};
use pgwire::api::PgWireConnectionState;
use pgwire::api::auth::{
    DefaultServerParameterProvider, LoginInfo, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

use crate::serve::App;

mod cursors;

use cursors::{Cursor, CursorOp, Cursors};

/// The default listener: loopback, next to the HTTP port; never PostgreSQL's own 5432.
pub const DEFAULT_PG: &str = "127.0.0.1:7412";

/// Client metadata keys where authentication leaves who the session is.
const WHO: &str = "tarn.who";
const BYTES_MAX: &str = "tarn.bytes_max";

/// The TLS acceptor of `--pg-tls-cert` and `--pg-tls-key` (PEM files).
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<pgwire::tokio::TlsAcceptor> {
    use anyhow::Context as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the private key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a TLS identity")?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(pgwire::tokio::TlsAcceptor::from(Arc::new(config)))
}

/// Serves PostgreSQL clients on `listener` until `shutdown` turns true. With `tls`, every
/// client must use it (its password would cross the network in clear otherwise).
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    tls: Option<pgwire::tokio::TlsAcceptor>,
    connections_max: usize,
    cursor_idle: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(connections_max.max(1)));
    let parser = Arc::new(Parser);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                // Past the cap a connection is closed at once, before it holds anything.
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, connections_max, "postgres connection refused: too many open");
                    drop(socket);
                    continue;
                };
                // A handler per connection: it holds the connection's cursors.
                let h = Arc::new(Handlers {
                    handler: Arc::new(Handler {
                        app: app.clone(),
                        parser: parser.clone(),
                        tls_required: tls.is_some(),
                        cursors: Cursors::new(cursor_idle),
                        portals: Default::default(),
                    }),
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = pgwire::tokio::process_socket(socket, tls, h).await {
                        tracing::debug!(error = %e, "postgres connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a postgres connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

struct Handlers {
    handler: Arc<Handler>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.handler.clone()
    }
}

struct Handler {
    app: Arc<App>,
    parser: Arc<Parser>,
    tls_required: bool,
    cursors: Cursors,
    /// Protocol portals standing for this connection's cursors (see `ExtendedQueryHandler`).
    portals: std::sync::Mutex<Vec<String>>,
}

fn parameters() -> DefaultServerParameterProvider {
    let mut p = DefaultServerParameterProvider::default();
    p.server_version = format!("16.0 (tarn {})", env!("CARGO_PKG_VERSION"));
    p
}

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), code.into(), message.into())))
}

#[async_trait]
impl StartupHandler for Handler {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                if self.tls_required && !client.is_secure() {
                    return Err(user_error(
                        "28000",
                        "this server takes TLS connections only (sslmode=require)",
                    ));
                }
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.app.read_keys.is_empty() {
                    client.metadata_mut().insert(WHO.into(), tarn_query::ANONYMOUS.into());
                    finish_authentication(client, &parameters()).await?;
                } else {
                    client.set_state(PgWireConnectionState::AuthenticationInProgress);
                    client
                        .send(PgWireBackendMessage::Authentication(Authentication::CleartextPassword))
                        .await?;
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                let user = LoginInfo::from_client_info(client)
                    .user()
                    .unwrap_or_default()
                    .to_string();
                let caller = self.app.read_keys.sql_caller(Some(&format!("Bearer {}", pwd.password)));
                match caller {
                    Ok(c) if c.key.as_deref() == Some(user.as_str()) => {
                        client.metadata_mut().insert(WHO.into(), user);
                        if let Some(b) = c.bytes_max {
                            client.metadata_mut().insert(BYTES_MAX.into(), b.to_string());
                        }
                        finish_authentication(client, &parameters()).await?;
                    }
                    other => {
                        tracing::info!(user, known_key = other.is_ok(), "postgres login refused");
                        return Err(PgWireError::InvalidPassword(user));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// What a statement is, by its first word.
#[derive(Debug, PartialEq)]
enum Kind {
    Empty,
    Query,
    Begin,
    End(&'static str),
    Set(&'static str),
    Show(String),
    Refused(String),
}

fn kind(sql: &str) -> Kind {
    let text = strip_comments(sql);
    let text = text.trim().trim_end_matches(';').trim();
    let mut words = text.split_whitespace();
    let first = words.next().unwrap_or("").to_ascii_uppercase();
    match first.as_str() {
        "" => Kind::Empty,
        "SELECT" | "WITH" | "VALUES" | "EXPLAIN" | "TABLE" | "(" => Kind::Query,
        "BEGIN" | "START" => Kind::Begin,
        // `ROLLBACK TO SAVEPOINT`, `COMMIT PREPARED`, `COMMIT AND CHAIN` and the like do not
        // end the block as a plain COMMIT or ROLLBACK does; tarn has no savepoints or prepared
        // transactions, so they are refused.
        "COMMIT" | "END" | "ROLLBACK" | "ABORT" => match words.next().map(str::to_ascii_uppercase) {
            Some(w) if w != "WORK" && w != "TRANSACTION" => Kind::Refused(format!("{first} {w}")),
            _ if matches!(first.as_str(), "COMMIT" | "END") => Kind::End("COMMIT"),
            _ => Kind::End("ROLLBACK"),
        },
        "SET" => Kind::Set("SET"),
        "RESET" => Kind::Set("RESET"),
        "DISCARD" => match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some("ALL") => Kind::Set("DISCARD ALL"),
            _ => Kind::Set("DISCARD"),
        },
        "DEALLOCATE" => Kind::Set("DEALLOCATE"),
        "UNLISTEN" => Kind::Set("UNLISTEN"),
        "SHOW" => Kind::Show(words.collect::<Vec<_>>().join(" ").to_ascii_lowercase()),
        w if w.starts_with('(') => Kind::Query,
        other => Kind::Refused(other.to_string()),
    }
}

/// A cursor statement (comments and a trailing semicolon aside); `None` for any other.
fn cursor_statement(sql: &str) -> Option<PgWireResult<CursorOp>> {
    let text = strip_comments(sql);
    cursors::parse(text.trim().trim_end_matches(';').trim())
}

/// The PostgreSQL-compatibility rewrite of a statement before its values are bound: a query
/// whole, the query of a `DECLARE` alone, any other cursor statement unchanged.
fn rewrite_statement(sql: &str) -> String {
    match cursor_statement(sql) {
        Some(Ok(CursorOp::Declare { name, hold, query })) => format!(
            "DECLARE \"{}\" CURSOR {} FOR {}",
            name.replace('"', "\"\""),
            if hold { "WITH HOLD" } else { "WITHOUT HOLD" },
            tarn_query::postgres_statement(&query)
        ),
        Some(_) => sql.to_string(),
        None => tarn_query::postgres_statement(sql),
    }
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

/// Walks `sql` one character at a time, telling `f` whether the character is quoted (the
/// quotes themselves count as quoted) and lending it the rest of the input to consume more.
/// The one quote-aware scan behind comments, statement splitting and placeholders: each
/// passes the text it does not handle through untouched, byte for byte.
fn scan<E>(sql: &str, mut f: impl FnMut(char, bool, &mut Chars<'_>) -> Result<(), E>) -> Result<(), E> {
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        let quoted = match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                true
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                true
            }
            None => false,
        };
        f(c, quoted, &mut chars)?;
    }
    Ok(())
}

/// The digits at the front of `chars`, consumed.
fn take_digits(chars: &mut Chars<'_>) -> String {
    let mut n = String::new();
    while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
        n.push(*d);
        chars.next();
    }
    n
}

/// The statement without `--` and `/* */` comments (outside quotes).
fn strip_comments(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let Ok(()) = scan::<std::convert::Infallible>(sql, |c, quoted, chars| {
        if !quoted && c == '-' && chars.peek() == Some(&'-') {
            for n in chars.by_ref() {
                if n == '\n' {
                    out.push('\n');
                    break;
                }
            }
        } else if !quoted && c == '/' && chars.peek() == Some(&'*') {
            chars.next();
            let mut last = ' ';
            for n in chars.by_ref() {
                if last == '*' && n == '/' {
                    break;
                }
                last = n;
            }
            out.push(' ');
        } else {
            out.push(c);
        }
        Ok(())
    });
    out
}

/// The few settings clients ask for with `SHOW`.
fn show(name: &str) -> Option<(&'static str, String)> {
    let v = match name {
        "transaction isolation level" | "transaction_isolation" => ("transaction_isolation", "read committed"),
        "server_version" => ("server_version", "16.0"),
        "server_version_num" => ("server_version_num", "160000"),
        "standard_conforming_strings" => ("standard_conforming_strings", "on"),
        "client_encoding" => ("client_encoding", "UTF8"),
        "server_encoding" => ("server_encoding", "UTF8"),
        "datestyle" => ("DateStyle", "ISO, MDY"),
        "timezone" | "time zone" => ("TimeZone", "UTC"),
        "search_path" => ("search_path", "public"),
        "max_identifier_length" => ("max_identifier_length", "63"),
        "integer_datetimes" => ("integer_datetimes", "on"),
        _ => return None,
    };
    Some((v.0, v.1.to_string()))
}

fn one_value(name: &str, value: String) -> Response {
    let fields = Arc::new(vec![FieldInfo::new(
        name.into(),
        None,
        None,
        Type::TEXT,
        pgwire::api::results::FieldFormat::Text,
    )]);
    let mut enc = pgwire::api::results::DataRowEncoder::new(fields.clone());
    let row = enc.encode_field(&value).map(|_| enc.take_row());
    Response::Query(QueryResponse::new(fields, futures::stream::iter(vec![row])))
}

fn engine_error(e: tarn_query::Error) -> PgWireError {
    use tarn_query::Error as E;
    let code = match &e {
        E::BadQuery(_) => "42601",
        E::NotFound(_) => "42P01",
        E::Refused(_) => "54000",
        E::Archived(_) => "55000",
        E::Timeout(_) => "57014",
        E::Unavailable(_) => "53300",
        E::Execution(_) => "22000",
        E::Internal(_) => "XX000",
    };
    user_error(code, e.to_string())
}

impl Handler {
    /// Drops the protocol portals of cursors closed since (CLOSE, a transaction's end).
    fn drop_closed_portals<P: PortalStore + ?Sized>(&self, store: &P) {
        let mut portals = self.portals.lock().unwrap_or_else(|e| e.into_inner());
        portals.retain(|name| {
            let open = self.cursors.is_open(name);
            if !open {
                store.rm_portal(name);
            }
            open
        });
    }

    /// A statement whose error the engine's rows carried (after its response began) aborts
    /// the block too: the protocol layer marks the connection, and the next statement sees it.
    fn note_failure<C: ClientInfo>(&self, client: &C) {
        if client.transaction_status() == pgwire::messages::response::TransactionStatus::Error {
            self.cursors.fail();
        }
    }

    fn who<C: ClientInfo>(client: &C) -> (String, Option<u64>) {
        let m = client.metadata();
        let who = m.get(WHO).cloned().unwrap_or_else(|| tarn_query::ANONYMOUS.into());
        (who, m.get(BYTES_MAX).and_then(|v| v.parse().ok()))
    }

    /// Answers one statement. `rewrite` asks for the PostgreSQL-compatibility rewrite, which
    /// must never see bound values: its tokenizer reads string literals differently from the
    /// engine's, so a value could end its literal there (a bound statement is rewritten
    /// before its values go in). `in_string`: the statement is one of a simple-protocol string
    /// of several, which runs as one transaction.
    async fn answer(
        &self,
        who: &str,
        key_budget: Option<u64>,
        sql: &str,
        format: &Format,
        rewrite: bool,
        in_string: bool,
    ) -> PgWireResult<Response> {
        if self.cursors.aborted() && !matches!(kind(sql), Kind::End(_)) {
            return Err(user_error(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        let r = self
            .answer_statement(who, key_budget, sql, format, rewrite, in_string)
            .await;
        if r.is_err() {
            self.cursors.fail();
        }
        r
    }

    async fn answer_statement(
        &self,
        who: &str,
        key_budget: Option<u64>,
        sql: &str,
        format: &Format,
        rewrite: bool,
        in_string: bool,
    ) -> PgWireResult<Response> {
        if let Some(op) = cursor_statement(sql) {
            return self.cursor(who, key_budget, op?, format, rewrite, in_string).await;
        }
        match kind(sql) {
            Kind::Empty => Ok(Response::EmptyQuery),
            Kind::Begin => {
                self.cursors.begin();
                Ok(Response::TransactionStart(Tag::new("BEGIN")))
            }
            Kind::End(tag) => {
                // A COMMIT of an aborted block rolls it back, and says so.
                let tag = if self.cursors.aborted() { "ROLLBACK" } else { tag };
                self.cursors.end_transaction(tag == "ROLLBACK");
                Ok(Response::TransactionEnd(Tag::new(tag)))
            }
            Kind::Set(tag) => {
                if tag == "DISCARD ALL" {
                    self.cursors.close(None)?;
                }
                Ok(Response::Execution(Tag::new(tag)))
            }
            Kind::Show(name) => match show(&name) {
                Some((col, v)) => Ok(one_value(col, v)),
                None => Err(user_error(
                    "42704",
                    format!("unrecognized configuration parameter \"{name}\""),
                )),
            },
            Kind::Refused(word) => Err(user_error(
                "25006",
                format!(
                    "tarn answers read-only SQL; {word} is not run (tables change through ingestion and maintenance)"
                ),
            )),
            Kind::Query if rewrite => {
                let sql = tarn_query::postgres_statement(sql);
                self.query(who, key_budget, &sql, format).await
            }
            Kind::Query => self.query(who, key_budget, sql, format).await,
        }
    }

    /// Declares, fetches from, moves or closes a cursor of this connection. A declared query
    /// runs at once, so its errors and its budget come with DECLARE, as its rows come with
    /// FETCH.
    async fn cursor(
        &self,
        who: &str,
        key_budget: Option<u64>,
        op: CursorOp,
        format: &Format,
        rewrite: bool,
        in_string: bool,
    ) -> PgWireResult<Response> {
        match op {
            CursorOp::Declare { name, hold, query } => {
                if kind(&query) != Kind::Query {
                    return Err(user_error(
                        "42601",
                        "a cursor is declared FOR a query (SELECT, WITH, VALUES or TABLE)",
                    ));
                }
                self.cursors.check_block(hold, in_string)?;
                self.cursors.check_room(&name)?;
                let sql = if rewrite {
                    tarn_query::postgres_statement(&query)
                } else {
                    query
                };
                let timeout = std::time::Duration::from_millis(crate::http::QUERY_TIMEOUT_MAX_MS);
                let budget = key_budget.or(self.app.query_bytes_max);
                let q = self
                    .app
                    .query
                    .stream_within(who, &sql, budget, true, timeout)
                    .await
                    .map_err(engine_error)?;
                self.cursors.add(
                    name,
                    Cursor::new(q, tokio::time::Instant::now() + timeout, hold),
                    in_string,
                )
            }
            CursorOp::Fetch { name, count, skip } => self.cursors.fetch(&name, count, skip, format).await,
            CursorOp::Close { name } => self.cursors.close(name.as_deref()),
        }
    }

    async fn query(&self, who: &str, key_budget: Option<u64>, sql: &str, format: &Format) -> PgWireResult<Response> {
        let timeout = std::time::Duration::from_millis(crate::http::QUERY_TIMEOUT_MAX_MS);
        let budget = key_budget.or(self.app.query_bytes_max);
        let q = self
            .app
            .query
            .stream_within(who, sql, budget, true, timeout)
            .await
            .map_err(engine_error)?;
        let fields = Arc::new(arrow_pg::datatypes::arrow_schema_to_pg_fields(&q.schema, format, None)?);
        let deadline = tokio::time::Instant::now() + timeout;
        let f = fields.clone();
        let rows = futures::stream::unfold(Some(q), move |state| {
            let fields = f.clone();
            async move {
                let mut q = state?;
                match tokio::time::timeout_at(deadline, q.next()).await {
                    Err(_) => Some((
                        vec![Err(user_error("57014", "the query ran past its time limit"))],
                        None,
                    )),
                    Ok(None) => None,
                    Ok(Some(Err(e))) => Some((vec![Err(engine_error(e))], None)),
                    Ok(Some(Ok(batch))) => {
                        let rows: Vec<_> = arrow_pg::datatypes::encode_recordbatch(fields, batch).collect();
                        Some((rows, Some(q)))
                    }
                }
            }
        })
        .flat_map(futures::stream::iter);
        Ok(Response::Query(QueryResponse::new(fields, rows)))
    }

    /// The columns a statement answers with, for Describe (`sql` already rewritten).
    async fn fields(&self, sql: &str, format: &Format) -> PgWireResult<Vec<FieldInfo>> {
        match cursor_statement(sql) {
            Some(Ok(CursorOp::Fetch { name, skip: false, .. })) => return self.cursors.fields(&name, format).await,
            Some(_) => return Ok(Vec::new()),
            None => {}
        }
        match kind(sql) {
            Kind::Query => {
                let schema = self.app.query.describe(sql, true).await.map_err(engine_error)?;
                Ok(arrow_pg::datatypes::arrow_schema_to_pg_fields(&schema, format, None)?)
            }
            Kind::Show(name) => Ok(show(&name)
                .map(|(col, _)| vec![FieldInfo::new(col.into(), None, None, Type::TEXT, format.format_for(0))])
                .unwrap_or_default()),
            _ => Ok(Vec::new()),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Handler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (who, budget) = Self::who(client);
        self.note_failure(client);
        let mut out = Vec::new();
        let statements = split_statements(query);
        let in_string = statements.len() > 1;
        for stmt in statements {
            match self
                .answer(&who, budget, &stmt, &Format::UnifiedText, true, in_string)
                .await
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    // A failed statement ends the batch, as PostgreSQL does. Any error is
                    // answered in place, so that the responses before it (a BEGIN) still
                    // reach the protocol layer and its view of the transaction stays ours.
                    let info = match e {
                        PgWireError::UserError(info) => info,
                        other => Box::new(ErrorInfo::from(other)),
                    };
                    out.push(Response::Error(info));
                    break;
                }
            }
        }
        self.cursors.end_string(matches!(out.last(), Some(Response::Error(_))));
        self.drop_closed_portals(client.portal_store());
        Ok(out)
    }
}

/// Splits a simple-protocol string at the semicolons between statements (outside quotes
/// and comments).
fn split_statements(sql: &str) -> Vec<String> {
    let text = strip_comments(sql);
    let mut out = Vec::new();
    let mut cur = String::new();
    let Ok(()) = scan::<std::convert::Infallible>(&text, |c, quoted, _| {
        if !quoted && c == ';' {
            if !cur.trim().is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
        } else {
            cur.push(c);
        }
        Ok(())
    });
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

/// The extended protocol keeps the statement's text; parameters are bound into it as
/// literals when a portal runs.
struct Parser;

#[async_trait]
impl QueryParser for Parser {
    type Statement = String;

    async fn parse_sql<C>(&self, _client: &C, sql: &str, _types: &[Option<Type>]) -> PgWireResult<Option<String>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Ok(Some(sql.to_string()))
    }

    fn get_parameter_types(&self, stmt: &String) -> PgWireResult<Vec<Type>> {
        Ok(vec![Type::UNKNOWN; placeholders(stmt)])
    }

    fn get_result_schema(&self, _stmt: &String, _format: Option<&Format>) -> PgWireResult<Vec<FieldInfo>> {
        Ok(Vec::new())
    }
}

/// The highest `$n` placeholder of a statement (outside quotes).
fn placeholders(sql: &str) -> usize {
    let mut max = 0;
    let Ok(()) = scan::<std::convert::Infallible>(sql, |c, quoted, chars| {
        if !quoted
            && c == '$'
            && let Ok(v) = take_digits(chars).parse::<usize>()
        {
            max = max.max(v);
        }
        Ok(())
    });
    max
}

/// The statement, rewritten for PostgreSQL compatibility, with each `$n` replaced by its
/// parameter as a SQL literal of the engine's dialect (quotes doubled; a backslash is a
/// backslash).
fn bind(portal: &Portal<String>) -> PgWireResult<String> {
    let rewritten = rewrite_statement(&portal.statement.statement);
    let sql = &rewritten;
    let types = &portal.statement.parameter_types;
    let mut literals = Vec::with_capacity(portal.parameter_len());
    for i in 0..portal.parameter_len() {
        let ty = types.get(i).cloned().flatten().unwrap_or(Type::UNKNOWN);
        let lit = match ty {
            Type::INT2 => portal.parameter::<i16>(i, &ty)?.map(|v| v.to_string()),
            Type::INT4 => portal.parameter::<i32>(i, &ty)?.map(|v| v.to_string()),
            Type::INT8 => portal.parameter::<i64>(i, &ty)?.map(|v| v.to_string()),
            Type::FLOAT4 => portal.parameter::<f32>(i, &ty)?.map(|v| v.to_string()),
            Type::FLOAT8 => portal.parameter::<f64>(i, &ty)?.map(|v| v.to_string()),
            Type::BOOL => portal
                .parameter::<bool>(i, &ty)?
                .map(|v| if v { "TRUE".into() } else { "FALSE".into() }),
            _ => portal
                .parameter::<String>(i, &Type::TEXT)?
                .map(|v| format!("'{}'", v.replace('\'', "''"))),
        };
        literals.push(lit.unwrap_or_else(|| "NULL".into()));
    }
    let mut out = String::with_capacity(sql.len());
    scan::<PgWireError>(sql, |c, quoted, chars| {
        if !quoted && c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            let idx: usize = take_digits(chars).parse().unwrap_or(0);
            let lit = idx
                .checked_sub(1)
                .and_then(|i| literals.get(i))
                .ok_or_else(|| user_error("08P01", format!("no parameter ${idx} was bound")))?;
            out.push_str(lit);
        } else {
            out.push(c);
        }
        Ok(())
    })?;
    Ok(out)
}

#[async_trait]
impl ExtendedQueryHandler for Handler {
    type Statement = String;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        target: &StoredStatement<String>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let n = placeholders(&target.statement).max(target.parameter_types.len());
        let params: Vec<Type> = (0..n)
            .map(|i| {
                target
                    .parameter_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or(Type::UNKNOWN)
            })
            .collect();
        // Columns need the parameters' values only when there are none to bind.
        let fields = if n == 0 {
            let sql = rewrite_statement(&target.statement);
            self.fields(&sql, &Format::UnifiedText).await?
        } else {
            Vec::new()
        };
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        portal: &Portal<String>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let sql = bind(portal)?;
        Ok(DescribePortalResponse::new(
            self.fields(&sql, &portal.result_column_format).await?,
        ))
    }

    async fn do_query<C>(&self, client: &mut C, portal: &Portal<String>, _max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (who, budget) = Self::who(client);
        self.note_failure(client);
        let sql = bind(portal)?;
        let declared = match cursor_statement(&sql) {
            Some(Ok(CursorOp::Declare { name, .. })) => Some(name),
            _ => None,
        };
        let r = self
            .answer(&who, budget, &sql, &portal.result_column_format, false, false)
            .await;
        self.drop_closed_portals(client.portal_store());
        let r = r?;
        if let Some(name) = declared {
            // In PostgreSQL a cursor is also a portal of the protocol: psycopg describes it
            // by name to learn its columns. The portal stands for a FETCH from the cursor.
            let mut p: Portal<String> = Portal::default();
            p.statement = Arc::new(StoredStatement::new(
                String::new(),
                format!("FETCH ALL FROM \"{}\"", name.replace('"', "\"\"")),
                Vec::new(),
            ));
            p.result_column_format = portal.result_column_format.clone();
            p.name = name.clone();
            client.portal_store().put_portal(Arc::new(p));
            self.portals.lock().unwrap_or_else(|e| e.into_inner()).push(name);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_classified_split_and_counted() {
        assert_eq!(kind("  select 1"), Kind::Query);
        assert_eq!(kind("-- a comment\nSELECT 1;"), Kind::Query);
        assert_eq!(kind("/* x */ with a as (select 1) select * from a"), Kind::Query);
        assert_eq!(kind("BEGIN"), Kind::Begin);
        assert_eq!(kind("commit;"), Kind::End("COMMIT"));
        assert_eq!(kind("ROLLBACK WORK"), Kind::End("ROLLBACK"));
        assert_eq!(kind("rollback to savepoint a"), Kind::Refused("ROLLBACK TO".into()));
        assert_eq!(kind("COMMIT AND CHAIN"), Kind::Refused("COMMIT AND".into()));
        assert_eq!(kind("SET extra_float_digits = 3"), Kind::Set("SET"));
        assert_eq!(
            kind("SHOW TRANSACTION ISOLATION LEVEL"),
            Kind::Show("transaction isolation level".into())
        );
        assert_eq!(kind("insert into t values (1)"), Kind::Refused("INSERT".into()));
        assert_eq!(kind(" ; "), Kind::Empty);
        assert_eq!(
            split_statements("select 1; select ';' ; -- x;\n select 2"),
            vec!["select 1", " select ';' ", " \n select 2"]
        );
        assert_eq!(placeholders("select $1, '$9', $12"), 12);
        assert_eq!(strip_comments("a /* b */ c -- d\ne"), "a   c \ne");
    }
}
