//! What PostgreSQL clients (`psql`'s `\d`, BI tools on connect) look up in `pg_catalog`. One
//! provider lives as long as the engine, so the OIDs a client reads in one statement name the
//! same tables in its next (each statement runs in a session of its own). Tables and columns
//! come from the catalog's contracts, without opening any table.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion_pg_catalog::pg_catalog::catalog_info::CatalogInfo;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::pg_catalog::{PgCatalogSchemaProvider, PgCatalogStaticTables};
use deltalake::arrow::array::{
    ArrayRef, AsArray as _, Int32Array, Int64Array, RecordBatch, StringArray, new_null_array,
};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};
use deltalake::datafusion::catalog::SchemaProvider;
use deltalake::datafusion::catalog::TableProvider;
use deltalake::datafusion::datasource::{MemTable, TableType};
use deltalake::datafusion::error::DataFusionError;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Query, SetExpr, Statement, TableFactor, Value, VisitMut,
    VisitorMut,
};
use deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use deltalake::datafusion::sql::sqlparser::parser::Parser;
use deltalake::datafusion::sql::sqlparser::tokenizer::Token;
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
    let tables = Tables { catalog, lake };
    Ok(Arc::new(PgCatalog {
        inner: Arc::new(PgCatalogSchemaProvider::try_new(
            tables.clone(),
            statics,
            EmptyContextProvider,
        )?),
        tables,
    }))
}

/// PostgreSQL's own catalog tables and their fixed OIDs, which clients name as
/// `'pg_class'::regclass` (JDBC's `getTables` joins `pg_description` on it).
const BUILTIN_OIDS: &[(&str, u32)] = &[
    ("pg_tablespace", 1213),
    ("pg_type", 1247),
    ("pg_attribute", 1249),
    ("pg_proc", 1255),
    ("pg_class", 1259),
    ("pg_authid", 1260),
    ("pg_database", 1262),
    ("pg_am", 2601),
    ("pg_attrdef", 2604),
    ("pg_constraint", 2606),
    ("pg_depend", 2608),
    ("pg_description", 2609),
    ("pg_index", 2610),
    ("pg_inherits", 2611),
    ("pg_namespace", 2615),
    ("pg_operator", 2617),
    ("pg_rewrite", 2618),
    ("pg_trigger", 2620),
    ("pg_extension", 3079),
    ("pg_collation", 3456),
];

/// Replaces `'<catalog>'::regclass` (or `::pg_catalog.regclass`) naming one of PostgreSQL's
/// own catalog tables with its fixed OID, before the compatibility layer would look it up
/// in `pg_class`, whose rows are tarn's tables only.
pub(crate) fn builtin_regclass(tokens: Vec<Token>) -> Vec<Token> {
    let significant = |i: usize| (i..tokens.len()).find(|&j| !matches!(tokens[j], Token::Whitespace(_)));
    let is_word = |i: Option<usize>, w: &str| {
        i.is_some_and(|i| matches!(&tokens[i], Token::Word(x) if x.value.eq_ignore_ascii_case(w)))
    };
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        if let Token::SingleQuotedString(name) = &tokens[i] {
            let table = name.strip_prefix("pg_catalog.").unwrap_or(name);
            let oid = BUILTIN_OIDS.iter().find(|(n, _)| *n == table).map(|(_, o)| *o);
            let colons = significant(i + 1).filter(|&j| tokens[j] == Token::DoubleColon);
            let mut ty = colons.and_then(|j| significant(j + 1));
            if is_word(ty, "pg_catalog")
                && let Some(dot) = ty
                    .and_then(|j| significant(j + 1))
                    .filter(|&j| tokens[j] == Token::Period)
            {
                ty = significant(dot + 1);
            }
            if let Some(oid) = oid
                && is_word(ty, "regclass")
            {
                out.push(Token::Number(oid.to_string(), false));
                i = ty.map_or(i, |t| t + 1);
                continue;
            }
        }
        out.push(tokens[i].clone());
        i += 1;
    }
    out
}

