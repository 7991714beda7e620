//! The HTTP API and the one place where errors become status codes.
//!
//! - `POST /v1/datasets/{name}/events`: JSON array or NDJSON, optionally gzip/zstd.
//! - `POST /v1/query`: `{"sql": "...", "row_limit": N, "format": "json|csv|ndjson|arrow",
//!   "timeout_ms": N, "bytes_max": N, "dry_run": bool}`; the format may also come from the
//!   Accept header.
//! - `GET /v1/datasets`: the registered contracts.
//! - `GET /v1/datasets/{name}`: one dataset's page (contract, storage, rows, freshness,
//!   lineage).
//! - `POST /v1/compact`: `{"dataset": D, "day": "YYYY-MM-DD", "dry_run": bool}`, all optional;
//!   answers NDJSON: progress lines, one report per dataset, then `done` or `error`.
//! - `GET /v1/storage[?dataset=D]`: the storage and cost report.
//! - `POST /v1/lifecycle`: `{"dataset": D, "dry_run": bool}`; answers `{"reports": [...]}`.
//! - `POST /v1/restore`: `{"dataset": D, "day": "YYYY-MM-DD", "days": N}`.
//! - `POST /v1/vacuum`: `{"dataset": D, "dry_run": bool}`, both optional; answers
//!   `{"reports": [...]}`.
//! - `GET /v1/rollups`, `GET /v1/rollups/{name}`, `POST /v1/rollups/{name}/rebuild`: see
//!   `rollup_api.rs`.
//! - `GET /v1/catalog/search?q=TEXT[&limit=N]`: datasets ranked for the words of TEXT.
//! - `GET /healthz`, `GET /metrics` (Prometheus text).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tarn_collector::Encoding;

use crate::serve::App;

/// The largest body of the descriptor endpoints (validate, plan, apply).
const DESCRIPTORS_BODY_MAX: usize = 64 << 20;

/// The routes of the roles this process runs (`--roles`); any other path answers 404 with
/// the roles this process has, so a request sent to the wrong process says so.
pub fn router(app: Arc<App>) -> Router {
    let roles = app.roles;
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics));
    if roles.collector {
        r = r.route("/v1/datasets/{name}/events", post(ingest));
    }
    if roles.query {
        r = r.merge(query_routes());
    }
    r.fallback(not_served)
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
}

async fn not_served(State(app): State<Arc<App>>, uri: axum::http::Uri) -> ApiError {
    api(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no endpoint {} on this process (its roles: {}; ingest is on collectors, queries, the catalog and admin calls on query processes)",
            uri.path(),
            app.roles.describe()
        ),
    )
}

fn query_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/datasets", get(datasets))
        .route("/v1/datasets/{name}", get(dataset_page))
        .route("/v1/datasets/{name}/versions", get(crate::catalog_api::versions))
        .route(
            "/v1/datasets/{name}/versions/{version}",
            get(crate::catalog_api::version),
        )
        .route(
            "/v1/catalog/validate",
            post(crate::catalog_api::validate_handler).layer(DefaultBodyLimit::max(DESCRIPTORS_BODY_MAX)),
        )
        .route(
            "/v1/catalog/plan",
            post(crate::catalog_api::plan_handler).layer(DefaultBodyLimit::max(DESCRIPTORS_BODY_MAX)),
        )
        .route(
            "/v1/catalog/register",
            post(crate::catalog_api::register_handler).layer(DefaultBodyLimit::max(1 << 20)),
        )
        .route(
            "/v1/catalog/apply",
            post(crate::catalog_api::apply_handler).layer(DefaultBodyLimit::max(DESCRIPTORS_BODY_MAX)),
        )
        .route("/v1/query", post(query))
        .route("/v1/compact", post(compact))
        .route("/v1/vacuum", post(vacuum))
        .route("/v1/storage", get(storage))
        .route("/v1/lifecycle", post(lifecycle))
        .route("/v1/restore", post(restore))
        .route("/v1/catalog/search", get(catalog_search))
        .route("/v1/rollups", get(crate::rollup_api::list))
        .route("/v1/rollups/{name}", get(crate::rollup_api::read))
        .route("/v1/rollups/{name}/rebuild", post(crate::rollup_api::rebuild))
}

