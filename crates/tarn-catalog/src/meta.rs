//! The metadata store: what tarn keeps about datasets (contracts in force, every version,
//! the intent of a new major version) and producer keys, as JSON documents by kind and name.
//!
//! Two backends behind one synchronous API:
//! - **files** in the data directory (the default): one file per document, replaced through a
//!   synced temporary file, in the layout data directories have always had;
//! - **PostgreSQL** (`--meta postgres://...`): the table `<schema>.meta`, shared by every tarn
//!   process of a deployment. Versioned migrations run at open, under an advisory lock so that
//!   processes starting together apply each migration once; a database whose schema is newer
//!   than this build is refused. Several documents written together commit in one transaction.
//!
//! The PostgreSQL client runs on a thread of its own (with its own small runtime): a caller
//! blocks for one round trip, as it blocks for an fsync with files, from any thread, inside a
//! runtime or not.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::{Error, Result, io_err, write_synced};

/// What a document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A contract in force, named by its dataset.
    Dataset,
    /// A kept contract, named `<dataset>/<major>.<minor>`.
    Version,
    /// The intent of a new major version, named by its dataset, until it is done.
    MajorIntent,
    /// The producer write keys, one document named `producers`.
    ProducerKeys,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dataset => "dataset",
            Kind::Version => "version",
            Kind::MajorIntent => "major_intent",
            Kind::ProducerKeys => "producer_keys",
        }
    }
}

/// How long a caller waits for PostgreSQL before the operation fails.
pub const PG_TIMEOUT: Duration = Duration::from_secs(30);

/// The metadata store.
#[derive(Debug)]
pub struct Meta {
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Files { catalog: PathBuf, keys: PathBuf },
    Postgres(Pg),
}

impl Meta {
    /// Files under `catalog` (datasets, versions, majors) and `keys` (producer keys).
    pub fn files(catalog: impl AsRef<Path>, keys: impl AsRef<Path>) -> Self {
        Self {
            backend: Backend::Files {
                catalog: catalog.as_ref().to_path_buf(),
                keys: keys.as_ref().to_path_buf(),
            },
        }
    }

    /// The store in PostgreSQL at `url`, in `schema` (created if needed), migrated to this
    /// build's version.
    pub fn postgres(url: &str, schema: &str) -> Result<Self> {
        Ok(Self {
            backend: Backend::Postgres(Pg::connect(url, schema)?),
        })
    }