/// The table of dataset sizes behind `pg_table_size` (not one of PostgreSQL's).
const RELATION_SIZE: &str = "tarn_relation_size";

/// The OID of `pg_class` itself, the class of a table's (and its columns') descriptions.
const PG_CLASS_OID: i32 = 1259;

/// The compatibility layer's `pg_catalog` with what tarn adds to two of its tables:
/// `pg_class.reloptions` (NULL: no table of tarn's has storage options), which `psql`'s `\d+`
/// reads, and in `pg_description` the descriptions of datasets and their fields from their
/// contracts, which `\d+`, `\dt+` and BI tools show beside tables and columns.
#[derive(Debug)]
struct PgCatalog {
    inner: Arc<dyn SchemaProvider>,
    tables: Tables,
}

#[async_trait]
impl SchemaProvider for PgCatalog {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        if name.eq_ignore_ascii_case(RELATION_SIZE) {
            return Ok(Some(self.relation_sizes().await?));
        }
        let Some(table) = self.inner.table(name).await? else {
            return Ok(None);
        };
        Ok(Some(match name.to_ascii_lowercase().as_str() {
            "pg_class" => with_reloptions(table).await?,
            "pg_description" => self.with_descriptions(table).await?,
            _ => table,
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// Every row of a catalog table (they are small: one row per table, column or built-in).
async fn rows(table: Arc<dyn TableProvider>) -> Result<Vec<RecordBatch>, DataFusionError> {
    SessionContext::new().read_table(table)?.collect().await
}

/// A column of catalog rows, cast to `ty`.
fn column(batch: &RecordBatch, name: &str, ty: &DataType) -> Result<ArrayRef, DataFusionError> {
    let c = batch
        .column_by_name(name)
        .ok_or_else(|| DataFusionError::Internal(format!("pg_catalog has no column {name}")))?;
    Ok(cast(c, ty)?)
}

/// `pg_class` with a `reloptions` column of NULLs.
async fn with_reloptions(table: Arc<dyn TableProvider>) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    let ty = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    let mut fields: Vec<Field> = table.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("reloptions", ty.clone(), true));
    let schema = Arc::new(Schema::new(fields));
    let batches = rows(table)
        .await?
        .into_iter()
        .map(|b| {
            let mut columns = b.columns().to_vec();
            columns.push(new_null_array(&ty, b.num_rows()));
            RecordBatch::try_new(schema.clone(), columns)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
}

impl PgCatalog {
    /// `pg_description` with a row for each dataset and each field that has a description,
    /// under the OIDs `pg_class` and `pg_attribute` give them.
    async fn with_descriptions(
        &self,
        table: Arc<dyn TableProvider>,
    ) -> Result<Arc<dyn TableProvider>, DataFusionError> {
        let specs = self.tables.public();
        if !specs
            .iter()
            .any(|s| s.description.is_some() || s.fields.iter().any(|f| f.description.is_some()))
        {
            return Ok(table);
        }
        let schema = table.schema();
        let mut batches = rows(table).await?;
        let relations = self.public_relations().await?;
        let attributes: HashMap<(i32, String), i32> = self
            .catalog_rows("pg_attribute", ["attrelid", "attname", "attnum"])
            .await?
            .into_iter()
            .map(|(rel, name, num)| ((rel, name), num))
            .collect();
        let (mut objoid, mut objsubid, mut description) = (Vec::new(), Vec::new(), Vec::new());
        for spec in &specs {
            let Some(&oid) = relations.get(&spec.name) else {
                continue;
            };
            let described = spec.fields.iter().filter_map(|f| {
                let d = f.description.as_ref()?;
                Some((*attributes.get(&(oid, f.name.clone()))?, d))
            });
            for (sub, d) in spec.description.as_ref().map(|d| (0, d)).into_iter().chain(described) {
                objoid.push(oid);
                objsubid.push(sub);
                description.push(d.clone());
            }
        }
        let classoid = vec![PG_CLASS_OID; objoid.len()];
        let ours: HashMap<&str, ArrayRef> = HashMap::from([
            ("objoid", Arc::new(Int32Array::from(objoid)) as ArrayRef),
            ("classoid", Arc::new(Int32Array::from(classoid)) as ArrayRef),
            ("objsubid", Arc::new(Int32Array::from(objsubid)) as ArrayRef),
            ("description", Arc::new(StringArray::from(description)) as ArrayRef),
        ]);
        let columns = schema
            .fields()
            .iter()
            .map(|f| match ours.get(f.name().as_str()) {
                Some(a) => Ok(cast(a, f.data_type())?),
                None => Ok(new_null_array(f.data_type(), ours["objoid"].len())),
            })
            .collect::<Result<Vec<_>, DataFusionError>>()?;
        batches.push(RecordBatch::try_new(schema.clone(), columns)?);
        Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
    }

    /// The OID `pg_class` gives each table of the `public` schema (the datasets), by name.
    async fn public_relations(&self) -> Result<HashMap<String, i32>, DataFusionError> {
        let public = self
            .catalog_rows("pg_namespace", ["oid", "nspname", "oid"])
            .await?
            .into_iter()
            .find(|(_, name, _)| name == "public")
            .map(|(oid, _, _)| oid);
        Ok(self
            .catalog_rows("pg_class", ["oid", "relname", "relnamespace"])
            .await?
            .into_iter()
            .filter(|(_, _, ns)| Some(*ns) == public)
            .map(|(oid, name, _)| (name, oid))
            .collect())
    }

    /// Every row of the catalog table `table` as (integer, text, integer) from its columns
    /// `columns`, in that order.
    async fn catalog_rows(&self, table: &str, columns: [&str; 3]) -> Result<Vec<(i32, String, i32)>, DataFusionError> {
        let (int, text) = (DataType::Int32, DataType::Utf8);
        let mut out = Vec::new();
        for b in rows(self.need(table).await?).await? {
            let (a, name, c) = (
                column(&b, columns[0], &int)?,
                column(&b, columns[1], &text)?,
                column(&b, columns[2], &int)?,
            );
            let (a, name, c) = (
                a.as_primitive::<Int32Type>(),
                name.as_string::<i32>(),
                c.as_primitive::<Int32Type>(),
            );
            out.extend((0..b.num_rows()).map(|i| (a.value(i), name.value(i).to_string(), c.value(i))));
        }
        Ok(out)
    }

    /// The bytes of each dataset's live files, by the OID `pg_class` gives its table
    /// (`pg_table_size` and its kin read it; a table is opened only when they are asked for).
    async fn relation_sizes(&self) -> Result<Arc<dyn TableProvider>, DataFusionError> {
        let oids = self.public_relations().await?;
        let (mut oid, mut bytes) = (Vec::new(), Vec::new());
        for spec in self.tables.public() {
            let Some(&o) = oids.get(&spec.name) else { continue };
            if spec.external.is_some() {
                continue;
            }
            // A table that cannot be read has no size (NULL) rather than failing the listing.
            let size = match self.tables.lake.open_table(&spec.name).await {
                Ok(table) => tarn_lake::compact::table_files(&table, &spec)
                    .map(|files| files.iter().map(|f| f.size_bytes).sum::<u64>()),
                Err(e) => Err(e),
            };
            match size {
                Ok(size) => {
                    oid.push(o);
                    bytes.push(i64::try_from(size).unwrap_or(i64::MAX));
                }
                Err(e) => {
                    tracing::warn!(dataset = %spec.name, error = %e, "table size unknown: its table cannot be read")
                }
            }
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("tarn_size_oid", DataType::Int32, false),
            Field::new("tarn_size_bytes", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int32Array::from(oid)), Arc::new(Int64Array::from(bytes))],
        )?;
        Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
    }

    async fn need(&self, name: &str) -> Result<Arc<dyn TableProvider>, DataFusionError> {
        self.inner
            .table(name)
            .await?
            .ok_or_else(|| DataFusionError::Internal(format!("pg_catalog has no {name}")))
    }
}

/// Rewrites what the engine cannot plan in the catalog queries of PostgreSQL clients:
/// - `ARRAY(subquery)` that refers to its outer query becomes NULL. `psql`'s `\d+` turns a
///   table's storage options into text this way (`c.reloptions || array(select 'toast.' || x
///   from unnest(tc.reloptions) x)`), and no table of tarn's has such options, so NULL is their
///   true value here; the compatibility layer treats other correlated subqueries of the catalog
///   queries the same way. One that stands alone is left for the engine, which refuses it.
/// - `pg_table_size(oid)`, `pg_total_relation_size(oid)` and `pg_relation_size(oid)` become
///   the bytes of the dataset's live files (a table's files are its whole size: it has no
///   indexes or TOAST).
/// - `col_description(table, column)` and `obj_description(oid[, catalog])` become the lookup
///   in `pg_description` that PostgreSQL defines them as (a subquery the engine joins).
pub(crate) fn catalog_rewrites(statement: &mut Statement) {
    let _ = statement.visit(&mut CatalogRewrites);
}

struct CatalogRewrites;

impl VisitorMut for CatalogRewrites {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let Expr::Function(f) = expr else {
            return ControlFlow::Continue(());
        };
        let name = f
            .name
            .0
            .last()
            .map(|p| p.to_string().to_ascii_lowercase())
            .unwrap_or_default();
        let args: Vec<String> = match &f.args {
            FunctionArguments::Subquery(q) => {
                if name == "array" && over_reloptions(q) {
                    *expr = Expr::Value(Value::Null.with_empty_span());
                }
                return ControlFlow::Continue(());
            }
            FunctionArguments::List(l) => l.args.iter().map(|a| a.to_string()).collect(),
            FunctionArguments::None => return ControlFlow::Continue(()),
        };
        let lookup = match (name.as_str(), args.as_slice()) {
            ("col_description", [table, column]) => description_lookup(table, Some(PG_CLASS_OID), column),
            // Column names no client query uses: an unqualified argument (`oid`) must resolve in
            // the outer query, not to a column of the lookup.
            ("pg_table_size" | "pg_total_relation_size" | "pg_relation_size", [oid]) => format!(
                "(SELECT max(tarn_s.tarn_size_bytes) FROM pg_catalog.{RELATION_SIZE} tarn_s \
                 WHERE tarn_s.tarn_size_oid = ({oid}))"
            ),
            ("obj_description", [oid]) => description_lookup(oid, None, "0"),
            ("obj_description", [oid, catalog]) => {
                let class = match catalog.trim_matches('\'').to_ascii_lowercase().as_str() {
                    "pg_class" => Some(PG_CLASS_OID),
                    "pg_namespace" => Some(2615),
                    "pg_proc" => Some(1255),
                    "pg_type" => Some(1247),
                    _ => return ControlFlow::Continue(()),
                };
                description_lookup(oid, class, "0")
            }
            _ => return ControlFlow::Continue(()),
        };
        if let Ok(e) = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&lookup)
            .and_then(|mut p| p.parse_expr())
        {
            *expr = e;
        }
        ControlFlow::Continue(())
    }
}

/// The description of object `oid` (of the catalog whose OID is `class`), or of its column
/// number `sub` (0: the object itself), as a scalar subquery over `pg_description`.
/// `pg_description`'s columns are renamed to names no client query uses, so that an
/// unqualified argument (`oid`) resolves in the outer query.
fn description_lookup(oid: &str, class: Option<i32>, sub: &str) -> String {
    let class = class
        .map(|c| format!(" AND tarn_d.tarn_class = {c}"))
        .unwrap_or_default();
    format!(
        "(SELECT max(tarn_d.tarn_text) FROM (SELECT objoid AS tarn_oid, classoid AS tarn_class, \
         objsubid AS tarn_sub, description AS tarn_text FROM pg_catalog.pg_description) tarn_d \
         WHERE tarn_d.tarn_oid = ({oid}){class} AND tarn_d.tarn_sub = ({sub}))"
    )
}

/// Whether a query is `SELECT ... FROM unnest(<alias>.reloptions) [x]`: the shape in which
/// `psql`'s `\d+` reads a table's storage options (of its TOAST table, from the outer query).
fn over_reloptions(query: &Query) -> bool {
    let SetExpr::Select(select) = &*query.body else {
        return false;
    };
    let [from] = select.from.as_slice() else {
        return false;
    };
    let TableFactor::Table {
        name, args: Some(args), ..
    } = &from.relation
    else {
        return false;
    };
    let unnest = name
        .0
        .last()
        .is_some_and(|p| p.to_string().eq_ignore_ascii_case("unnest"));
    let reloptions = match args.args.as_slice() {
        [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::CompoundIdentifier(parts)))] => {
            parts.len() == 2 && parts[1].value.eq_ignore_ascii_case("reloptions")
        }
        _ => false,
    };
    from.joins.is_empty() && unnest && reloptions
}

