//! Self-serve descriptors: `tarn validate|plan|apply DIR` and `POST /v1/catalog/{validate,
//! plan,apply}`, and the kept versions of a contract (`GET /v1/datasets/{name}/versions`).
//!
//! The CLI reads the folder and sends its descriptors to the server, which validates them
//! against its live catalog (`tarn_catalog::validate`), plans (`tarn_catalog::plan`) and
//! applies: catalog entries (each version kept), table columns for additive changes, the
//! dataset's delivery, rollups, and write keys for new producers. `tarn validate --offline`
//! checks a folder without a server (no breaking-change check against what runs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tarn_catalog::plan::{Plan, Step};
use tarn_catalog::validate::{Norms, Report, Source, validate};

use crate::http::{ApiError, api};
use crate::serve::App;

/// Most descriptors in one request.
pub const DESCRIPTORS_MAX: usize = 10_000;

/// The body of the three catalog endpoints.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorsBody {
    pub descriptors: Vec<DescriptorIn>,
    /// Naming norms as YAML (see `tarn validate --norms`); absent: the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norms: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorIn {
    pub file: String,
    pub text: String,
}

fn check_body(body: &DescriptorsBody) -> Result<(Vec<Source>, Norms), ApiError> {
    if body.descriptors.len() > DESCRIPTORS_MAX {
        return Err(api(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_descriptors",
            format!(
                "{} descriptors; at most {DESCRIPTORS_MAX} at once",
                body.descriptors.len()
            ),
        ));
    }
    let norms = match &body.norms {
        Some(t) => Norms::from_yaml(t).map_err(|e| api(StatusCode::BAD_REQUEST, "bad_norms", e))?,
        None => Norms::default(),
    };
    let sources = body
        .descriptors
        .iter()
        .map(|d| Source {
            file: d.file.clone(),
            text: d.text.clone(),
        })
        .collect();
    Ok((sources, norms))
}

fn report_json(r: &Report) -> serde_json::Value {
    json!({"errors": r.errors(), "warnings": r.warnings(), "findings": r.findings})
}

fn validated(app: &App, body: &DescriptorsBody) -> Result<Report, ApiError> {
    let (sources, norms) = check_body(body)?;
    let catalog = app.catalog.clone();
    Ok(validate(&sources, &move |n: &str| catalog.get(n), &norms))
}

fn planned(app: &App, report: &Report) -> Plan {
    let declared: Vec<_> = report.specs.iter().map(|(_, s)| s.clone()).collect();
    tarn_catalog::plan::plan(&declared, &app.catalog.list(), &|p| app.producer_keys.has(p))
}

pub async fn validate_handler(
    State(app): State<Arc<App>>,
    axum::Json(body): axum::Json<DescriptorsBody>,
) -> Result<Response, ApiError> {
    let report = validated(&app, &body)?;
    Ok(axum::Json(report_json(&report)).into_response())
}

pub async fn plan_handler(
    State(app): State<Arc<App>>,
    axum::Json(body): axum::Json<DescriptorsBody>,
) -> Result<Response, ApiError> {
    let report = validated(&app, &body)?;
    let plan = planned(&app, &report);
    let mut out = report_json(&report);
    out["plan"] = json!(plan);
    Ok(axum::Json(out).into_response())
}

/// What one applied step did.
#[derive(Debug, Serialize)]
pub struct AppliedStep {
    pub dataset: String,
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub columns_added: usize,
}

/// A write key issued by an apply: its secret is shown once and never stored.
#[derive(Debug, Serialize)]
pub struct IssuedKey {
    pub producer: String,
    pub secret: String,
}

