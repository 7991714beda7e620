//! The rollup API and `tarn rollup`:
//!
//! - `GET /v1/rollups`: every rollup's status (groups held, rows applied, sequences, halts).
//! - `GET /v1/rollups/{name}?tenant=T&from=F&to=T&grain=G&group_by=D&filter=D:V&top=N
//!   &order_by=M&metrics=M1,M2&quantiles=0.5,0.99`: buckets of one tenant, from memory.
//!   `from` and `to` are days (`to` inclusive) or RFC 3339 times (`to` exclusive); `to`
//!   defaults to the end of today. `filter` may repeat.
//! - `POST /v1/rollups/{name}/rebuild` `{"from": D, "to": D}`: NDJSON progress lines, the
//!   report, then `done` (or `error`).
//!
//! With a key file (`--read-keys`), reads need a bearer key and a tenant key sees only its
//! tenant.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tarn_core::Grain;
use tarn_query::rollup::{RebuildProgress, RebuildReport, RollupQuery};

use crate::http::{ApiError, api};
use crate::keys::Scope;
use crate::serve::App;

/// Parses `from` / `to`: a day (its start; for `to`, the end of it) or an RFC 3339 time.
fn parse_time(text: &str, end_of_day: bool) -> Option<i64> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let start = d.and_hms_opt(0, 0, 0)?.and_utc().timestamp();
        return Some(if end_of_day { start + 86_400 } else { start });
    }
    tarn_core::contract::parse_rfc3339_micros(text).map(|us| us.div_euclid(1_000_000))
}

fn bad(msg: impl Into<String>) -> ApiError {
    api(StatusCode::BAD_REQUEST, "bad_request", msg)
}

/// The scope of a request, or the error to answer.
fn scope(app: &App, headers: &HeaderMap) -> Result<Scope, ApiError> {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    app.read_keys.scope(auth).ok_or_else(|| {
        api(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server needs a read key: Authorization: Bearer <key>",
        )
    })
}

pub async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Scope::Tenant { .. } = scope(&app, &headers)? {
        return Err(api(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a tenant's read key may read rollups, not list their status",
        ));
    }
    let status = served(&app)?.status()?;
    Ok(axum::Json(json!({ "rollups": status })).into_response())
}

pub async fn read(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let scope = scope(&app, &headers)?;
    let raw = raw.unwrap_or_default();
    let (mut tenant, mut from, mut to, mut grain, mut group_by, mut top, mut order_by, mut metrics) =
        (None, None, None, None, None, None, None, None);
    let mut filters = Vec::new();
    let mut quantiles = vec![0.5, 0.9, 0.99];
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        let v = v.into_owned();
        match k.as_ref() {
            "tenant" => tenant = Some(v),
            "from" => {
                from = Some(
                    parse_time(&v, false).ok_or_else(|| bad(format!("from {v:?} is not a day or an RFC 3339 time")))?,
                )
            }
            "to" => {
                to = Some(
                    parse_time(&v, true).ok_or_else(|| bad(format!("to {v:?} is not a day or an RFC 3339 time")))?,
                )
            }
            "grain" => {
                grain = Some(Grain::parse(&v).ok_or_else(|| bad(format!("grain {v:?} is not minute, hour or day")))?)
            }
            "group_by" => group_by = Some(v),
            "filter" => {
                let (d, val) = v
                    .split_once(':')
                    .ok_or_else(|| bad(format!("filter {v:?} is not dimension:value")))?;
                filters.push((d.to_string(), val.to_string()));
            }
            "top" => {
                let n: usize = v.parse().map_err(|_| bad(format!("top {v:?} is not a number")))?;
                if n == 0 || n > 10_000 {
                    return Err(bad(format!("top is {n}; it must be from 1 to 10000")));
                }
                top = Some(n);
            }
            "order_by" => order_by = Some(v),
            "metrics" => metrics = Some(v.split(',').map(str::to_string).collect::<Vec<_>>()),
            "quantiles" => {
                quantiles = v
                    .split(',')
                    .map(|q| {
                        q.parse::<f64>()
                            .map_err(|_| bad(format!("quantile {q:?} is not a number")))
                    })
                    .collect::<Result<_, _>>()?;
                if quantiles.len() > 16 {
                    return Err(bad("at most 16 quantiles"));
                }
            }
            other => return Err(bad(format!("unknown parameter {other:?}"))),
        }
    }
    let tenant = match (&scope, tenant) {
        (Scope::Tenant { tenant: mine, .. }, Some(t)) if &t != mine => {
            return Err(api(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this key reads tenant {mine:?} only, not {t:?}"),
            ));
        }
        (Scope::Tenant { tenant: mine, .. }, _) => mine.clone(),
        (_, Some(t)) => t,
        (_, None) => return Err(bad("tenant is required")),
    };
    let from = from.ok_or_else(|| bad("from is required (a day, YYYY-MM-DD, or an RFC 3339 time)"))?;
    let to = match to {
        Some(t) => t,
        None => Grain::Day.bucket_of(app.clock().now_micros().div_euclid(1_000_000)) + 86_400,
    };
    let q = RollupQuery {
        tenant,
        from_secs: from,
        to_secs: to,
        grain: grain.unwrap_or(Grain::Day),
        group_by,
        filters,
        top,
        order_by,
        metrics,
        quantiles,
    };
    let mut ans = serde_json::to_value(served(&app)?.query(&name, &q)?).unwrap_or_default();
    ans["took_us"] = json!(started.elapsed().as_micros() as u64);
    Ok(axum::Json(ans).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RebuildRequest {
    from: String,
    to: String,
}

/// A line of the rebuild answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildEvent {
    Progress(RebuildProgress),
    Report(RebuildReport),
    Error { message: String },
    Done,
}