    /// Where the store is, for messages (no password).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Files { catalog, .. } => format!("metadata store in files under {}", catalog.display()),
            Backend::Postgres(pg) => pg.describe.clone(),
        }
    }

    /// Whether the store is shared between processes (another process may change it).
    pub fn shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// One document, if it exists.
    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>> {
        match &self.backend {
            Backend::Files { .. } => {
                let path = self.file(kind, name)?;
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err(&path)(e)),
                }
            }
            Backend::Postgres(pg) => pg.call(|reply| Req::Get {
                kind,
                name: name.to_string(),
                reply,
            }),
        }
    }

    /// The documents of a kind whose names start with `prefix`, sorted by name.
    pub fn list(&self, kind: Kind, prefix: &str) -> Result<Vec<Doc>> {
        match &self.backend {
            Backend::Files { .. } => self.list_files(kind, prefix),
            Backend::Postgres(pg) => pg.call(|reply| Req::List {
                kind,
                prefix: prefix.to_string(),
                reply,
            }),
        }
    }

    /// Writes documents: in PostgreSQL in one transaction; in files one after the other, in
    /// the order given (so put what must exist first, first).
    pub fn put(&self, docs: &[(Kind, &str, &[u8])]) -> Result<()> {
        match &self.backend {
            Backend::Files { .. } => {
                for (kind, name, body) in docs {
                    let path = self.file(*kind, name)?;
                    let dir = path.parent().unwrap_or(Path::new("."));
                    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default();
                    write_synced(dir, file, body)?;
                }
                Ok(())
            }
            Backend::Postgres(pg) => {
                let mut owned = Vec::with_capacity(docs.len());
                for (kind, name, body) in docs {
                    let text = std::str::from_utf8(body).map_err(|e| Error::Corrupt {
                        path: PathBuf::from(format!("{}/{name}", kind.as_str())),
                        reason: format!("not UTF-8 JSON: {e}"),
                    })?;
                    owned.push((*kind, name.to_string(), text.to_string()));
                }
                pg.call(|reply| Req::Put { docs: owned, reply })
            }
        }
    }

    /// Creates `first` only if no document of its kind and name exists, together with `rest`
    /// (in PostgreSQL in one transaction; in files `rest` first). False when it existed, and
    /// then nothing is written: two processes creating one dataset never overwrite each other.
    pub fn create(&self, first: (Kind, &str, &[u8]), rest: &[(Kind, &str, &[u8])]) -> Result<bool> {
        match &self.backend {
            Backend::Files { .. } => {
                if self.file(first.0, first.1)?.exists() {
                    return Ok(false);
                }
                self.put(rest)?;
                self.put(&[first])?;
                Ok(true)
            }
            Backend::Postgres(pg) => {
                let mut docs = Vec::with_capacity(rest.len() + 1);
                for (kind, name, body) in std::iter::once(&first).chain(rest) {
                    let text = std::str::from_utf8(body).map_err(|e| Error::Corrupt {
                        path: PathBuf::from(format!("{}/{name}", kind.as_str())),
                        reason: format!("not UTF-8 JSON: {e}"),
                    })?;
                    docs.push((*kind, name.to_string(), text.to_string()));
                }
                pg.call(|reply| Req::Create { docs, reply })
            }
        }
    }

    /// Reads one document and writes what `f` makes of it, with no other `update` of that
    /// document in between (in PostgreSQL: one transaction under an advisory lock on the
    /// document; with files the store has one process, and callers hold their own lock). `f`
    /// returns every document to write, in order (the one read among them, or not); an error
    /// from `f` writes nothing.
    pub fn update(&self, kind: Kind, name: &str, f: UpdateFn) -> Result<()> {
        match &self.backend {
            Backend::Files { .. } => {
                let current = self.get(kind, name)?;
                let docs = f(current.as_deref())?;
                let refs: Vec<(Kind, &str, &[u8])> =
                    docs.iter().map(|(k, n, b)| (*k, n.as_str(), b.as_slice())).collect();
                self.put(&refs)
            }
            Backend::Postgres(pg) => pg.call(|reply| Req::Update {
                kind,
                name: name.to_string(),
                f,
                reply,
            }),
        }
    }

    /// Removes a document; one that does not exist is no error.
    pub fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        match &self.backend {
            Backend::Files { .. } => {
                let path = self.file(kind, name)?;
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io_err(&path)(e)),
                }
            }
            Backend::Postgres(pg) => pg.call(|reply| Req::Delete {
                kind,
                name: name.to_string(),
                reply,
            }),
        }
    }

    /// The file of a document. Names were checked by `tarn_core::name` (datasets, producers)
    /// or built from them (`<dataset>/<major>.<minor>`); anything else is refused here too.
    fn file(&self, kind: Kind, name: &str) -> Result<PathBuf> {
        let Backend::Files { catalog, keys } = &self.backend else {
            return Err(Error::Corrupt {
                path: PathBuf::new(),
                reason: "not a file store".into(),
            });
        };
        let safe = |s: &str| {
            !s.is_empty() && !s.starts_with('.') && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c))
        };
        let bad = || Error::Corrupt {
            path: catalog.clone(),
            reason: format!("{name:?} is not a valid {} name", kind.as_str()),
        };
        match kind {
            Kind::Dataset if safe(name) => Ok(catalog.join("datasets").join(format!("{name}.json"))),
            Kind::MajorIntent if safe(name) => Ok(catalog.join("majors").join(format!("{name}.json"))),
            Kind::ProducerKeys if safe(name) => Ok(keys.join(format!("{name}.json"))),
            Kind::Version => match name.split_once('/') {
                Some((d, v)) if safe(d) && safe(v) => Ok(catalog.join("versions").join(d).join(format!("{v}.json"))),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }

    fn list_files(&self, kind: Kind, prefix: &str) -> Result<Vec<Doc>> {
        let Backend::Files { catalog, keys } = &self.backend else {
            return Ok(Vec::new());
        };
        // (directory, name prefix of the files in it) of the documents to list.
        let dirs: Vec<(PathBuf, String)> = match kind {
            Kind::Dataset => vec![(catalog.join("datasets"), String::new())],
            Kind::MajorIntent => vec![(catalog.join("majors"), String::new())],
            Kind::ProducerKeys => vec![(keys.clone(), String::new())],
            Kind::Version => {
                let root = catalog.join("versions");
                let mut v = Vec::new();
                match std::fs::read_dir(&root) {
                    Ok(rd) => {
                        for e in rd {
                            let e = e.map_err(io_err(&root))?;
                            let d = e.file_name().to_string_lossy().into_owned();
                            if e.path().is_dir() {
                                v.push((e.path(), format!("{d}/")));
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&root)(e)),
                }
                v
            }
        };
        let mut out = Vec::new();
        for (dir, stem) in dirs {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            for e in rd {
                let path = e.map_err(io_err(&dir))?.path();
                let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
                    continue;
                };
                let Some(base) = file.strip_suffix(".json") else {
                    continue;
                };
                let name = format!("{stem}{base}");
                if name.starts_with(prefix) {
                    out.push((name, std::fs::read(&path).map_err(io_err(&path))?));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// A document's name and body.
pub type Doc = (String, Vec<u8>);

/// What [`Meta::update`] runs on the document it read: the documents to write.
pub type UpdateFn = Box<dyn FnOnce(Option<&[u8]>) -> Result<Vec<(Kind, String, Vec<u8>)>> + Send>;

/// A request to the PostgreSQL thread, with where its answer goes.
enum Req {
    Get {
        kind: Kind,
        name: String,
        reply: mpsc::SyncSender<Result<Option<Vec<u8>>>>,
    },
    List {
        kind: Kind,
        prefix: String,
        reply: mpsc::SyncSender<Result<Vec<Doc>>>,
    },
    Put {
        docs: Vec<(Kind, String, String)>,
        reply: mpsc::SyncSender<Result<()>>,
    },
    Delete {
        kind: Kind,
        name: String,
        reply: mpsc::SyncSender<Result<()>>,
    },
    /// A read-modify-write of one document under its lock.
    Update {
        kind: Kind,
        name: String,
        f: UpdateFn,
        reply: mpsc::SyncSender<Result<()>>,
    },
    /// The first document only if absent, then the rest.
    Create {
        docs: Vec<(Kind, String, String)>,
        reply: mpsc::SyncSender<Result<bool>>,
    },
}

/// The migrations of the metadata schema, in order; `{schema}` is the schema's name. Never
/// edit one that has shipped: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "metadata documents by kind and name",
    "CREATE TABLE {schema}.meta (
         kind TEXT NOT NULL,
         name TEXT NOT NULL,
         body JSONB NOT NULL,
         updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
         PRIMARY KEY (kind, name)
     )",
)];

/// The client of the PostgreSQL store: requests go to its thread.
#[derive(Debug)]
struct Pg {
    tx: mpsc::Sender<Req>,
    describe: String,
}

fn pg_err(what: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + '_ {
    move |e| Error::Meta(format!("{what}: {e}"))
}

/// Checks a schema name: a lowercase identifier that needs no quoting.
pub fn check_schema(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Meta(format!(
            "--meta-schema {schema:?}: a schema is a lowercase identifier (letters, digits, _), at most 63 bytes"
        )))
    }
}

