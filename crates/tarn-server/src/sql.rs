//! `tarn sql`: sends a statement to a running server and prints the result as a table (or
//! JSON), with the scan statistics on stderr.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct SqlArgs {
    /// The SQL statement.
    pub sql: String,
    /// The server to ask.
    #[arg(long, env = "TARN_SERVER", default_value = concat!("http://", "127.0.0.1:7411"))]
    pub server: String,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Most rows to return.
    #[arg(long, default_value_t = 10_000)]
    pub row_limit: usize,
    /// Refuse the query if its scan would read more than this many bytes.
    #[arg(long)]
    pub bytes_max: Option<u64>,
    /// Print what the query would read (files, bytes, cost) without running it.
    #[arg(long)]
    pub dry_run: bool,
    /// A `*` read key's secret: the query runs under its name and byte budget.
    #[arg(long, env = "TARN_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

pub async fn run(a: SqlArgs) -> Result<()> {
    let url = format!("{}/v1/query", a.server.trim_end_matches('/'));
    let mut req = reqwest::Client::new().post(&url).json(
        &serde_json::json!({"sql": a.sql, "row_limit": a.row_limit, "bytes_max": a.bytes_max, "dry_run": a.dry_run}),
    );
    if let Some(k) = &a.key {
        req = req.bearer_auth(k);
    }
    let body = crate::admin::json_answer(req, &url).await?;
    if a.dry_run {
        let e = &body["estimate"];
        println!(
            "would read {} files, {} bytes (about ${:.6}){}",
            e["files"],
            e["bytes"],
            e["cost_usd"].as_f64().unwrap_or(0.0),
            match body["within_budget"].as_bool() {
                Some(false) => format!("; over the budget of {} bytes", body["bytes_max"]),
                _ => String::new(),
            }
        );
        return Ok(());
    }
    let result: tarn_query::QueryResult = serde_json::from_value(body).context("decoding the answer")?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&result)?),
        Format::Table => print!("{}", render_table(&result)),
    }
    let s = &result.stats;
    eprintln!(
        "{} rows{} in {:.1} ms; scanned {} rows, {} files, {} bytes (about ${:.6})",
        s.rows_returned,
        if result.truncated { " (output truncated)" } else { "" },
        s.duration_ms,
        s.rows_scanned,
        s.files_scanned,
        s.bytes_scanned,
        s.estimated_cost_usd
    );
    Ok(())
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "NULL".into(),
        other => other.to_string(),
    }
}

/// Renders rows as an aligned text table.
pub fn render_table(r: &tarn_query::QueryResult) -> String {
    let mut widths: Vec<usize> = r.columns.iter().map(|c| c.name.chars().count()).collect();
    let cells: Vec<Vec<String>> = r.rows.iter().map(|row| row.iter().map(cell).collect()).collect();
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |vals: Vec<&str>| -> String {
        let parts: Vec<String> = vals.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        format!("{}\n", parts.join(" | ").trim_end())
    };
    let mut out = line(r.columns.iter().map(|c| c.name.as_str()).collect());
    out.push_str(&format!(
        "{}\n",
        widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-")
    ));
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