pub async fn rebuild(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    if let Scope::Tenant { .. } = scope(&app, &headers)? {
        return Err(api(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a tenant's read key cannot rebuild a rollup",
        ));
    }
    let req: RebuildRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "expected {{\"from\": \"YYYY-MM-DD\", \"to\": \"YYYY-MM-DD\"}}: {e}"
        ))
    })?;
    served(&app)?.check_exists(&name)?;
    // One progress line a day, and a rebuild covers at most 3,660 days.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<RebuildEvent>();
    let rollups = served(&app)?.clone();
    let lake = app.lake().clone();
    app.spawn_background(async move {
        let progress_tx = tx.clone();
        let mut progress = move |p: RebuildProgress| {
            let _ = progress_tx.send(RebuildEvent::Progress(p));
        };
        let out = rollups.rebuild(&name, &req.from, &req.to, &lake, &mut progress).await;
        let last = match out {
            Ok(r) => {
                let _ = tx.send(RebuildEvent::Report(r));
                RebuildEvent::Done
            }
            Err(e) => RebuildEvent::Error { message: e.to_string() },
        };
        let _ = tx.send(last);
    });
    Ok(crate::http::ndjson_lines(rx))
}

#[derive(Args, Debug)]
pub struct RollupArgs {
    #[command(subcommand)]
    pub command: RollupCommand,
    /// The server to ask.
    #[arg(long, global = true, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
    /// A read key (needed when the server has a key file).
    #[arg(long, global = true, env = "TARN_READ_KEY")]
    pub key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum RollupCommand {
    /// Print every rollup's status.
    Status,
    /// Recompute a range of days of a rollup from the curated table.
    Rebuild {
        name: String,
        /// First day (YYYY-MM-DD).
        #[arg(long)]
        from: String,
        /// Last day (YYYY-MM-DD), included.
        #[arg(long)]
        to: String,
    },
}

pub async fn run(a: RollupArgs) -> Result<()> {
    let base = a.server.trim_end_matches('/').to_string();
    let client = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| match &a.key {
        Some(k) => r.bearer_auth(k),
        None => r,
    };
    let unreachable = |url: &str| format!("cannot reach tarn at {url}; is `tarn serve` running?");
    match a.command {
        RollupCommand::Status => {
            let url = format!("{base}/v1/rollups");
            let body = crate::admin::json_answer(auth(client.get(&url)), &url).await?;
            println!("{}", serde_json::to_string_pretty(&body["rollups"])?);
        }
        RollupCommand::Rebuild { name, from, to } => {
            let url = format!("{base}/v1/rollups/{name}/rebuild");
            let resp = auth(client.post(&url))
                .json(&json!({"from": from, "to": to}))
                .send()
                .await
                .with_context(|| unreachable(&url))?;
            let status = resp.status();
            if !status.is_success() {
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                bail!(
                    "{} (HTTP {status})",
                    body["error"]["message"].as_str().unwrap_or("unknown error")
                );
            }
            let mut stream = resp.bytes_stream();
            let mut pending: Vec<u8> = Vec::new();
            let mut finished = false;
            while let Some(chunk) = stream.next().await {
                pending.extend_from_slice(&chunk.context("reading the answer")?);
                while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    match serde_json::from_slice::<RebuildEvent>(&line).context("decoding a progress line")? {
                        RebuildEvent::Progress(p) => eprint!(
                            "\r{name} {} {}/{} days, {} rows (last {})",
                            crate::admin::bar(p.days_done as u64, p.days_total as u64),
                            p.days_done,
                            p.days_total,
                            p.rows,
                            p.day
                        ),
                        RebuildEvent::Report(r) => {
                            eprintln!();
                            println!(
                                "{}: rebuilt {} days ({} to {}) from {} rows in {:.1} s",
                                r.rollup,
                                r.days,
                                r.from,
                                r.to,
                                r.rows,
                                r.took_ms as f64 / 1000.0
                            );
                        }
                        RebuildEvent::Error { message } => {
                            eprintln!();
                            bail!("{message}");
                        }
                        RebuildEvent::Done => finished = true,
                    }
                }
            }
            if !finished {
                bail!(
                    "the server stopped answering before the rebuild finished; run it again (a rebuild can be repeated)"
                );
            }
        }
    }
    Ok(())
}

/// The rollups of this process: kept by query processes only.
fn served(app: &App) -> Result<&tarn_query::rollup::Rollups, ApiError> {
    app.rollups.as_ref().ok_or_else(|| {
        crate::http::api(
            StatusCode::NOT_FOUND,
            "not_found",
            "this process keeps no rollups: they are kept by processes with the query role",
        )
    })
}