/// Where a parsed configuration points, without its password (which may have come in the
/// URL's user part, a `password=` parameter or a key=value string: the input is never echoed).
fn describe_config(config: &tokio_postgres::Config, schema: &str) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "metadata store in PostgreSQL {}@{}:{port}/{} (schema {schema})",
        config.get_user().unwrap_or_default(),
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

impl Pg {
    fn connect(url: &str, schema: &str) -> Result<Self> {
        check_schema(schema)?;
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Meta(format!("--meta is not a PostgreSQL URL: {e}")))?;
        let describe = describe_config(&config, schema);
        let (tx, rx) = mpsc::channel::<Req>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let schema = schema.to_string();
        let where_ = describe.clone();
        std::thread::Builder::new()
            .name("tarn-meta".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(Error::Meta(format!("starting the metadata thread: {e}"))));
                        return;
                    }
                };
                let mut client = match rt.block_on(open(&config, &schema)) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        Some(c)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(req) = rx.recv() {
                    // A connection that broke is opened again for the next request.
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        match rt.block_on(open(&config, &schema)) {
                            Ok(c) => client = Some(c),
                            Err(e) => {
                                tracing::warn!(error = %e, "the metadata store is unreachable");
                                fail(req, &e.to_string());
                                client = None;
                                continue;
                            }
                        }
                    }
                    if let Some(c) = client.as_mut() {
                        // A request that takes longer than its caller waits drops the connection
                        // (a half-open one would hold this thread); the next opens a new one.
                        if rt
                            .block_on(async { tokio::time::timeout(PG_TIMEOUT, serve(c, &schema, req)).await })
                            .is_err()
                        {
                            tracing::warn!("a metadata request timed out; reconnecting");
                            client = None;
                        }
                    }
                }
            })
            .map_err(|e| Error::Meta(format!("starting the metadata thread: {e}")))?;
        match ready_rx.recv_timeout(PG_TIMEOUT) {
            Ok(Ok(())) => Ok(Self { tx, describe }),
            Ok(Err(e)) => Err(Error::Meta(format!("{where_}: {e}"))),
            Err(_) => Err(Error::Meta(format!(
                "{where_}: no answer within {} s",
                PG_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Sends a request and waits for its answer.
    fn call<T>(&self, make: impl FnOnce(mpsc::SyncSender<Result<T>>) -> Req) -> Result<T> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.tx
            .send(make(reply))
            .map_err(|_| Error::Meta(format!("{}: the metadata thread stopped", self.describe)))?;
        match answer.recv_timeout(PG_TIMEOUT) {
            Ok(r) => r,
            Err(_) => Err(Error::Meta(format!(
                "{}: no answer within {} s",
                self.describe,
                PG_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// Answers a request with an error.
fn fail(req: Req, why: &str) {
    let e = || Error::Meta(why.to_string());
    match req {
        Req::Get { reply, .. } => drop(reply.send(Err(e()))),
        Req::List { reply, .. } => drop(reply.send(Err(e()))),
        Req::Put { reply, .. } => drop(reply.send(Err(e()))),
        Req::Delete { reply, .. } => drop(reply.send(Err(e()))),
        Req::Create { reply, .. } => drop(reply.send(Err(e()))),
        Req::Update { reply, .. } => drop(reply.send(Err(e()))),
    }
}

/// Connects and brings the schema up to this build's migrations.
async fn open(config: &tokio_postgres::Config, schema: &str) -> Result<tokio_postgres::Client> {
    let (mut client, connection) = tokio::time::timeout(PG_TIMEOUT, config.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| Error::Meta("no answer from PostgreSQL".into()))?
        .map_err(pg_err("connecting"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "metadata connection ended");
        }
    });
    migrate(&mut client, schema).await?;
    Ok(client)
}

/// Applies the migrations the schema lacks, in one transaction under an advisory lock.
async fn migrate(client: &mut tokio_postgres::Client, schema: &str) -> Result<()> {
    let tx = client.transaction().await.map_err(pg_err("starting the migration"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("tarn-meta:{schema}")],
    )
    .await
    .map_err(pg_err("locking for the migration"))?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.migrations (
             version INT PRIMARY KEY,
             description TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(pg_err("creating the migrations table"))?;
    let row = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {schema}.migrations"),
            &[],
        )
        .await
        .map_err(pg_err("reading the schema version"))?;
    let current: i32 = row.get(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > known {
        return Err(Error::Meta(format!(
            "the metadata schema {schema} is at version {current}, newer than this tarn knows ({known}): upgrade tarn"
        )));
    }
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(&sql.replace("{schema}", schema))
            .await
            .map_err(pg_err("applying a migration"))?;
        tx.execute(
            &format!("INSERT INTO {schema}.migrations (version, description) VALUES ($1, $2)"),
            &[version, description],
        )
        .await
        .map_err(pg_err("recording a migration"))?;
        tracing::info!(schema, version, description, "metadata migration applied");
    }
    tx.commit().await.map_err(pg_err("committing the migration"))
}

async fn serve(client: &mut tokio_postgres::Client, schema: &str, req: Req) {
    match req {
        Req::Get { kind, name, reply } => {
            let r = client
                .query_opt(
                    &format!("SELECT body::text FROM {schema}.meta WHERE kind = $1 AND name = $2"),
                    &[&kind.as_str(), &name],
                )
                .await
                .map(|row| row.map(|r| r.get::<_, String>(0).into_bytes()))
                .map_err(pg_err("reading metadata"));
            let _ = reply.send(r);
        }
        Req::List { kind, prefix, reply } => {
            let r = client
                .query(
                    &format!(
                        "SELECT name, body::text FROM {schema}.meta
                         WHERE kind = $1 AND left(name, length($2)) = $2 ORDER BY name"
                    ),
                    &[&kind.as_str(), &prefix],
                )
                .await
                .map(|rows| {
                    rows.into_iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1).into_bytes()))
                        .collect()
                })
                .map_err(pg_err("listing metadata"));
            let _ = reply.send(r);
        }
        Req::Update { kind, name, f, reply } => {
            let r = async {
                let tx = client.transaction().await.map_err(pg_err("starting an update"))?;
                tx.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))",
                    &[&format!("tarn-meta:{schema}:{}:{name}", kind.as_str())],
                )
                .await
                .map_err(pg_err("locking a document"))?;
                let current: Option<String> = tx
                    .query_opt(
                        &format!("SELECT body::text FROM {schema}.meta WHERE kind = $1 AND name = $2"),
                        &[&kind.as_str(), &name],
                    )
                    .await
                    .map_err(pg_err("reading metadata"))?
                    .map(|r| r.get(0));
                let docs = f(current.as_deref().map(str::as_bytes))?;
                let stmt = tx
                    .prepare(&format!(
                        "INSERT INTO {schema}.meta (kind, name, body) VALUES ($1, $2, $3::text::jsonb)
                         ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body, updated_at = now()"
                    ))
                    .await
                    .map_err(pg_err("writing metadata"))?;
                for (kind, name, body) in &docs {
                    let body =
                        std::str::from_utf8(body).map_err(|e| Error::Meta(format!("{name}: not UTF-8 JSON: {e}")))?;
                    tx.execute(&stmt, &[&kind.as_str(), name, &body])
                        .await
                        .map_err(pg_err("writing metadata"))?;
                }
                tx.commit().await.map_err(pg_err("committing metadata"))
            }
            .await;
            let _ = reply.send(r);
        }
        Req::Put { docs, reply } => {
            let r = async {
                let tx = client.transaction().await?;
                let stmt = tx
                    .prepare(&format!(
                        "INSERT INTO {schema}.meta (kind, name, body) VALUES ($1, $2, $3::text::jsonb)
                         ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body, updated_at = now()"
                    ))
                    .await?;
                for (kind, name, body) in &docs {
                    tx.execute(&stmt, &[&kind.as_str(), name, body]).await?;
                }
                tx.commit().await
            }
            .await
            .map_err(pg_err("writing metadata"));
            let _ = reply.send(r);
        }
        Req::Create { docs, reply } => {
            let r = async {
                let tx = client.transaction().await?;
                let mut created = false;
                for (i, (kind, name, body)) in docs.iter().enumerate() {
                    let n = if i == 0 {
                        tx.execute(
                            &format!(
                                "INSERT INTO {schema}.meta (kind, name, body) VALUES ($1, $2, $3::text::jsonb)
                                 ON CONFLICT (kind, name) DO NOTHING"
                            ),
                            &[&kind.as_str(), name, body],
                        )
                        .await?
                    } else {
                        tx.execute(
                            &format!(
                                "INSERT INTO {schema}.meta (kind, name, body) VALUES ($1, $2, $3::text::jsonb)
                                 ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body, updated_at = now()"
                            ),
                            &[&kind.as_str(), name, body],
                        )
                        .await?
                    };
                    if i == 0 {
                        created = n == 1;
                        if !created {
                            break;
                        }
                    }
                }
                if created {
                    tx.commit().await?;
                }
                Ok(created)
            }
            .await
            .map_err(pg_err("creating metadata"));
            let _ = reply.send(r);
        }
        Req::Delete { kind, name, reply } => {
            let r = client
                .execute(
                    &format!("DELETE FROM {schema}.meta WHERE kind = $1 AND name = $2"),
                    &[&kind.as_str(), &name],
                )
                .await
                .map(|_| ())
                .map_err(pg_err("deleting metadata"));
            let _ = reply.send(r);
        }
    }
}

#[cfg(test)]
mod tests;