/// With a key file, changing the catalog (apply, register) takes a `*` key: it issues write
/// keys and opens data to SQL.
fn require_admin(app: &App, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if app.read_keys.is_empty() {
        return Ok(());
    }
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match app.read_keys.sql_caller(auth) {
        Ok(c) if c.key.is_some() => Ok(()),
        Ok(_) | Err(crate::keys::SqlDenied::Unknown) => Err(api(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "changing the catalog needs a `*` key (`--key` or TARN_KEY)",
        )),
        Err(crate::keys::SqlDenied::TenantKey { key }) => Err(api(
            StatusCode::FORBIDDEN,
            "tenant_key",
            format!("key {key} reads one tenant's rollups; changing the catalog needs a `*` key"),
        )),
    }
}

pub async fn apply_handler(
    State(app): State<Arc<App>>,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<DescriptorsBody>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    // One apply at a time: the plan must still hold when its steps run.
    let _one = app.apply_lock.lock().await;
    let report = validated(&app, &body)?;
    if report.errors() > 0 {
        let mut out = report_json(&report);
        out["error"] = json!({"code": "invalid_descriptors", "message": format!("{} error(s) in the descriptors; nothing was applied", report.errors())});
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, axum::Json(out)).into_response());
    }
    let plan = planned(&app, &report);
    if let Some(Step::Refused { dataset, reason }) = plan.refused().next() {
        return Err(api(
            StatusCode::UNPROCESSABLE_ENTITY,
            "refused",
            format!("{dataset}: {reason}; nothing was applied"),
        ));
    }
    let specs: Vec<_> = report.specs.into_iter().map(|(_, s)| s).collect();
    let (applied, keys) = apply_specs(&app, specs, true).await?;
    Ok(axum::Json(json!({
        "applied": applied,
        "keys": keys,
        "unchanged": plan.unchanged,
        "untracked": plan.untracked,
    }))
    .into_response())
}