/// An error answer: status, a stable code and a message.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_s: Option<u32>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl ApiError {
    pub fn message(&self) -> &str {
        &self.message
    }
}

pub fn api(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
        retry_after_s: None,
    }
}

impl From<tarn_collector::Error> for ApiError {
    fn from(e: tarn_collector::Error) -> Self {
        use tarn_collector::Error as E;
        let msg = e.to_string();
        match e {
            E::BadRequest(_) => api(StatusCode::BAD_REQUEST, "bad_request", msg),
            E::TooLarge(_) => api(StatusCode::PAYLOAD_TOO_LARGE, "too_large", msg),
            E::UnsupportedEncoding(_) => api(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding", msg),
            E::UnknownDataset(_) => api(StatusCode::NOT_FOUND, "unknown_dataset", msg),
            E::Overloaded(_) => ApiError {
                retry_after_s: Some(1),
                ..api(StatusCode::SERVICE_UNAVAILABLE, "overloaded", msg)
            },
            E::Unavailable(_) => ApiError {
                retry_after_s: Some(5),
                ..api(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
            },
            E::Internal(_) => api(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }
}

/// The one mapping of catalog errors to HTTP answers.
pub fn catalog_error(e: tarn_catalog::Error) -> ApiError {
    use tarn_catalog::Error as E;
    let msg = e.to_string();
    match e {
        E::Invalid(_) => api(StatusCode::BAD_REQUEST, "invalid_contract", msg),
        E::Conflict { .. } | E::Refused { .. } | E::System { .. } | E::Registered { .. } | E::NeedsMove { .. } => {
            api(StatusCode::UNPROCESSABLE_ENTITY, "refused", msg)
        }
        E::Io { .. } | E::Corrupt { .. } => api(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        E::Meta(_) => ApiError {
            retry_after_s: Some(5),
            ..api(StatusCode::SERVICE_UNAVAILABLE, "metadata_unavailable", msg)
        },
    }
}

impl From<tarn_query::Error> for ApiError {
    fn from(e: tarn_query::Error) -> Self {
        let msg = e.to_string();
        match e {
            tarn_query::Error::BadQuery(_) => api(StatusCode::BAD_REQUEST, "bad_query", msg),
            tarn_query::Error::Execution(_) => api(StatusCode::UNPROCESSABLE_ENTITY, "query_failed", msg),
            tarn_query::Error::Timeout(_) => api(StatusCode::GATEWAY_TIMEOUT, "timeout", msg),
            tarn_query::Error::Archived(_) => api(StatusCode::CONFLICT, "archived", msg),
            tarn_query::Error::Refused(_) => api(StatusCode::FORBIDDEN, "refused", msg),
            tarn_query::Error::NotFound(_) => api(StatusCode::NOT_FOUND, "not_found", msg),
            tarn_query::Error::Unavailable(_) => ApiError {
                retry_after_s: Some(30),
                ..api(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
            },
            tarn_query::Error::Internal(_) => api(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }
}

async fn ingest(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let _busy = app.ingest_cpus.request();
    // The contract in memory on the hot path; only a dataset unknown here asks the store.
    let known = match app.catalog.get(&name) {
        Some(spec) => Some(spec),
        None => {
            let (catalog, name) = (app.catalog.clone(), name.clone());
            tokio::task::spawn_blocking(move || catalog.lookup(&name))
                .await
                .map_err(|e| {
                    api(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("catalog task: {e}"),
                    )
                })?
                .map_err(catalog_error)?
        }
    };
    if let Some(spec) = known
        && !spec.producers.is_empty()
    {
        let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        match app.producer_keys.check_write(&spec.producers, auth) {
            Ok(_) => {}
            Err(crate::keys::WriteDenied::Unknown) => {
                drain(body, app.collector.limits().body_bytes_max).await;
                return Err(api(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    format!(
                        "{name} accepts events only from its producers; send `Authorization: Bearer <write key>` (keys come from `tarn apply`)"
                    ),
                ));
            }
            Err(crate::keys::WriteDenied::NotAProducer { producer }) => {
                drain(body, app.collector.limits().body_bytes_max).await;
                return Err(api(
                    StatusCode::FORBIDDEN,
                    "not_a_producer",
                    format!(
                        "the key of {producer} may not write {name}: its descriptor does not name {producer} among its producers"
                    ),
                ));
            }
        }
    }
    let encoding = Encoding::from_header(headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()))?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
        && (ct.contains("protobuf") || ct.starts_with("multipart/"))
    {
        return Err(api(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content type {ct:?} is not supported; send a JSON array or NDJSON"),
        ));
    }
    let limit = app.collector.limits().body_bytes_max;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let _admission = match app
        .collector
        .admit(declared.unwrap_or(limit), encoding != Encoding::Identity)
    {
        Ok(a) => a,
        Err(e) => {
            // Read (and drop) what the client is sending, up to a bound, so that it gets to
            // read the answer instead of a connection reset.
            drain(body, limit.saturating_mul(4)).await;
            return Err(e.into());
        }
    };
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_big = std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit"));
        if too_big || e.to_string().contains("length limit") {
            api(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body is larger than the limit of {limit} bytes"),
            )
        } else {
            api(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading the request body: {e}"),
            )
        }
    })?;
    let report = app.collector.ingest(&name, bytes, encoding).await?;
    let delivered = [
        (report.accepted > 0).then_some(name.as_str()),
        report.dead_letters.as_deref(),
    ];
    for d in delivered.into_iter().flatten() {
        if let Err(e) = app.ensure_delivery(d) {
            tracing::error!(dataset = %d, error = %e, "cannot start delivery");
        }
    }
    let status = if report.accepted == 0 && report.rejected > 0 {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(report)).into_response())
}

/// Reads and discards up to `max` bytes of a body.
async fn drain(body: Body, max: usize) {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len();
        if seen > max {
            break;
        }
    }
}

async fn datasets(State(app): State<Arc<App>>) -> Response {
    let list: Vec<_> = app.catalog.list().iter().map(|s| (**s).clone()).collect();
    axum::Json(json!({ "datasets": list })).into_response()
}

/// A dataset's page: its contract, storage by tier (partitions, files, bytes, first and last
/// day), row count and newest receive time, and what reads it (rollups, dead letters).
async fn dataset_page(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let Some(spec) = app.catalog.get(&name) else {
        return Err(api(
            StatusCode::NOT_FOUND,
            "unknown_dataset",
            format!("no dataset named {name:?}"),
        ));
    };
    let has_table = app.lake().has_table(&name).await.map_err(|e| {
        api(
            StatusCode::SERVICE_UNAVAILABLE,
            "lake_unavailable",
            format!("looking for the table of {name}: {e}"),
        )
    })?;
    let storage = if has_table {
        Some(app.maintenance.storage_of(&spec).await?)
    } else {
        None
    };
    // Counted through SQL, so a guardrail (a required partition filter) may refuse: the page
    // then says why instead of failing.
    let (mut rows, mut newest, mut rows_error) = (json!(0), serde_json::Value::Null, None);
    if has_table || spec.external.is_some() {
        // Registered data has no receive time of tarn's.
        let sql = if spec.external.is_some() {
            format!("SELECT count(*) FROM \"{name}\"")
        } else {
            format!("SELECT count(*), CAST(max(_received_at) AS VARCHAR) FROM {name}")
        };
        match app.query.sql(&sql, &tarn_query::QueryOptions::default()).await {
            Ok(r) => {
                rows = r.rows.first().and_then(|x| x.first()).cloned().unwrap_or_default();
                newest = r.rows.first().and_then(|x| x.get(1)).cloned().unwrap_or_default();
            }
            Err(e) => rows_error = Some(e.to_string()),
        }
    }
    let versions: Vec<serde_json::Value> = app
        .catalog
        .versions(&name)
        .map_err(catalog_error)?
        .iter()
        .map(|v| json!({"version": v.label(), "applied_at": v.applied_at}))
        .collect();
    let dead_letters = format!("{name}{}", tarn_core::contract::REJECTED_SUFFIX);
    let mut read_by: Vec<serde_json::Value> = spec
        .rollups
        .iter()
        .map(|r| json!({"kind": "rollup", "name": r.name}))
        .chain(
            spec.consumers
                .iter()
                .map(|c| json!({"kind": "application", "name": c.name})),
        )
        .collect();
    if app.catalog.get(&dead_letters).is_some() {
        read_by.push(json!({"kind": "dead_letters", "name": dead_letters}));
    }
    Ok(axum::Json(json!({
        "name": name,
        "contract": *spec,
        "schema_versions": versions,
        "producers": spec.producers,
        "delivery": {"size": spec.size.as_str(), "batch_bytes": app.delivery_batch_bytes(&name), "shards": app.shards_of(spec.size)},
        "consumers": spec.consumers,
        "rows": rows,
        "rows_error": rows_error,
        "last_received_at": newest,
        "storage": storage,
        "lineage": {
            "reads": spec.producers.iter().map(|p| json!({"kind": "application", "name": p.name})).collect::<Vec<_>>(),
            "read_by": read_by,
        },
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    sql: String,
    /// Most rows returned: 10,000 by default for JSON; no limit by default for the streamed
    /// formats. At most 1,000,000 for JSON.
    #[serde(default)]
    row_limit: Option<usize>,
    /// `json` (default), `csv`, `ndjson` or `arrow`; overrides the Accept header.
    #[serde(default)]
    format: Option<String>,
    /// Stop the query after this many milliseconds (default 300,000; at most 3,600,000).
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Refuse the query when its scan would read more bytes than this (never more than the
    /// server's `--query-bytes-max`).
    #[serde(default)]
    bytes_max: Option<u64>,
    /// Plan only: answer what the query would read (files, bytes, cost), without running it.
    #[serde(default)]
    dry_run: bool,
}

const JSON_ROWS_MAX: usize = 1_000_000;

/// The longest a query may run: one hour. Vacuum's shortest retention is twice this, so a
/// running query never loses a file it planned to read.
pub const QUERY_TIMEOUT_MAX_MS: u64 = 3_600_000;

fn pick_format(param: Option<&str>, accept: Option<&str>) -> Result<crate::results::Format, ApiError> {
    use crate::results::Format;
    if let Some(p) = param {
        return Format::from_name(p).ok_or_else(|| {
            api(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("unknown format {p:?}; use json, csv, ndjson or arrow"),
            )
        });
    }
    Ok(accept.and_then(Format::from_accept).unwrap_or(Format::Json))
}

async fn query(State(app): State<Arc<App>>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: QueryRequest = serde_json::from_slice(&body).map_err(|e| {
        api(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {{\"sql\": \"...\"}}: {e}"),
        )
    })?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = pick_format(req.format.as_deref(), accept)?;
    let timeout = std::time::Duration::from_millis(req.timeout_ms.unwrap_or(300_000).min(QUERY_TIMEOUT_MAX_MS));
    let caller = app
        .read_keys
        .sql_caller(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))
        .map_err(|d| match d {
            crate::keys::SqlDenied::Unknown => api(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the Authorization header does not carry a known key (or send none to query as anonymous)",
            ),
            crate::keys::SqlDenied::TenantKey { key } => api(
                StatusCode::FORBIDDEN,
                "tenant_key",
                format!("key {key} reads one tenant's rollups; SQL sees every tenant, so it needs a `*` key"),
            ),
        })?;
    // The key's budget replaces the server's; the request may only lower it.
    let budget = caller.bytes_max.or(app.query_bytes_max);
    let bytes_max = match (req.bytes_max, budget) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let who = caller.key.clone().unwrap_or_else(|| tarn_query::ANONYMOUS.to_string());
    if req.dry_run {
        let est = tokio::time::timeout(timeout, app.query.estimate(&req.sql))
            .await
            .map_err(|_| ApiError::from(tarn_query::Error::Timeout(timeout)))??;
        let within = bytes_max.is_none_or(|m| est.bytes <= m);
        return Ok(
            axum::Json(json!({ "estimate": est, "bytes_max": bytes_max, "within_budget": within })).into_response(),
        );
    }
    if format == crate::results::Format::Json {
        let opts = tarn_query::QueryOptions {
            row_limit: req.row_limit.unwrap_or(10_000).min(JSON_ROWS_MAX),
            timeout,
            bytes_max,
            who: Some(who),
        };
        let result = app.query.sql(&req.sql, &opts).await?;
        return Ok(axum::Json(result).into_response());
    }
    let q = app
        .query
        .stream_within(&who, &req.sql, bytes_max, false, timeout)
        .await?;
    let body = crate::results::stream_body(q, format, req.row_limit, timeout).map_err(|e| {
        api(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("starting the result stream: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, format.content_type())], body).into_response())
}

impl From<crate::maintenance::RequestError> for ApiError {
    fn from(e: crate::maintenance::RequestError) -> Self {
        use crate::maintenance::RequestError;
        match e {
            RequestError::Bad(m) => api(StatusCode::BAD_REQUEST, "bad_request", m),
            e @ RequestError::UnknownDataset(_) => api(StatusCode::NOT_FOUND, "unknown_dataset", e.to_string()),
        }
    }
}

impl From<tarn_lake::Error> for ApiError {
    fn from(e: tarn_lake::Error) -> Self {
        let msg = e.to_string();
        match e {
            tarn_lake::Error::Refused(_) => api(StatusCode::BAD_REQUEST, "refused", msg),
            _ => api(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }
}

/// A maintenance request body: empty means every default.
fn maintenance_request<T: serde::de::DeserializeOwned + Default>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| api(StatusCode::BAD_REQUEST, "bad_request", format!("expected {shape}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageQuery {
    dataset: Option<String>,
}

async fn storage(
    State(app): State<Arc<App>>,
    axum::extract::Query(q): axum::extract::Query<StorageQuery>,
) -> Result<Response, ApiError> {
    let specs = app.maintenance.datasets(q.dataset.as_deref())?;
    let month = tarn_query::current_month();
    let scanned = app.query.usage().month(&month);
    let retrieved = app.query.usage().retrieved(&month);
    let report = app.maintenance.storage(&specs, &scanned, &retrieved, &month).await?;
    Ok(axum::Json(report).into_response())
}

/// Runs maintenance work on the background runtime and waits for its result.
async fn on_background<T: Send + 'static>(
    app: &App,
    what: &str,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, ApiError> {
    app.run_background(work).await.map_err(|e| {
        api(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what} task ended early: {e}"),
        )
    })
}

async fn lifecycle(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: crate::maintenance::VacuumRequest = maintenance_request(&body, "{\"dataset\": ..., \"dry_run\": ...}")?;
    let specs = app.maintenance.datasets(req.dataset.as_deref())?;
    let m = app.maintenance.clone();
    let reports = on_background(&app, "lifecycle", async move {
        let today = m.today();
        m.lifecycle(&specs, today, req.dry_run).await
    })
    .await??;
    Ok(axum::Json(json!({ "reports": reports })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    dataset: String,
    day: String,
    /// Days the restore lasts (default 7, at most 365).
    #[serde(default)]
    days: Option<u32>,
}

async fn restore(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: RestoreRequest = serde_json::from_slice(&body).map_err(|e| {
        api(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {{\"dataset\": ..., \"day\": \"YYYY-MM-DD\", \"days\": N}}: {e}"),
        )
    })?;
    app.maintenance.datasets(Some(&req.dataset))?;
    let days = req.days.unwrap_or(7);
    if !(1..=365).contains(&days) {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("days is {days}; it must be from 1 to 365"),
        ));
    }
    let m = app.maintenance.clone();
    let (dataset, day) = (req.dataset.clone(), req.day.clone());
    let files = on_background(&app, "restore", async move { m.restore(&dataset, &day, days).await }).await??;
    Ok(axum::Json(json!({ "dataset": req.dataset, "day": req.day, "files": files, "days": days })).into_response())
}

async fn vacuum(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: crate::maintenance::VacuumRequest = maintenance_request(&body, "{\"dataset\": ..., \"dry_run\": ...}")?;
    let specs = app.maintenance.datasets(req.dataset.as_deref())?;
    let m = app.maintenance.clone();
    let reports = on_background(&app, "vacuum", async move { m.vacuum(&specs, req.dry_run).await }).await??;
    Ok(axum::Json(json!({ "reports": reports })).into_response())
}

async fn compact(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: crate::maintenance::CompactRequest =
        maintenance_request(&body, "{\"dataset\": ..., \"day\": ..., \"dry_run\": ...}")?;
    let specs = app.maintenance.check(&req)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let m = app.maintenance.clone();
    app.spawn_background(async move { m.run_request(specs, req, tx).await });
    Ok(ndjson_lines(rx))
}

/// An NDJSON answer streaming what a background task sends, one JSON line per item, until
/// the task drops its sender.
pub fn ndjson_lines<T: serde::Serialize + Send + 'static>(rx: tokio::sync::mpsc::UnboundedReceiver<T>) -> Response {
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(line)), rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    q: String,
    /// Most hits (default 20, at most 1000).
    limit: Option<usize>,
}

async fn catalog_search(
    State(app): State<Arc<App>>,
    axum::extract::Query(q): axum::extract::Query<SearchQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("limit is {limit}; it must be from 1 to 1000"),
        ));
    }
    if q.q.len() > 1000 {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the query is longer than 1000 bytes",
        ));
    }
    let hits = tarn_catalog::search::search(&app.catalog.list(), &q.q, limit);
    Ok(axum::Json(json!({ "query": q.q, "hits": hits })).into_response())
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = &app.collector.metrics;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    counter(
        "tarn_ingest_requests_total",
        "Ingest requests answered 2xx.",
        m.requests_ok.load(Relaxed),
    );
    counter(
        "tarn_ingest_requests_failed_total",
        "Ingest requests that failed.",
        m.requests_failed.load(Relaxed),
    );
    counter(
        "tarn_ingest_requests_overloaded_total",
        "Ingest requests refused for overload.",
        m.requests_overloaded.load(Relaxed),
    );
    counter(
        "tarn_ingest_events_accepted_total",
        "Events accepted and durable in the log.",
        m.events_accepted.load(Relaxed),
    );
    counter(
        "tarn_ingest_events_rejected_total",
        "Events refused by their contract.",
        m.events_rejected.load(Relaxed),
    );
    counter(
        "tarn_ingest_body_bytes_total",
        "Request body bytes of answered requests.",
        m.body_bytes.load(Relaxed),
    );
    let c = app.curate_stats();
    counter(
        "tarn_curate_rows_total",
        "Rows appended to Delta tables.",
        c.rows.load(Relaxed),
    );
    counter(
        "tarn_curate_commits_total",
        "Delta commits made by curate.",
        c.commits.load(Relaxed),
    );
    counter(
        "tarn_curate_errors_total",
        "Curate rounds that failed and were retried.",
        c.errors.load(Relaxed),
    );
    counter(
        "tarn_background_narrowings_total",
        "Times delivery and curate were moved off the CPUs reserved for ingest.",
        app.ingest_cpus.narrowings(),
    );
    counter(
        "tarn_ingest_saturations_total",
        "Times ingest requests kept every CPU busy, so delivery and curate got the reserved CPUs back.",
        app.ingest_cpus.saturations(),
    );
    if let Some(w) = &app.worker {
        let held = w.held_units();
        let _ = writeln!(
            out,
            "# HELP tarn_worker_units_held Units of delivery and curate this worker runs (of tarn_worker_units).\n# TYPE tarn_worker_units_held gauge\ntarn_worker_units_held {}",
            held.len()
        );
        let _ = writeln!(
            out,
            "# HELP tarn_worker_units Units the stream's work is cut into.\n# TYPE tarn_worker_units gauge\ntarn_worker_units {}",
            w.units()
        );
        let _ = writeln!(
            out,
            "# HELP tarn_worker_unit_held The units this worker runs, one series each.\n# TYPE tarn_worker_unit_held gauge"
        );
        for k in held {
            let _ = writeln!(out, "tarn_worker_unit_held{{unit=\"{k}\"}} 1");
        }
    }
    let cpus = &app.ingest_cpus;
    for (name, help, v) in [
        (
            "tarn_ingest_cpus_reserved",
            "CPUs kept free of delivery and curate while ingest requests arrive.",
            cpus.reserved() as f64,
        ),
        (
            "tarn_background_narrowed",
            "1 while delivery and curate keep off the CPUs reserved for ingest.",
            f64::from(u8::from(cpus.narrowed())),
        ),
        (
            "tarn_ingest_load",
            "Ingest requests in flight on average over about 200 ms, measured while CPUs are reserved.",
            cpus.load(),
        ),
        (
            "tarn_ingest_saturated",
            "1 while ingest requests keep every CPU busy, so nothing is reserved for them.",
            f64::from(u8::from(cpus.saturated())),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    m.latency.render(
        &mut out,
        "tarn_ingest_latency_seconds",
        "Time from request received to its events durable: decoding, checks, encoding and append.",
    );
    m.prepare.render(
        &mut out,
        "tarn_ingest_prepare_seconds",
        "Time of a request's decoding, checks and encoding on a blocking thread, waiting for one included.",
    );
    m.prepare_cpu.render(
        &mut out,
        "tarn_ingest_prepare_cpu_seconds",
        "CPU time of a request's decoding, checks and encoding; the prepare time beyond it was spent waiting (for a thread, a CPU, memory).",
    );
    m.append.render(
        &mut out,
        "tarn_ingest_append_seconds",
        "Time of a request's durable append alone: its turn in a group commit, the write and the sync.",
    );
    let _ = writeln!(
        out,
        "# HELP tarn_log_bytes Bytes in log segments per topic.\n# TYPE tarn_log_bytes gauge"
    );
    let stats = app.log_stats().await;
    for (topic, s) in &stats {
        let _ = writeln!(out, "tarn_log_bytes{{topic=\"{topic}\"}} {}", s.bytes);
    }
    let _ = writeln!(
        out,
        "# HELP tarn_log_next_sequence Next sequence per topic.\n# TYPE tarn_log_next_sequence gauge"
    );
    for (topic, s) in &stats {
        let _ = writeln!(out, "tarn_log_next_sequence{{topic=\"{topic}\"}} {}", s.next_seq);
    }
    let _ = writeln!(
        out,
        "# HELP tarn_log_segments_reused_total Log segments started in a consumed segment's file (embedded log).\n# TYPE tarn_log_segments_reused_total counter"
    );
    for (topic, s) in &stats {
        let _ = writeln!(
            out,
            "tarn_log_segments_reused_total{{topic=\"{topic}\"}} {}",
            s.segments_reused
        );
    }
    if let Some(spares) = app.log_spares() {
        let _ = writeln!(
            out,
            "# HELP tarn_log_spare_segments Consumed log segment files kept for reuse (embedded log), counted in no topic.\n# TYPE tarn_log_spare_segments gauge\ntarn_log_spare_segments {}",
            spares.segments
        );
        let _ = writeln!(
            out,
            "# HELP tarn_log_spare_bytes Bytes of the consumed log segment files kept for reuse (embedded log).\n# TYPE tarn_log_spare_bytes gauge\ntarn_log_spare_bytes {}",
            spares.bytes
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