/// `pg_size_pretty(bytes)`: a size as PostgreSQL prints it. Below 10 kB in bytes; then in the
/// first unit (kB, MB, GB, TB, PB) in which the size, counted in half units, is under 20,479
/// (PB has no limit), rounded half away from zero.
pub(crate) fn size_pretty(bytes: i64) -> String {
    if bytes.unsigned_abs() < 10 * 1024 {
        return format!("{bytes} bytes");
    }
    // Half kilobytes: the extra bit is rounded off when the unit is chosen.
    let mut size = bytes / 512;
    for unit in ["kB", "MB", "GB", "TB"] {
        if size.unsigned_abs() < 20 * 1024 - 1 {
            return format!("{} {unit}", half_rounded(size));
        }
        size /= 1024;
    }
    format!("{} PB", half_rounded(size))
}

fn half_rounded(x: i64) -> i64 {
    (x + if x < 0 { -1 } else { 1 }) / 2
}

/// `pg_size_pretty` as a function of the engine.
pub(crate) fn size_pretty_udf() -> deltalake::datafusion::logical_expr::ScalarUDF {
    use deltalake::datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    use deltalake::datafusion::scalar::ScalarValue;
    create_udf(
        "pg_size_pretty",
        vec![DataType::Int64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| match &args[0] {
            ColumnarValue::Scalar(v) => {
                let ScalarValue::Int64(v) = v.cast_to(&DataType::Int64)? else {
                    return Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None)));
                };
                Ok(ColumnarValue::Scalar(ScalarValue::Utf8(v.map(size_pretty))))
            }
            ColumnarValue::Array(a) => {
                let a = cast(a, &DataType::Int64)?;
                let out: StringArray = a
                    .as_primitive::<deltalake::arrow::datatypes::Int64Type>()
                    .iter()
                    .map(|v| v.map(size_pretty))
                    .collect();
                Ok(ColumnarValue::Array(Arc::new(out)))
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(sql: &str) -> String {
        let mut s = deltalake::datafusion::sql::sqlparser::parser::Parser::parse_sql(
            &deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect {},
            sql,
        )
        .expect("parses");
        catalog_rewrites(&mut s[0]);
        s[0].to_string()
    }

    #[test]
    fn only_psqls_array_over_reloptions_becomes_null() {
        let psql = "SELECT array_to_string(c.reloptions || array(select 'toast.' || x from pg_catalog.unnest(tc.reloptions) x), ', ') FROM pg_class c LEFT JOIN pg_class tc ON c.reltoastrelid = tc.oid";
        assert_eq!(
            rewritten(psql),
            "SELECT array_to_string(c.reloptions || NULL, ', ') FROM pg_class c LEFT JOIN pg_class tc ON c.reltoastrelid = tc.oid"
        );
        // Any other shape is left as it is, even one over the outer query.
        for sql in [
            "SELECT ARRAY(SELECT relname FROM pg_class)",
            "SELECT ARRAY(SELECT p.relname FROM pg_class p WHERE p.oid > 1)",
            "SELECT * FROM t o WHERE o.x = ANY(ARRAY(SELECT u.x FROM u WHERE u.id = o.id))",
            "SELECT ARRAY(SELECT x FROM pg_catalog.unnest(t.other) x) FROM t",
        ] {
            assert_eq!(rewritten(sql), sql);
        }
    }

    #[test]
    fn builtin_catalogs_cast_to_regclass_are_their_oids() {
        for (sql, want) in [
            ("SELECT 'pg_class'::regclass", "SELECT 1259"),
            ("SELECT 'pg_namespace' :: pg_catalog.regclass, 1", "SELECT 2615, 1"),
            ("SELECT 'pg_catalog.pg_proc'::REGCLASS", "SELECT 1255"),
            // tarn's own tables and other casts are left to the compatibility layer.
            ("SELECT 'auctions'::regclass", "SELECT 'auctions'::regclass"),
            ("SELECT 'pg_class'::text", "SELECT 'pg_class'::text"),
        ] {
            let tokens = deltalake::datafusion::sql::sqlparser::tokenizer::Tokenizer::new(
                &deltalake::datafusion::sql::sqlparser::dialect::GenericDialect {},
                sql,
            )
            .tokenize()
            .expect("tokens");
            let out: String = builtin_regclass(tokens).iter().map(|t| t.to_string()).collect();
            assert_eq!(out, want, "{sql}");
        }
    }

    #[test]
    fn sizes_print_as_postgresql_prints_them() {
        // Figures from PostgreSQL 15's pg_size_pretty.
        for (bytes, text) in [
            (0, "0 bytes"),
            (10239, "10239 bytes"),
            (10240, "10 kB"),
            (10752, "11 kB"),
            (21503, "21 kB"),
            (10_484_224, "10239 kB"),
            (10_484_735, "10239 kB"),
            (10_485_759, "10 MB"),
            (20 * 1024 * 1024 - 1, "20 MB"),
            (20 * 1024 * 1024, "20 MB"),
            (123_456_789_012, "115 GB"),
            (-10240, "-10 kB"),
            (-10241, "-10 kB"),
            (-10753, "-11 kB"),
            (-20_971_519, "-20 MB"),
            (i64::MAX, "8192 PB"),
        ] {
            assert_eq!(size_pretty(bytes), text, "{bytes}");
        }
    }

    #[test]
    fn descriptions_are_looked_up_in_pg_description() {
        assert_eq!(
            rewritten("SELECT pg_catalog.col_description(a.attrelid, a.attnum) FROM pg_attribute a"),
            "SELECT (SELECT max(tarn_d.tarn_text) FROM (SELECT objoid AS tarn_oid, classoid AS tarn_class, objsubid AS tarn_sub, description AS tarn_text FROM pg_catalog.pg_description) tarn_d WHERE tarn_d.tarn_oid = (a.attrelid) AND tarn_d.tarn_class = 1259 AND tarn_d.tarn_sub = (a.attnum)) FROM pg_attribute a"
        );
        assert_eq!(
            rewritten("SELECT obj_description(c.oid, 'pg_class') FROM pg_class c"),
            "SELECT (SELECT max(tarn_d.tarn_text) FROM (SELECT objoid AS tarn_oid, classoid AS tarn_class, objsubid AS tarn_sub, description AS tarn_text FROM pg_catalog.pg_description) tarn_d WHERE tarn_d.tarn_oid = (c.oid) AND tarn_d.tarn_class = 1259 AND tarn_d.tarn_sub = (0)) FROM pg_class c"
        );
        // A catalog it does not know is left for the engine.
        let other = "SELECT obj_description(c.oid, 'pg_am') FROM pg_class c";
        assert_eq!(rewritten(other), other);
    }
}