/// Applies contracts that passed validation and planning: catalog entries, table columns,
/// deliveries, rollups and (when `issue_keys`) write keys for producers that have none.
pub async fn apply_specs(
    app: &Arc<App>,
    specs: Vec<tarn_core::DatasetSpec>,
    issue_keys: bool,
) -> Result<(Vec<AppliedStep>, Vec<IssuedKey>), ApiError> {
    // Keys first: a dataset that names a producer refuses it the moment its contract is in
    // force. If a later step fails, the keys issued here are taken back (their secrets would
    // never reach anyone) and the next apply issues them again.
    let producers: std::collections::BTreeSet<String> = specs
        .iter()
        .flat_map(|s| s.producers.iter().map(|p| p.name.clone()))
        .collect();
    let mut keys = Vec::new();
    if issue_keys {
        for p in producers {
            if app.producer_keys.has(&p) {
                continue;
            }
            match blocking(|| app.producer_keys.issue(&p)) {
                Ok(secret) => keys.push(IssuedKey { producer: p, secret }),
                Err(e) => {
                    revoke(app, &keys);
                    return Err(api(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{e:#}")));
                }
            }
        }
    }
    match apply_contracts(app, specs).await {
        Ok(applied) => Ok((applied, keys)),
        Err(e) => {
            revoke(app, &keys);
            Err(e)
        }
    }
}

fn revoke(app: &App, keys: &[IssuedKey]) {
    for k in keys {
        if let Err(e) = blocking(|| app.producer_keys.revoke(&k.producer)) {
            tracing::error!(producer = %k.producer, error = %e, "taking back a key after a failed apply");
        }
    }
}

async fn apply_contracts(app: &Arc<App>, specs: Vec<tarn_core::DatasetSpec>) -> Result<Vec<AppliedStep>, ApiError> {
    let mut applied = Vec::new();
    for spec in specs {
        let name = spec.name.clone();
        let new_major = app.catalog.get(&name).is_some_and(|old| spec.major == old.major + 1);
        let a = if new_major {
            // On its own task: a client that goes away does not stop the move halfway.
            let app2 = app.clone();
            app.run_background(async move {
                let running = crate::major::Running {
                    curate: Some(&app2.curate_pause),
                    query: Some(&app2.query),
                };
                crate::major::start(&app2.catalog, app2.lake(), &app2.tiers, spec, running).await
            })
            .await
            .map_err(|e| api(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
            .map_err(|e| api(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{e:#}")))?
        } else {
            blocking(|| app.catalog.evolve(spec)).map_err(crate::http::catalog_error)?
        };
        let Some(version) = a.version.clone() else {
            continue;
        };
        if a.created() || a.new_major {
            let lake = app.lake().clone();
            let spec = a.spec.clone();
            app.run_background(async move { lake.create_table(&spec).await })
                .await
                .map_err(|e| api(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
                .map_err(|e| {
                    api(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("{name}: the contract is applied but creating its table failed (it is created at the first event): {e}"),
                    )
                })?;
        }
        let mut columns_added = 0;
        if !a.created() && !a.new_major {
            let lake = app.lake().clone();
            let spec = a.spec.clone();
            columns_added = app
                .run_background(async move { lake.add_columns(&spec).await })
                .await
                .map_err(|e| api(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
                .map_err(|e| {
                    api(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("{name}: the contract is applied but adding its columns to the table failed (they are added at the next append): {e}"),
                    )
                })?;
        }
        app.ensure_delivery(&name)
            .map_err(|e| api(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{e:#}")))?;
        tracing::info!(dataset = %name, version, columns_added, "contract applied");
        applied.push(AppliedStep {
            dataset: name,
            action: if a.created() {
                "created"
            } else if a.new_major {
                "new_major"
            } else {
                "changed"
            },
            version: Some(version),
            columns_added,
        });
    }
    if let Some(r) = &app.rollups
        && let Err(e) = r.refresh()
    {
        tracing::error!(error = %e, "rollups after an apply");
    }
    Ok(applied)
}

/// `GET /v1/datasets/{name}/versions`: every kept contract, oldest first.
pub async fn versions(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> Result<Response, ApiError> {
    let v = blocking(|| app.catalog.versions(&name)).map_err(crate::http::catalog_error)?;
    if v.is_empty() {
        return Err(api(
            StatusCode::NOT_FOUND,
            "unknown_dataset",
            format!("no dataset named {name:?}"),
        ));
    }
    let list: Vec<_> = v
        .iter()
        .map(|v| json!({"version": v.label(), "applied_at": v.applied_at, "changes": v.changes}))
        .collect();
    Ok(axum::Json(json!({"dataset": name, "versions": list})).into_response())
}

/// `GET /v1/datasets/{name}/versions/{major.minor}`: one kept contract.
pub async fn version(
    State(app): State<Arc<App>>,
    UrlPath((name, label)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let v = blocking(|| app.catalog.versions(&name)).map_err(crate::http::catalog_error)?;
    match v.into_iter().find(|v| v.label() == label) {
        Some(v) => Ok(axum::Json(v).into_response()),
        None => Err(api(
            StatusCode::NOT_FOUND,
            "unknown_version",
            format!("dataset {name:?} has no version {label:?}"),
        )),
    }
}

// ---- the CLI ----

#[derive(clap::Args, Debug)]
pub struct DescriptorArgs {
    /// The folder of descriptors (*.yaml, *.yml), one dataset per file named after it.
    pub dir: PathBuf,
    /// The server.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
    /// Naming norms (YAML: `names` pattern, `require_owner`, `require_description`).
    #[arg(long)]
    pub norms: Option<PathBuf>,
    /// Print the server's JSON answer.
    #[arg(long)]
    pub json: bool,
    /// A `*` read key's secret, when the server has a key file (apply needs one).
    #[arg(long, env = "TARN_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub d: DescriptorArgs,
    /// Check without a server: everything but breaking changes against what runs.
    #[arg(long)]
    pub offline: bool,
    /// Treat warnings as errors.
    #[arg(long)]
    pub strict: bool,
}

/// Exit codes of `tarn validate|plan|apply`, for a user's own CI.
pub mod exit {
    /// Valid; nothing to change (plan); applied (apply).
    pub const OK: u8 = 0;
    /// Descriptors with errors, or refused changes: nothing was applied.
    pub const FINDINGS: u8 = 1;
    /// Could not run: unreadable folder or norms, server unreachable, server error.
    pub const FAILED: u8 = 2;
    /// `tarn plan`: valid, with changes to apply.
    pub const CHANGES: u8 = 3;
}

fn body_of(d: &DescriptorArgs) -> Result<DescriptorsBody> {
    let files = tarn_catalog::read_descriptors(&d.dir).with_context(|| format!("reading {}", d.dir.display()))?;
    if files.is_empty() {
        bail!("{} holds no descriptors (*.yaml, *.yml)", d.dir.display());
    }
    let norms = match &d.norms {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading the norms {}", p.display()))?),
        None => None,
    };
    Ok(DescriptorsBody {
        descriptors: files
            .into_iter()
            .map(|(path, text)| DescriptorIn {
                file: display_name(&d.dir, &path),
                text,
            })
            .collect(),
        norms,
    })
}

fn display_name(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).display().to_string()
}

async fn post(d: &DescriptorArgs, what: &str, body: &DescriptorsBody) -> Result<(StatusCode, serde_json::Value)> {
    let url = format!("{}/v1/catalog/{what}", d.server.trim_end_matches('/'));
    let mut req = reqwest::Client::new().post(&url).json(body);
    if let Some(k) = &d.key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.with_context(|| {
        format!("cannot reach tarn at {url}; is `tarn serve` running? (`tarn validate --offline` needs no server)")
    })?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let v: serde_json::Value = resp.json().await.context("reading the answer")?;
    Ok((status, v))
}

fn print_findings(v: &serde_json::Value) {
    for f in v["findings"].as_array().cloned().unwrap_or_default() {
        let ds = f["dataset"].as_str().map(|d| format!("{d}: ")).unwrap_or_default();
        println!(
            "{}: {}[{}] {ds}{}",
            f["file"].as_str().unwrap_or("?"),
            f["severity"].as_str().unwrap_or("?"),
            f["rule"].as_str().unwrap_or("?"),
            f["message"].as_str().unwrap_or("")
        );
    }
}

/// `tarn validate DIR`.
pub async fn run_validate(a: ValidateArgs) -> Result<u8> {
    let body = body_of(&a.d)?;
    let v = if a.offline {
        let (sources, norms) = check_body(&body).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        report_json(&validate(&sources, &|_| None, &norms))
    } else {
        let (status, v) = post(&a.d, "validate", &body).await?;
        if !status.is_success() {
            bail!(
                "{} (HTTP {status})",
                v["error"]["message"].as_str().unwrap_or("unknown error")
            );
        }
        v
    };
    if a.d.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_findings(&v);
    }
    let (errors, warnings) = (v["errors"].as_u64().unwrap_or(0), v["warnings"].as_u64().unwrap_or(0));
    if !a.d.json {
        println!(
            "{} descriptor(s): {errors} error(s), {warnings} warning(s)",
            body.descriptors.len()
        );
    }
    Ok(if errors > 0 || (a.strict && warnings > 0) {
        exit::FINDINGS
    } else {
        exit::OK
    })
}

/// `tarn plan DIR`.
pub async fn run_plan(d: DescriptorArgs) -> Result<u8> {
    let body = body_of(&d)?;
    let (status, v) = post(&d, "plan", &body).await?;
    if !status.is_success() {
        bail!(
            "{} (HTTP {status})",
            v["error"]["message"].as_str().unwrap_or("unknown error")
        );
    }
    if d.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_findings(&v);
    }
    let plan: Plan = plan_of(&v)?;
    if !d.json {
        for s in &plan.steps {
            println!("{s}");
        }
        println!(
            "{} to change, {} unchanged, {} running but not in {} (apply leaves them alone)",
            plan.steps.len(),
            plan.unchanged.len(),
            plan.untracked.len(),
            d.dir.display()
        );
    }
    Ok(
        if v["errors"].as_u64().unwrap_or(0) > 0 || plan.refused().next().is_some() {
            exit::FINDINGS
        } else if plan.is_empty() {
            exit::OK
        } else {
            exit::CHANGES
        },
    )
}

fn plan_of(v: &serde_json::Value) -> Result<Plan> {
    serde_json::from_value(v["plan"].clone()).context("reading the plan")
}

/// `tarn apply DIR`.
pub async fn run_apply(d: DescriptorArgs) -> Result<u8> {
    let body = body_of(&d)?;
    let (status, v) = post(&d, "apply", &body).await?;
    if d.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        if !d.json {
            print_findings(&v);
            eprintln!("error: {}", v["error"]["message"].as_str().unwrap_or("refused"));
        }
        return Ok(exit::FINDINGS);
    }
    if !status.is_success() {
        bail!(
            "{} (HTTP {status})",
            v["error"]["message"].as_str().unwrap_or("unknown error")
        );
    }
    if !d.json {
        for s in v["applied"].as_array().cloned().unwrap_or_default() {
            println!(
                "{} {} -> version {} ({} column(s) added to the table)",
                s["action"].as_str().unwrap_or("?"),
                s["dataset"].as_str().unwrap_or("?"),
                s["version"].as_str().unwrap_or("?"),
                s["columns_added"]
            );
        }
        for k in v["keys"].as_array().cloned().unwrap_or_default() {
            println!(
                "write key for producer {} (shown once; send it as `Authorization: Bearer <key>`): {}",
                k["producer"].as_str().unwrap_or("?"),
                k["secret"].as_str().unwrap_or("?")
            );
        }
        let n = |k: &str| v[k].as_array().map_or(0, Vec::len);
        println!(
            "{} applied, {} unchanged, {} running but not in {} (left alone)",
            n("applied"),
            n("unchanged"),
            n("untracked"),
            d.dir.display()
        );
    }
    Ok(exit::OK)
}

// ---- registering data read in place ----

/// The body of `POST /v1/catalog/register`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub name: String,
    /// The absolute path of a folder of Parquet files or of a Delta table.
    pub location: String,
    /// `parquet` or `delta`; absent: Delta when the folder holds `_delta_log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<tarn_core::ExternalFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// Registers (or refreshes) data read in place: reads its schema, partitions, files and bytes
/// and keeps them as a contract version. The data's own schema rules: a column the data lost
/// or retyped starts the next major version instead of being refused.
pub async fn register_handler(
    State(app): State<Arc<App>>,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<RegisterBody>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    // tarn's own tables are read under their datasets' rules, never through another name.
    if let (Ok(loc), Some(data)) = (
        std::path::Path::new(&body.location).canonicalize(),
        app.catalog_dir.parent().and_then(|d| d.canonicalize().ok()),
    ) && loc.starts_with(&data)
    {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "inside_data_dir",
            format!(
                "{} is inside tarn's data directory; register data that tarn does not keep",
                loc.display()
            ),
        ));
    }
    let _one = app.apply_lock.lock().await;
    tarn_core::name::check_dataset(&body.name).map_err(|e| api(StatusCode::BAD_REQUEST, "bad_name", e.to_string()))?;
    let existing = app.catalog.get(&body.name);
    if existing.as_ref().is_some_and(|s| s.external.is_none()) {
        return Err(api(
            StatusCode::CONFLICT,
            "exists",
            format!(
                "{} is a dataset tarn writes; register the data under another name",
                body.name
            ),
        ));
    }
    let found = tarn_query::external::inspect(std::path::Path::new(&body.location), body.format).await?;
    let mut spec = tarn_core::DatasetSpec::from_yaml(&format!(
        "name: {}\nfields: [{{ name: event_id, type: string }}]\nevent_id: event_id\n",
        body.name
    ))
    .map_err(|e| api(StatusCode::BAD_REQUEST, "bad_name", e.to_string()))?;
    spec.event_id = String::new();
    spec.fields = found.fields.clone();
    spec.description = body
        .description
        .clone()
        .or_else(|| existing.as_ref().and_then(|e| e.description.clone()));
    spec.owner = body
        .owner
        .clone()
        .or_else(|| existing.as_ref().and_then(|e| e.owner.clone()));
    spec.domain = body
        .domain
        .clone()
        .or_else(|| existing.as_ref().and_then(|e| e.domain.clone()));
    spec.external = Some(tarn_core::External {
        format: found.format,
        location: found.location.clone(),
        partitions: found.partitions.clone(),
    });
    if let Some(old) = &existing {
        spec.major = old.major;
        if matches!(
            tarn_core::evolution::check(old, &spec),
            Err(tarn_core::evolution::Refusal::Breaking { .. })
        ) {
            spec.major = old.major + 1;
        }
    }
    let applied = blocking(|| app.catalog.evolve_major(spec)).map_err(crate::http::catalog_error)?;
    app.query.forget(&body.name).await;
    tracing::info!(dataset = %body.name, location = %found.location, files = found.files, "registered data read in place");
    Ok(axum::Json(json!({
        "dataset": body.name,
        "format": found.format.as_str(),
        "location": found.location,
        "columns": found.fields.len(),
        "partitions": found.partitions,
        "files": found.files,
        "bytes": found.bytes,
        "version": applied.version,
        "changes": applied.changes,
    }))
    .into_response())
}

#[derive(clap::Args, Debug)]
pub struct RegisterArgs {
    /// The dataset name to query it by.
    pub name: String,
    /// A folder of Parquet files (Hive-style `key=value` folders become partition columns) or
    /// a Delta table.
    pub path: PathBuf,
    /// `parquet` or `delta` (default: Delta when the folder holds `_delta_log`).
    #[arg(long)]
    pub format: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    #[arg(long)]
    pub owner: Option<String>,
    #[arg(long)]
    pub domain: Option<String>,
    /// The server.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
    /// A `*` read key's secret, when the server has a key file.
    #[arg(long, env = "TARN_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

/// `tarn register NAME PATH`.
pub async fn run_register(a: RegisterArgs) -> Result<()> {
    let format = match a.format.as_deref() {
        None => None,
        Some("parquet") => Some(tarn_core::ExternalFormat::Parquet),
        Some("delta") => Some(tarn_core::ExternalFormat::Delta),
        Some(f) => bail!("--format {f:?}: parquet or delta"),
    };
    let location = std::path::absolute(&a.path).with_context(|| format!("{}", a.path.display()))?;
    let body = RegisterBody {
        name: a.name,
        location: location.to_string_lossy().into_owned(),
        format,
        description: a.description,
        owner: a.owner,
        domain: a.domain,
    };
    let url = format!("{}/v1/catalog/register", a.server.trim_end_matches('/'));
    let mut req = reqwest::Client::new().post(&url).json(&body);
    if let Some(k) = &a.key {
        req = req.bearer_auth(k);
    }
    let v = crate::admin::json_answer(req, &url).await?;
    let parts = v["partitions"]
        .as_array()
        .map(|p| p.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    println!(
        "registered {} ({} at {}): {} columns, partitions [{parts}], {} files, {} bytes; version {}",
        v["dataset"].as_str().unwrap_or("?"),
        v["format"].as_str().unwrap_or("?"),
        v["location"].as_str().unwrap_or("?"),
        v["columns"],
        v["files"],
        v["bytes"],
        v["version"].as_str().unwrap_or("unchanged")
    );
    Ok(())
}

/// Runs a call on the metadata store (a PostgreSQL round trip, or a synced file write) from an
/// async handler without holding up the other tasks of this worker thread: the runtime moves
/// them elsewhere while it runs (the server's runtime is multi-threaded).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}
