//! The `tarn` binary: `tarn serve` runs every role on one machine; `tarn sql` asks a running
//! server; `tarn bench` measures ingestion end to end.

mod admin;
mod alloc;
mod bench;
mod bench_compaction;
mod bench_rollups;
mod bench_scale;
mod bench_stream;
mod catalog_api;
mod cpus;
mod http;
mod keys;
mod maintenance;
mod major;
mod pg;
mod results;
mod rollup_api;
mod serve;
mod sql;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Log filter when `TARN_LOG` is unset: tarn at info, the engines' per-scan chatter off.
const DEFAULT_LOG: &str = "info,buoyant_kernel=warn,delta_kernel=warn,deltalake_core=warn,datafusion=warn";

/// The default HTTP listener: loopback only, on a port no common service uses.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7411";

#[derive(Parser)]
#[command(name = "tarn", version, about = "An event data platform in one binary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run tarn: HTTP ingestion, the stream, delivery, curate and SQL.
    Serve(Box<serve::ServeArgs>),
    /// Run a SQL statement against a running server.
    Sql(sql::SqlArgs),
    /// Generate ad-auction events, post them to a fresh server and report rates.
    Bench(bench::BenchArgs),
    /// Compact small files into target-sized ones on a running server.
    Compact(admin::CompactArgs),
    /// Delete data files no table references any more, past the retention window.
    Vacuum(admin::VacuumArgs),
    /// Print the storage and cost report of a running server.
    Storage(admin::StorageArgs),
    /// Apply lifecycle rules now: move old days to colder tiers, expire the oldest.
    Lifecycle(admin::LifecycleArgs),
    /// Bring an archived (or infrequent) day back to the standard tier for a while.
    Restore(admin::RestoreArgs),
    /// Rollups on a running server: status, rebuild.
    Rollup(rollup_api::RollupArgs),
    /// Read keys for the rollup API.
    Keys(KeysArgs),
    /// The catalog of a running server: `tarn catalog search TEXT`.
    Catalog(CatalogArgs),
    /// Check a folder of descriptors: contracts, naming norms, personal data, and breaking
    /// changes against the running server. Exit 0: valid; 1: errors; 2: could not check.
    Validate(catalog_api::ValidateArgs),
    /// Show what `tarn apply` would change. Exit 0: nothing; 3: changes; 1: errors or refused
    /// changes; 2: could not plan.
    Plan(catalog_api::DescriptorArgs),
    /// Make the running server match a folder of descriptors (datasets, columns, versions,
    /// producer keys); idempotent. Exit 0: applied; 1: refused, nothing applied; 2: failed.
    Apply(catalog_api::DescriptorArgs),
    /// Make an existing folder of Parquet files or a Delta table queryable in place: reads its
    /// schema and partitions into the catalog (again to refresh them).
    Register(catalog_api::RegisterArgs),
}

#[derive(clap::Args, Debug)]
struct CatalogArgs {
    #[command(subcommand)]
    command: CatalogCommand,
}

#[derive(Subcommand, Debug)]
enum CatalogCommand {
    /// Find datasets by the words of their names, tags, domain, owner, columns and descriptions.
    Search(admin::CatalogSearchArgs),
}

#[derive(clap::Args, Debug)]
struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Make a read key: prints its secret and the entry for the `--read-keys` file.
    New {
        /// A label for the key.
        #[arg(long)]
        name: String,
        /// The tenant the key reads, or `*` for every tenant.
        #[arg(long)]
        tenant: String,
    },
}

fn main() -> std::process::ExitCode {
    // First, while this is the only thread.
    alloc::configure();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TARN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The descriptor commands have exit codes of their own, for a user's CI.
    if matches!(cli.command, Command::Validate(_) | Command::Plan(_) | Command::Apply(_)) {
        let res = rt.block_on(async move {
            match cli.command {
                Command::Validate(a) => catalog_api::run_validate(a).await,
                Command::Plan(a) => catalog_api::run_plan(a).await,
                Command::Apply(a) => catalog_api::run_apply(a).await,
                _ => Ok(catalog_api::exit::FAILED),
            }
        });
        return match res {
            Ok(code) => std::process::ExitCode::from(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(catalog_api::exit::FAILED)
            }
        };
    }
    let res = rt.block_on(async move {
        match cli.command {
            Command::Validate(_) | Command::Plan(_) | Command::Apply(_) => Ok(()),
            Command::Serve(a) => serve::run(*a).await,
            Command::Sql(a) => sql::run(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Compact(a) => admin::run_compact(a).await,
            Command::Vacuum(a) => admin::run_vacuum(a).await,
            Command::Storage(a) => admin::run_storage(a).await,
            Command::Lifecycle(a) => admin::run_lifecycle(a).await,
            Command::Restore(a) => admin::run_restore(a).await,
            Command::Rollup(a) => rollup_api::run(a).await,
            Command::Register(a) => catalog_api::run_register(a).await,
            Command::Catalog(a) => match a.command {
                CatalogCommand::Search(s) => admin::run_catalog_search(s).await,
            },
            Command::Keys(a) => match a.command {
                KeysCommand::New { name, tenant } => keys::new_key(&name, &tenant).map(|t| print!("{t}")),
            },
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn default_data_dir() -> PathBuf {
    PathBuf::from("tarn-data")
}
