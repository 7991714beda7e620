//! What PostgreSQL clients (`psql`'s `\d`, BI tools on connect) look up in `pg_catalog`. One
//! provider lives as long as the engine, so the OIDs a client reads in one statement name the
//! same tables in its next (each statement runs in a session of its own). Tables and columns
//! come from the catalog's contracts, without opening any table.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion_pg_catalog::pg_catalog::catalog_info::CatalogInfo;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::pg_catalog::{PgCatalogSchemaProvider, PgCatalogStaticTables};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::datafusion::catalog::SchemaProvider;
use deltalake::datafusion::datasource::TableType;
use deltalake::datafusion::error::DataFusionError;
use tarn_catalog::Catalog;
use tarn_core::{DatasetSpec, FieldType};
use tarn_lake::Lake;

use crate::history::History;

/// The catalog every table is registered in, and its schemas.
const CATALOG: &str = "datafusion";

#[derive(Clone)]
struct Tables {
    catalog: Arc<Catalog>,
    lake: Lake,
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tables")
    }
}

impl Tables {
    /// The datasets a query can name, sorted.
    fn public(&self) -> Vec<Arc<DatasetSpec>> {
        self.catalog
            .list()
            .into_iter()
            .filter(|s| s.external.is_some() || self.lake.table_exists(&s.name))
            .collect()
    }
}

/// A dataset's columns as a query sees them, from its contract.
fn schema_of(spec: &DatasetSpec) -> SchemaRef {
    let ty = |t: FieldType| match t {
        FieldType::String | FieldType::Json => DataType::Utf8,
        FieldType::Int64 => DataType::Int64,
        FieldType::Float64 => DataType::Float64,
        FieldType::Bool => DataType::Boolean,
        FieldType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
    };
    let mut fields: Vec<Field> = spec
        .fields
        .iter()
        .map(|f| Field::new(&f.name, ty(f.ty), !f.required))
        .collect();
    if spec.external.is_none() {
        fields.push(Field::new(
            tarn_core::contract::RECEIVED_AT,
            ty(FieldType::Timestamp),
            false,
        ));
        fields.push(Field::new(tarn_core::contract::DAY, DataType::Utf8, false));
    }
    Arc::new(Schema::new(fields))
}

#[async_trait]
impl CatalogInfo for Tables {
    async fn catalog_names(&self) -> Result<Vec<String>, DataFusionError> {
        Ok(vec![CATALOG.to_string()])
    }

    async fn schema_names(&self, catalog: &str) -> Result<Option<Vec<String>>, DataFusionError> {
        Ok((catalog == CATALOG).then(|| vec!["public".to_string(), "system".to_string()]))
    }

    async fn table_names(&self, catalog: &str, schema: &str) -> Result<Option<Vec<String>>, DataFusionError> {
        if catalog != CATALOG {
            return Ok(None);
        }
        Ok(match schema {
            "public" => Some(self.public().iter().map(|s| s.name.clone()).collect()),
            "system" => Some(vec!["queries".to_string()]),
            _ => None,
        })
    }

    async fn table_schema(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> Result<Option<SchemaRef>, DataFusionError> {
        if catalog != CATALOG {
            return Ok(None);
        }
        Ok(match schema {
            "public" => self.catalog.get(table).map(|s| schema_of(&s)),
            "system" if table == "queries" => Some(History::schema()),
            _ => None,
        })
    }

    async fn table_type(&self, catalog: &str, schema: &str, table: &str) -> Result<Option<TableType>, DataFusionError> {
        Ok(self
            .table_schema(catalog, schema, table)
            .await?
            .map(|_| TableType::Base))
    }
}

/// The engine's `pg_catalog` schema.
pub(crate) fn provider(catalog: Arc<Catalog>, lake: Lake) -> Result<Arc<dyn SchemaProvider>, DataFusionError> {
    let statics = Arc::new(PgCatalogStaticTables::try_new()?);
    Ok(Arc::new(PgCatalogSchemaProvider::try_new(
        Tables { catalog, lake },
        statics,
        EmptyContextProvider,
    )?))
}
