//! Dataset contracts: the declared (or inferred) schema of a dataset, how it is partitioned and
//! which fields carry the event time, the event id and the tenant. Descriptors are YAML files;
//! the same type is persisted by the catalog as JSON.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::name;

/// The column types a contract may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Int64,
    Float64,
    Bool,
    /// RFC 3339 text or integer epoch milliseconds on input; stored as UTC microseconds.
    Timestamp,
    /// Any JSON value, stored as its JSON text.
    Json,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Int64 => "int64",
            FieldType::Float64 => "float64",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
            FieldType::Json => "json",
        }
    }
}

/// One declared field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// How much the field says about a person (governance; `tarn validate` wants an owner for
    /// every dataset holding personal data).
    #[serde(default, skip_serializing_if = "Pii::is_none")]
    pub pii: Pii,
}

/// How identifying a field is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pii {
    /// Not personal data.
    #[default]
    None,
    /// Identifies a person together with other data (an IP address, a device or cookie id).
    Indirect,
    /// Identifies a person on its own (an email address, a name, a phone number).
    Direct,
    /// Special categories (health, beliefs, precise location): the strictest handling.
    Sensitive,
}

impl Pii {
    pub fn is_none(&self) -> bool {
        *self == Pii::None
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Pii::None => "none",
            Pii::Indirect => "indirect",
            Pii::Direct => "direct",
            Pii::Sensitive => "sensitive",
        }
    }
}

/// Who may discover and read a dataset: `private` to its owning team, `public` to the
/// organisation (a public dataset must describe itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Private,
    Public,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Private => "private",
            Scope::Public => "public",
        }
    }
}

/// The expected volume of a dataset. It scales delivery's batch size (S a quarter of the
/// server's `--batch-bytes`, M the flag itself, L four times it) and sets the shard count a
/// partitioned stream gives the dataset (S 1, M 2, L 4; the embedded log has one writer and
/// uses one shard whatever the class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SizeClass {
    S,
    #[default]
    M,
    L,
}

impl SizeClass {
    pub fn as_str(self) -> &'static str {
        match self {
            SizeClass::S => "S",
            SizeClass::M => "M",
            SizeClass::L => "L",
        }
    }

    /// Delivery's batch size for this class, given the server's (class M) batch size.
    pub fn batch_bytes(self, server: usize) -> usize {
        match self {
            SizeClass::S => (server / 4).max(1 << 20),
            SizeClass::M => server,
            SizeClass::L => server.saturating_mul(4),
        }
    }

    /// The stream's byte limit for this class, given the server's (class M) limit.
    pub fn stream_bytes(self, server: u64) -> u64 {
        match self {
            SizeClass::S => server / 4,
            SizeClass::M => server,
            SizeClass::L => server.saturating_mul(4),
        }
    }

    /// Shards of the dataset on a partitioned stream.
    pub fn shards(self) -> u32 {
        match self {
            SizeClass::S => 1,
            SizeClass::M => 2,
            SizeClass::L => 4,
        }
    }
}

/// How producers encode events. JSON (an array or NDJSON, optionally gzip or zstd) is the
/// only encoding the collector reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Json,
}

/// An application that writes (producer) or reads (consumer) a dataset. Written as a name or
/// as `{ name, description }`. Each producer gets a write key from `tarn apply`; a dataset
/// that names producers accepts events only with one of their keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "AppRepr")]
pub struct App {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AppRepr {
    Name(String),
    Full(AppFull),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFull {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

impl From<AppRepr> for App {
    fn from(r: AppRepr) -> Self {
        match r {
            AppRepr::Name(name) => App {
                name,
                description: None,
            },
            AppRepr::Full(AppFull { name, description }) => App { name, description },
        }
    }
}

/// What a quality rule checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QualityCheck {
    /// `field` is never null.
    NotNull,
    /// `field` never repeats within a day.
    Unique,
    /// `field` (int64 or float64) stays within `min` and `max` (either may be left out).
    Range,
    /// `field` (a string) takes only `values`.
    AcceptedValues,
    /// The newest event is at most `max_delay_minutes` old.
    Freshness,
}

/// A data quality rule. The descriptor declares it and `tarn validate` checks it against the
/// contract; evaluating rules on ingest and on tables (metrics, alerts) is the data-quality
/// feature's, which reads them from here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityRule {
    pub name: String,
    pub check: QualityCheck,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_minutes: Option<u32>,
}

impl QualityRule {
    fn check(&self, spec: &DatasetSpec) -> std::result::Result<(), String> {
        let n = &self.name;
        name::check_field(n).map_err(|e| format!("quality rule {n:?}: {e}"))?;
        let field = match (self.check, &self.field) {
            (QualityCheck::Freshness, Some(_)) => return Err(format!("quality rule {n}: freshness takes no field")),
            (QualityCheck::Freshness, None) => None,
            (_, None) => return Err(format!("quality rule {n}: needs a field")),
            (_, Some(f)) => Some(
                spec.field(f)
                    .ok_or_else(|| format!("quality rule {n}: field {f:?} is not declared"))?,
            ),
        };
        let extra = |what: &str, set: bool| {
            if set {
                Err(format!("quality rule {n}: {what} belongs to another check"))
            } else {
                Ok(())
            }
        };
        let is_range = self.check == QualityCheck::Range;
        extra("min/max", !is_range && (self.min.is_some() || self.max.is_some()))?;
        extra(
            "values",
            self.check != QualityCheck::AcceptedValues && !self.values.is_empty(),
        )?;
        extra(
            "max_delay_minutes",
            self.check != QualityCheck::Freshness && self.max_delay_minutes.is_some(),
        )?;
        match (self.check, field) {
            (QualityCheck::Range, Some(f)) => {
                if !matches!(f.ty, FieldType::Int64 | FieldType::Float64) {
                    return Err(format!("quality rule {n}: range needs an int64 or float64 field"));
                }
                match (self.min, self.max) {
                    (None, None) => return Err(format!("quality rule {n}: range needs min or max")),
                    (Some(a), Some(b)) if a > b => return Err(format!("quality rule {n}: min is above max")),
                    _ => {}
                }
            }
            (QualityCheck::AcceptedValues, Some(f)) => {
                if f.ty != FieldType::String {
                    return Err(format!("quality rule {n}: accepted_values needs a string field"));
                }
                if self.values.is_empty() || self.values.len() > 1000 {
                    return Err(format!("quality rule {n}: 1 to 1000 values"));
                }
            }
            (QualityCheck::Freshness, _) if self.max_delay_minutes.is_none_or(|m| m == 0) => {
                return Err(format!(
                    "quality rule {n}: freshness needs max_delay_minutes of at least 1"
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Data tarn did not write: an existing folder of Parquet files or a Delta table, registered
/// with `tarn register` and read in place (never written, compacted or moved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    pub format: ExternalFormat,
    /// The absolute path of the folder.
    pub location: String,
    /// Partition columns: Hive-style `key=value` folders (Parquet) or the table's own (Delta).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalFormat {
    Parquet,
    Delta,
}

impl ExternalFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ExternalFormat::Parquet => "parquet",
            ExternalFormat::Delta => "delta",
        }
    }
}

/// What the collector does with a field the contract does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    /// The event is rejected, naming the field.
    #[default]
    Reject,
    /// The field is dropped and the event accepted.
    Drop,
}

/// Partitioning: always `day` of the event time (UTC), plus an optional tenant field.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitioning {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A dataset's contract, as written in a descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Descriptor format version; only 1 exists.
    #[serde(default = "one")]
    pub version: u32,
    pub name: String,
    /// The major version of the schema. Additive changes keep it; a breaking change (a field
    /// removed, retyped or made required) is refused unless this goes up by one.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub major: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "is_default")]
    pub size: SizeClass,
    #[serde(default, skip_serializing_if = "is_default")]
    pub encoding: Encoding,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The business domain the dataset belongs to (discovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The team that owns the dataset (discovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Free labels for discovery, at most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    pub fields: Vec<Field>,
    /// Applications writing the dataset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub producers: Vec<App>,
    /// Applications reading the dataset (lineage and discovery).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<App>,
    /// The timestamp field whose UTC day partitions the table. Absent: the receive time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    /// The string field holding the producer's event id; generated when an event lacks it.
    pub event_id: String,
    #[serde(default)]
    pub partitioning: Partitioning,
    #[serde(default)]
    pub unknown_fields: UnknownFields,
    /// True when tarn inferred this contract from the first write.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inferred: bool,
    #[serde(default, skip_serializing_if = "Compaction::is_default")]
    pub compaction: Compaction,
    #[serde(default, skip_serializing_if = "Lifecycle::is_default")]
    pub lifecycle: Lifecycle,
    #[serde(default, skip_serializing_if = "QueryRules::is_default")]
    pub query: QueryRules,
    /// Data quality rules (see [`QualityRule`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quality: Vec<QualityRule>,
    /// Aggregations kept current from every raw batch (see `rollup.rs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollups: Vec<crate::rollup::Rollup>,
    /// A dataset tarn keeps itself (the dead letters `<dataset>__rejected`); never written
    /// through the API, never declared in a descriptor.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    /// Registered data read in place (`tarn register`); such a dataset takes no events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<External>,
}

/// The suffix of a dataset's dead-letter table.
pub const REJECTED_SUFFIX: &str = "__rejected";
/// The longest raw event kept in a dead letter; a longer one is cut there and flagged.
pub const DEAD_LETTER_PAYLOAD_MAX: usize = 1 << 20;

/// Guardrails on queries over a dataset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRules {
    /// Refuse a query that scans this dataset without a filter on a partition column (`day`
    /// or the tenant field).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_partition_filter: bool,
}

impl QueryRules {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Lifecycle rules of a dataset, by the age of a day partition in whole days (today minus
/// the day): after `infrequent_after_days` it moves to the infrequent tier, after
/// `archive_after_days` to the archive, after `expire_after_days` it is removed from the table
/// (and its files deleted by vacuum after the retention window). Each is optional; those given
/// must increase in that order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrequent_after_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_after_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after_days: Option<u32>,
}

impl Lifecycle {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    fn check(&self) -> std::result::Result<(), String> {
        let steps = [
            ("infrequent_after_days", self.infrequent_after_days),
            ("archive_after_days", self.archive_after_days),
            ("expire_after_days", self.expire_after_days),
        ];
        let mut last: Option<(&str, u32)> = None;
        for (name, v) in steps {
            let Some(v) = v else { continue };
            if v == 0 {
                return Err(format!("lifecycle.{name} must be at least 1"));
            }
            if let Some((prev, p)) = last
                && v <= p
            {
                return Err(format!(
                    "lifecycle.{name} ({v}) must be more than lifecycle.{prev} ({p})"
                ));
            }
            last = Some((name, v));
        }
        Ok(())
    }
}

/// Compaction settings of a dataset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compaction {
    /// Size of the files compaction writes, in MiB (default 128, from 1 to 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mib: Option<u64>,
    /// Fields the rows of a compacted file are sorted by (ascending, nulls first), so that
    /// its row groups carry narrow statistics on them. Empty: files are concatenated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sort_by: Vec<String>,
}

impl Compaction {
    pub const TARGET_MIB_DEFAULT: u64 = 128;

    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The target file size in bytes.
    pub fn target_bytes(&self) -> u64 {
        self.target_mib.unwrap_or(Self::TARGET_MIB_DEFAULT) << 20
    }
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The column tarn adds with the time it received each event.
pub const RECEIVED_AT: &str = "_received_at";
/// The partition column tarn derives from the event time.
pub const DAY: &str = "day";

impl DatasetSpec {
    /// Parses a YAML descriptor and checks it.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let spec: DatasetSpec = serde_norway::from_str(text).map_err(|e| Error::InvalidContract {
            dataset: "?".into(),
            reason: format!("descriptor is not valid: {e}"),
        })?;
        if spec.system {
            return Err(Error::InvalidContract {
                dataset: spec.name,
                reason: "`system` is for the datasets tarn keeps itself; a descriptor cannot set it".into(),
            });
        }
        if spec.external.is_some() {
            return Err(Error::InvalidContract {
                dataset: spec.name,
                reason: "`external` comes from `tarn register`, which reads the data's own schema".into(),
            });
        }
        spec.check()?;
        Ok(spec)
    }

    /// The contract of the dead letters of `dataset`: one row per rejected event, with its
    /// position in the request, the field at fault, the reason and the event's raw text,
    /// partitioned by the day it was received.
    pub fn rejected_of(dataset: &str) -> Result<Self> {
        name::check_dataset(dataset)?;
        let f = |name: &str, ty: FieldType, required: bool, description: &str| Field {
            name: name.into(),
            ty,
            required,
            description: Some(description.into()),
            pii: Pii::None,
        };
        let spec = DatasetSpec {
            version: 1,
            name: format!("{dataset}{REJECTED_SUFFIX}"),
            major: 1,
            scope: Scope::default(),
            size: SizeClass::default(),
            encoding: Encoding::default(),
            producers: Vec::new(),
            consumers: Vec::new(),
            description: Some(format!("events refused by the contract of {dataset}")),
            domain: None,
            owner: None,
            tags: Vec::new(),
            fields: vec![
                f("event_id", FieldType::String, true, "generated for the dead letter"),
                f(
                    "event_index",
                    FieldType::Int64,
                    true,
                    "position of the event in its request, from 0",
                ),
                f("field", FieldType::String, false, "the field at fault, when one is"),
                f("reason", FieldType::String, true, "why the event was refused"),
                f("payload", FieldType::String, true, "the event as sent (cut at 1 MiB)"),
                f(
                    "payload_truncated",
                    FieldType::Bool,
                    true,
                    "true when the payload was cut",
                ),
            ],
            event_time: None,
            event_id: "event_id".into(),
            partitioning: Partitioning::default(),
            unknown_fields: UnknownFields::Reject,
            inferred: false,
            compaction: Compaction::default(),
            lifecycle: Lifecycle::default(),
            query: QueryRules::default(),
            quality: Vec::new(),
            rollups: Vec::new(),
            system: true,
            external: None,
        };
        spec.check()?;
        Ok(spec)
    }

    /// The read-only dataset that keeps the table of an earlier major version: the same
    /// contract under `<name>__v<major>`, kept by tarn, without rollups or producers.
    pub fn frozen_of(old: &DatasetSpec) -> Result<Self> {
        let mut spec = old.clone();
        spec.name = Self::frozen_name(&old.name, old.major);
        spec.system = true;
        spec.inferred = false;
        spec.rollups.clear();
        spec.producers.clear();
        spec.description = Some(format!(
            "major version {} of {}, kept read-only{}",
            old.major,
            old.name,
            old.description.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
        ));
        spec.check()?;
        Ok(spec)
    }

    /// The name of the dataset keeping major version `major` of `name`.
    pub fn frozen_name(name: &str, major: u32) -> String {
        format!("{name}__v{major}")
    }

    /// True for the read-only table of an earlier major version.
    pub fn is_frozen(&self) -> bool {
        self.system && !self.name.ends_with(REJECTED_SUFFIX)
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    pub fn tenant(&self) -> Option<&str> {
        self.partitioning.tenant.as_deref()
    }

    /// Checks names, references and types.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidContract {
                dataset: self.name.clone(),
                reason,
            })
        };
        if self.version != 1 {
            return bad(format!("descriptor version {} is not supported (only 1)", self.version));
        }
        if self.system {
            name::check_system_dataset(&self.name)?;
        } else {
            name::check_dataset(&self.name)?;
        }
        if self.fields.is_empty() {
            return bad("a dataset needs at least one field".into());
        }
        if let Some(ext) = &self.external {
            return self.check_external(ext);
        }
        if self.major == 0 || self.major > 9999 {
            return bad(format!("major is {}; it must be from 1 to 9999", self.major));
        }
        for (what, apps) in [("producers", &self.producers), ("consumers", &self.consumers)] {
            if apps.len() > 64 {
                return bad(format!("{what}: at most 64"));
            }
            let mut names = std::collections::HashSet::new();
            for a in apps {
                name::check_app(&a.name)?;
                if !names.insert(a.name.as_str()) {
                    return bad(format!("{what}: {:?} is named twice", a.name));
                }
            }
        }
        if self.tags.len() > 32 || self.tags.iter().any(|t| t.is_empty() || t.len() > 64) {
            return bad("tags: at most 32, each 1 to 64 characters".into());
        }
        if self.fields.len() > 1000 {
            return bad(format!("{} fields; at most 1000", self.fields.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.fields {
            name::check_field(&f.name)?;
            if !seen.insert(f.name.to_ascii_lowercase()) {
                return bad(format!(
                    "field {:?} is declared twice (names are case-insensitive)",
                    f.name
                ));
            }
        }
        match self.field(&self.event_id) {
            Some(f) if f.ty == FieldType::String => {}
            Some(f) => {
                return bad(format!(
                    "event_id field {:?} must be a string, not {}",
                    f.name,
                    f.ty.as_str()
                ));
            }
            None => return bad(format!("event_id field {:?} is not declared", self.event_id)),
        }
        if let Some(t) = &self.event_time {
            match self.field(t) {
                Some(f) if f.ty == FieldType::Timestamp && f.required => {}
                Some(f) if f.ty == FieldType::Timestamp => {
                    return bad(format!("event_time field {:?} must be required", f.name));
                }
                Some(f) => {
                    return bad(format!(
                        "event_time field {:?} must be a timestamp, not {}",
                        f.name,
                        f.ty.as_str()
                    ));
                }
                None => return bad(format!("event_time field {t:?} is not declared")),
            }
        }
        if let Some(m) = self.compaction.target_mib
            && !(1..=4096).contains(&m)
        {
            return bad(format!("compaction.target_mib is {m}; it must be from 1 to 4096"));
        }
        for f in &self.compaction.sort_by {
            if self.field(f).is_none() && f != RECEIVED_AT {
                return bad(format!("compaction.sort_by field {f:?} is not declared"));
            }
            if Some(f.as_str()) == self.tenant() {
                return bad(format!(
                    "compaction.sort_by field {f:?} is the tenant partition; every row of a file has the same value"
                ));
            }
        }
        self.lifecycle.check().map_err(|r| Error::InvalidContract {
            dataset: self.name.clone(),
            reason: r,
        })?;
        let mut rule_names = std::collections::HashSet::new();
        for q in &self.quality {
            q.check(self).map_err(|reason| Error::InvalidContract {
                dataset: self.name.clone(),
                reason,
            })?;
            if !rule_names.insert(q.name.as_str()) {
                return bad(format!("quality rule {:?} is declared twice", q.name));
            }
        }
        if self.quality.len() > 256 {
            return bad(format!("{} quality rules; at most 256", self.quality.len()));
        }
        let mut rollup_names = std::collections::HashSet::new();
        for r in &self.rollups {
            r.check(self).map_err(|reason| Error::InvalidContract {
                dataset: self.name.clone(),
                reason,
            })?;
            if !rollup_names.insert(r.name.as_str()) {
                return bad(format!("rollup {:?} is declared twice", r.name));
            }
        }
        if let Some(t) = self.tenant() {
            match self.field(t) {
                Some(f) if f.ty == FieldType::String && f.required => {}
                Some(f) if f.ty == FieldType::String => {
                    return bad(format!("tenant field {:?} must be required", f.name));
                }
                Some(f) => {
                    return bad(format!(
                        "tenant field {:?} must be a string, not {}",
                        f.name,
                        f.ty.as_str()
                    ));
                }
                None => return bad(format!("tenant field {t:?} is not declared")),
            }
        }
        Ok(())
    }

    /// The rules of a registered dataset: an absolute location, column names SQL can carry,
    /// and none of what only tarn's own tables have (event id, tenant, rollups, lifecycle).
    fn check_external(&self, ext: &External) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidContract {
                dataset: self.name.clone(),
                reason,
            })
        };
        if !ext.location.starts_with('/') || ext.location.split('/').any(|c| c == "..") {
            return bad(format!(
                "location {:?} must be an absolute path without ..",
                ext.location
            ));
        }
        if self.fields.len() > 10_000 {
            return bad(format!("{} columns; at most 10000", self.fields.len()));
        }
        for f in &self.fields {
            if f.name.is_empty() || f.name.len() > 255 || f.name.chars().any(char::is_control) {
                return bad(format!("column {:?}: 1 to 255 printable characters", f.name));
            }
        }
        for p in &ext.partitions {
            if self.field(p).is_none() {
                return bad(format!("partition column {p:?} is not a column"));
            }
        }
        let owned = !self.event_id.is_empty()
            || self.event_time.is_some()
            || self.tenant().is_some()
            || !self.rollups.is_empty()
            || !self.producers.is_empty()
            || self.lifecycle != Lifecycle::default()
            || self.compaction != Compaction::default()
            || self.system;
        if owned {
            return bad(
                "a registered dataset is read in place: no event_id, event_time, tenant, producers, rollups, lifecycle or compaction"
                    .into(),
            );
        }
        Ok(())
    }

    /// Infers a contract from the first events written to a dataset without a descriptor.
    ///
    /// Every key seen becomes a field (JSON strings are `string`, integers `int64`, other
    /// numbers `float64`, booleans `bool`, objects and arrays `json`; a key seen with two types
    /// becomes `json`). The event time is the first of `ts`, `timestamp`, `event_time`, `time`
    /// present in every event as RFC 3339 text or epoch milliseconds, else the receive time. The
    /// tenant is the first of `client_id`, `tenant_id`, `customer_id` present as a string in
    /// every event. The event id is `event_id` (added as a field when absent). Only the event
    /// id, event time and tenant are required; unknown fields are rejected afterwards.
    pub fn infer(dataset: &str, events: &[serde_json::Map<String, serde_json::Value>]) -> Result<Self> {
        use serde_json::Value;
        name::check_dataset(dataset)?;
        let mut fields: Vec<Field> = Vec::new();
        for ev in events {
            for (k, v) in ev {
                let ty = match v {
                    Value::Null => continue,
                    Value::String(_) => FieldType::String,
                    Value::Bool(_) => FieldType::Bool,
                    Value::Number(n) if n.is_i64() => FieldType::Int64,
                    Value::Number(_) => FieldType::Float64,
                    Value::Array(_) | Value::Object(_) => FieldType::Json,
                };
                match fields.iter_mut().find(|f| f.name == *k) {
                    Some(f) if f.ty == ty => {}
                    Some(f) if (f.ty, ty) == (FieldType::Int64, FieldType::Float64) => f.ty = ty,
                    Some(f) if (f.ty, ty) == (FieldType::Float64, FieldType::Int64) => {}
                    Some(f) => f.ty = FieldType::Json,
                    None => {
                        name::check_field(k)?;
                        fields.push(Field {
                            name: k.clone(),
                            ty,
                            required: false,
                            description: None,
                            pii: Pii::None,
                        });
                    }
                }
            }
        }
        let everywhere = |key: &str, ok: &dyn Fn(&Value) -> bool| {
            !events.is_empty() && events.iter().all(|e| e.get(key).is_some_and(ok))
        };
        let is_time = |v: &Value| match v {
            Value::String(s) => parse_rfc3339_micros(s).is_some(),
            Value::Number(n) => n.is_i64(),
            _ => false,
        };
        let event_time = ["ts", "timestamp", "event_time", "time"]
            .into_iter()
            .find(|k| everywhere(k, &is_time))
            .map(str::to_string);
        let tenant = ["client_id", "tenant_id", "customer_id"]
            .into_iter()
            .find(|k| {
                everywhere(k, &|v: &Value| {
                    v.as_str().is_some_and(|s| name::check_tenant_value(s).is_ok())
                })
            })
            .map(str::to_string);
        let event_id = "event_id".to_string();
        match fields.iter_mut().find(|f| f.name == event_id) {
            Some(f) if f.ty == FieldType::String => {}
            Some(_) => {
                return Err(Error::InvalidContract {
                    dataset: dataset.into(),
                    reason:
                        "field event_id must be a string to infer a contract; declare the dataset with a descriptor"
                            .into(),
                });
            }
            None => fields.insert(
                0,
                Field {
                    name: event_id.clone(),
                    ty: FieldType::String,
                    required: false,
                    description: None,
                    pii: Pii::None,
                },
            ),
        }
        for f in &mut fields {
            if Some(&f.name) == event_time.as_ref() {
                f.ty = FieldType::Timestamp;
                f.required = true;
            }
            if Some(&f.name) == tenant.as_ref() {
                f.required = true;
            }
        }
        let spec = DatasetSpec {
            version: 1,
            name: dataset.to_string(),
            major: 1,
            scope: Scope::default(),
            size: SizeClass::default(),
            encoding: Encoding::default(),
            producers: Vec::new(),
            consumers: Vec::new(),
            description: None,
            domain: None,
            owner: None,
            tags: Vec::new(),
            fields,
            event_time,
            event_id,
            partitioning: Partitioning { tenant },
            unknown_fields: UnknownFields::Reject,
            inferred: true,
            compaction: Compaction::default(),
            lifecycle: Lifecycle::default(),
            query: QueryRules::default(),
            quality: Vec::new(),
            rollups: Vec::new(),
            system: false,
            external: None,
        };
        spec.check()?;
        Ok(spec)
    }
}

/// Parses RFC 3339 text ("2026-11-22T10:00:00Z", "2026-11-22T10:00:00.123+01:00") into UTC
/// microseconds since the epoch.
pub fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    utc_micros_fast(s.as_bytes()).or_else(|| {
        let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
        Some(t.timestamp_micros())
    })
}

/// The common form, `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, read digit by digit (every event's time
/// goes through here, and chrono's general parser costs ten times as much). `None` for any
/// other text, valid or not, which chrono then decides; where this gives a value, chrono
/// gives the same one.
fn utc_micros_fast(b: &[u8]) -> Option<i64> {
    /// Where the digits of `YYYY-MM-DDTHH:MM:SS` are.
    const DIGITS: [usize; 14] = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    let head: &[u8; 20] = b.get(..20)?.try_into().ok()?;
    if head[4] != b'-' || head[7] != b'-' || head[10] != b'T' || head[13] != b':' || head[16] != b':' {
        return None;
    }
    let mut v = [0i64; 14];
    for (k, at) in DIGITS.into_iter().enumerate() {
        let d = head[at].wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v[k] = i64::from(d);
    }
    let y = v[0] * 1000 + v[1] * 100 + v[2] * 10 + v[3];
    let (m, d) = (v[4] * 10 + v[5], v[6] * 10 + v[7]);
    let (hh, mm, ss) = (v[8] * 10 + v[9], v[10] * 10 + v[11], v[12] * 10 + v[13]);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    // A leap second (60) is left to chrono.
    if d == 0 || d > month_days || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Microseconds are the fraction's first six digits; chrono drops the rest as well (up to
    // nine; more are left to it).
    let (mut micros, mut i) = (0, 19);
    if b[19] == b'.' {
        i = 20;
        while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            if i < 26 {
                micros = micros * 10 + i64::from(c - b'0');
            }
            i += 1;
        }
        if i == 20 || i > 29 {
            return None;
        }
        for _ in i..26 {
            micros *= 10;
        }
    }
    if b.len() != i + 1 || b[i] != b'Z' {
        return None;
    }
    Some((days_from_civil(y, m, d) * 86_400 + hh * 3_600 + mm * 60 + ss) * 1_000_000 + micros)
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (eras of 400 years,
/// with March as the first month so that a leap day ends its year).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The UTC day (`YYYY-MM-DD`) of a timestamp in microseconds.
pub fn day_of_micros(micros: i64) -> String {
    let mut text = String::with_capacity(10);
    push_day(micros, &mut text);
    text
}

/// Appends the UTC day of `micros` to `out`. Years 0 to 9999 are written digit by digit (a
/// request's events each need theirs); others go through chrono's formatting.
fn push_day(micros: i64, out: &mut String) {
    use chrono::Datelike;
    let Some(t) = chrono::DateTime::from_timestamp(micros.div_euclid(1_000_000), 0) else {
        out.push_str("1970-01-01");
        return;
    };
    let (y, m, d) = (t.year(), t.month(), t.day());
    if !(0..=9999).contains(&y) {
        use std::fmt::Write;
        let _ = write!(out, "{}", t.format("%Y-%m-%d"));
        return;
    }
    let y = y as u32;
    let digits = [
        y / 1000,
        y / 100 % 10,
        y / 10 % 10,
        y % 10,
        m / 10,
        m % 10,
        d / 10,
        d % 10,
    ];
    for (i, v) in digits.into_iter().enumerate() {
        if i == 4 || i == 6 {
            out.push('-');
        }
        out.push(char::from(b'0' + v as u8));
    }
}

/// How many days' texts [`DayOf`] keeps: a request's events mostly span a few days (late
/// events, backfills), met in any order.
const DAYS_KEPT: usize = 16;

/// The UTC day of each of many timestamps, reusing the texts of the last days it wrote.
#[derive(Debug, Default)]
pub struct DayOf {
    days: Vec<(i64, String)>,
    /// The kept day a new one replaces next, once `DAYS_KEPT` are kept.
    next: usize,
}

impl DayOf {
    /// The day (`YYYY-MM-DD`) of `micros`, as [`day_of_micros`] gives it.
    pub fn of(&mut self, micros: i64) -> &str {
        let day = micros.div_euclid(86_400_000_000);
        let at = match self.days.iter().position(|(d, _)| *d == day) {
            Some(at) => at,
            None if self.days.len() < DAYS_KEPT => {
                self.days.push((day, day_of_micros(micros)));
                self.days.len() - 1
            }
            None => {
                let at = self.next;
                self.next = (at + 1) % DAYS_KEPT;
                let (d, text) = &mut self.days[at];
                *d = day;
                text.clear();
                push_day(micros, text);
                at
            }
        };
        &self.days[at].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUCTIONS: &str = r#"
version: 1
name: auctions
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: cpm, type: float64 }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
"#;

    #[test]
    fn parses_a_descriptor() {
        let s = DatasetSpec::from_yaml(AUCTIONS).expect("valid");
        assert_eq!(s.name, "auctions");
        assert_eq!(s.tenant(), Some("client_id"));
        assert_eq!(s.field("cpm").map(|f| f.ty), Some(FieldType::Float64));
        assert_eq!(s.unknown_fields, UnknownFields::Reject);
        assert_eq!(s.compaction.target_bytes(), 128 << 20);
        assert!(!s.query.require_partition_filter);
        let guarded =
            DatasetSpec::from_yaml(&format!("{AUCTIONS}query: {{ require_partition_filter: true }}\n")).expect("valid");
        assert!(guarded.query.require_partition_filter);
        let small = DatasetSpec::from_yaml(&format!("{AUCTIONS}compaction: {{ target_mib: 16 }}\n")).expect("valid");
        assert_eq!(small.compaction.target_bytes(), 16 << 20);
    }

    #[test]
    fn parses_governance_fields() {
        let text = format!(
            "major: 2\nscope: public\nsize: L\nencoding: json\n{}producers: [bid-service, {{ name: replay, description: backfills }}]\nconsumers: [finance-report]\n",
            AUCTIONS.replace("type: float64 }", "type: float64, pii: indirect }")
        );
        let s = DatasetSpec::from_yaml(&text).expect("valid");
        assert_eq!((s.major, s.scope, s.size), (2, Scope::Public, SizeClass::L));
        assert_eq!(s.field("cpm").map(|f| f.pii), Some(Pii::Indirect));
        assert_eq!(s.producers[0].name, "bid-service");
        assert_eq!(s.producers[1].description.as_deref(), Some("backfills"));
        assert_eq!(s.consumers.len(), 1);
        // The catalog keeps contracts as JSON; they come back the same.
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<DatasetSpec>(&json).expect("back"), s);
        // Defaults stay out of the stored form.
        let plain = DatasetSpec::from_yaml(AUCTIONS).expect("valid");
        let json = serde_json::to_string(&plain).expect("json");
        assert!(
            !json.contains("major") && !json.contains("scope") && !json.contains("pii"),
            "{json}"
        );
        assert_eq!(SizeClass::S.batch_bytes(64 << 20), 16 << 20);
        assert_eq!(SizeClass::L.shards(), 4);
    }

    #[test]
    fn refuses_bad_descriptors() {
        let cases = [
            (AUCTIONS.replace("name: auctions", "name: ../etc"), "dataset"),
            (AUCTIONS.replace("event_time: ts", "event_time: nope"), "not declared"),
            (
                AUCTIONS.replace("event_time: ts", "event_time: cpm"),
                "must be a timestamp",
            ),
            (AUCTIONS.replace("tenant: client_id", "tenant: cpm"), "must be a string"),
            (
                AUCTIONS.replace("event_id: event_id", "event_id: ts"),
                "must be a string",
            ),
            (AUCTIONS.replace("version: 1", "version: 2"), "not supported"),
            (AUCTIONS.replace("type: float64", "type: decimal"), "not valid"),
            (
                AUCTIONS.replace("partitioning:", "colour: red\npartitioning:"),
                "not valid",
            ),
            (AUCTIONS.replace("name: cpm", "name: client_id"), "twice"),
            (AUCTIONS.replace("name: cpm", "name: _cpm"), "reserved"),
            (format!("{AUCTIONS}compaction: {{ target_mib: 0 }}\n"), "from 1 to 4096"),
            (format!("{AUCTIONS}compaction: {{ target_gb: 1 }}\n"), "not valid"),
            (
                format!("{AUCTIONS}lifecycle: {{ infrequent_after_days: 90, archive_after_days: 30 }}\n"),
                "must be more than lifecycle.infrequent_after_days",
            ),
            (
                format!("{AUCTIONS}lifecycle: {{ expire_after_days: 0 }}\n"),
                "at least 1",
            ),
            (format!("major: 0\n{AUCTIONS}"), "from 1 to 9999"),
            (format!("{AUCTIONS}producers: [Bid_Service]\n"), "application"),
            (format!("{AUCTIONS}consumers: [a, a]\n"), "named twice"),
            (format!("{AUCTIONS}size: XL\n"), "not valid"),
            (format!("{AUCTIONS}scope: secret\n"), "not valid"),
            (format!("{AUCTIONS}encoding: avro\n"), "not valid"),
            (
                AUCTIONS.replace("type: float64 }", "type: float64, pii: maybe }"),
                "not valid",
            ),
        ];
        for (text, want) in cases {
            let err = DatasetSpec::from_yaml(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn checks_quality_rules() {
        let ok = format!(
            "{AUCTIONS}quality:\n  - {{ name: ids, check: not_null, field: event_id }}\n  - {{ name: cpm_sane, check: range, field: cpm, min: 0, max: 500 }}\n  - {{ name: fresh, check: freshness, max_delay_minutes: 30 }}\n"
        );
        let s = DatasetSpec::from_yaml(&ok).expect("valid");
        assert_eq!(s.quality.len(), 3);
        // Each rule of QualityRule::check, one case each.
        let cases = [
            ("field: event_id }", "field: nope }", "not declared"),
            ("check: not_null, field: event_id", "check: not_null", "needs a field"),
            ("min: 0, max: 500", "min: 600, max: 500", "min is above max"),
            ("field: cpm, min: 0, max: 500", "field: cpm", "needs min or max"),
            (
                "check: range, field: cpm",
                "check: range, field: client_id",
                "int64 or float64",
            ),
            ("max_delay_minutes: 30", "max_delay_minutes: 0", "at least 1"),
            ("check: freshness,", "check: freshness, field: ts,", "takes no field"),
            ("field: event_id }", "field: event_id, min: 1 }", "another check"),
            ("check: not_null", "check: sometimes", "not valid"),
            ("name: ids", "name: cpm_sane", "declared twice"),
        ];
        for (from, to, want) in cases {
            assert!(ok.contains(from), "{from:?}");
            let text = ok.replacen(from, to, 1);
            let err = DatasetSpec::from_yaml(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn checks_rollups() {
        let base = AUCTIONS.replace(
            "  - { name: cpm, type: float64 }",
            "  - { name: cpm, type: float64 }\n  - { name: bidder, type: string }",
        );
        let ok = format!(
            "{base}rollups:\n  - name: by_bidder\n    dimensions: [bidder]\n    metrics:\n      - {{ name: events, fn: count }}\n      - {{ name: revenue, fn: sum, field: cpm }}\n      - {{ name: p, fn: percentiles, field: cpm }}\n      - {{ name: users, fn: distinct, field: bidder }}\n"
        );
        let s = DatasetSpec::from_yaml(&ok).expect("valid rollup");
        let r = &s.rollups[0];
        assert_eq!(r.grains, vec![crate::rollup::Grain::Hour, crate::rollup::Grain::Day]);
        assert_eq!(r.retention_days(), 93);
        // Each rule of Rollup::check, one case each: the edit and what the error must say.
        let cases = [
            ("dimensions: [bidder]", "dimensions: [nope]", "is not declared"),
            (
                "dimensions: [bidder]",
                "dimensions: [cpm]",
                "must be string, int64 or bool",
            ),
            ("dimensions: [bidder]", "dimensions: [client_id]", "is the tenant"),
            ("dimensions: [bidder]", "dimensions: [bidder, bidder]", "named twice"),
            (
                "dimensions: [bidder]",
                "dimensions: [a, b, c, d, e, f, g, h, i]",
                "at most 8",
            ),
            (
                "name: events, fn: count }",
                "name: events, fn: count, field: cpm }",
                "takes no field",
            ),
            (
                "name: revenue, fn: sum, field: cpm",
                "name: revenue, fn: sum",
                "needs a field",
            ),
            (
                "name: revenue, fn: sum, field: cpm",
                "name: revenue, fn: sum, field: bidder",
                "must be int64 or float64",
            ),
            (
                "name: revenue, fn: sum, field: cpm",
                "name: revenue, fn: sum, field: zz",
                "not declared",
            ),
            (
                "name: users, fn: distinct, field: bidder",
                "name: users, fn: distinct, field: cpm",
                "must be string or int64",
            ),
            ("name: revenue,", "name: bidder,", "is taken"),
            ("name: revenue,", "name: events,", "is taken"),
            ("name: revenue,", "name: bucket,", "is taken"),
            ("name: revenue, fn: sum", "name: revenue, fn: median", "not valid"),
            ("name: by_bidder", "name: By-Bidder", "rollup"),
            (
                "dimensions: [bidder]",
                "dimensions: [bidder]\n    grains: []",
                "at least one grain",
            ),
            (
                "dimensions: [bidder]",
                "dimensions: [bidder]\n    grains: [hour, hour]",
                "grain twice",
            ),
            (
                "dimensions: [bidder]",
                "dimensions: [bidder]\n    grains: [week]",
                "not valid",
            ),
            (
                "dimensions: [bidder]",
                "dimensions: [bidder]\n    retention_days: 0",
                "from 1 to 3660",
            ),
            (
                "partitioning: { tenant: client_id }",
                "partitioning: {}",
                "needs a tenant",
            ),
        ];
        for (from, to, want) in cases {
            assert!(ok.contains(from), "{from:?} is not in the descriptor");
            let text = ok.replacen(from, to, 1);
            let err = DatasetSpec::from_yaml(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let twice = format!("{ok}  - name: by_bidder\n    metrics: [{{ name: n, fn: count }}]\n");
        let err = DatasetSpec::from_yaml(&twice).expect_err("twice").to_string();
        assert!(err.contains("declared twice"), "{err}");
    }

    fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn infers_a_contract() {
        let evs = [
            obj(serde_json::json!({"ts": "2026-11-22T10:00:00Z", "client_id": "acme", "n": 1, "x": {"a": 1}})),
            obj(serde_json::json!({"ts": 1763805600000_i64, "client_id": "beta", "n": 2.5, "ok": true})),
        ];
        let s = DatasetSpec::infer("clicks", &evs).expect("inferred");
        assert_eq!(s.event_time.as_deref(), Some("ts"));
        assert_eq!(s.tenant(), Some("client_id"));
        assert_eq!(s.event_id, "event_id");
        let ty = |n: &str| s.field(n).map(|f| f.ty);
        assert_eq!(ty("ts"), Some(FieldType::Timestamp));
        assert_eq!(ty("n"), Some(FieldType::Float64));
        assert_eq!(ty("x"), Some(FieldType::Json));
        assert_eq!(ty("ok"), Some(FieldType::Bool));
        assert_eq!(ty("event_id"), Some(FieldType::String));
        assert!(s.inferred);
    }

    #[test]
    fn infers_without_time_or_tenant() {
        let evs = [obj(serde_json::json!({"a": "x"})), obj(serde_json::json!({"b": 1}))];
        let s = DatasetSpec::infer("misc", &evs).expect("inferred");
        assert_eq!(s.event_time, None);
        assert_eq!(s.tenant(), None);
        let bad = [obj(serde_json::json!({"a-b": 1}))];
        assert!(DatasetSpec::infer("misc", &bad).is_err());
    }

    #[test]
    fn dead_letter_contracts_are_system_only() {
        let s = DatasetSpec::rejected_of("auctions").expect("spec");
        assert_eq!(s.name, "auctions__rejected");
        assert!(s.system && s.tenant().is_none());
        assert!(DatasetSpec::rejected_of("bad__name").is_err());
        // A descriptor cannot claim the name, nor the system flag for another name.
        let declared = AUCTIONS.replace("name: auctions", "name: auctions__rejected");
        assert!(DatasetSpec::from_yaml(&declared).is_err());
        let sneaky = format!("{AUCTIONS}system: true\n");
        let err = DatasetSpec::from_yaml(&sneaky).expect_err("system").to_string();
        assert!(err.contains("a descriptor cannot set it"), "{err}");
    }

    #[test]
    fn days() {
        assert_eq!(day_of_micros(0), "1970-01-01");
        assert_eq!(day_of_micros(-1), "1969-12-31");
        let t = parse_rfc3339_micros("2026-11-22T23:59:59.999999-01:00").expect("parses");
        assert_eq!(day_of_micros(t), "2026-11-23");
    }

    /// The digit-by-digit days agree with chrono's formatting: on every day of 1900 to 2200
    /// and around the years 0 and 10000 (where the digits end), at both ends of each day, and
    /// at the ends of the range.
    #[test]
    fn days_match_chrono_formatting() {
        let chrono_day = |micros: i64| match chrono::DateTime::from_timestamp(micros.div_euclid(1_000_000), 0) {
            Some(t) => t.format("%Y-%m-%d").to_string(),
            None => "1970-01-01".to_string(),
        };
        let day_us = 86_400_000_000_i64;
        // 365.2425 days a year.
        let day_of_year = |y: i64| (y - 1970) * 3_652_425 / 10_000 * day_us;
        let mut days = DayOf::default();
        for (from, to) in [(-2, 2), (1900, 2200), (9998, 10_002)] {
            let mut t = day_of_year(from);
            while t < day_of_year(to) {
                for m in [t, t + day_us - 1] {
                    assert_eq!(day_of_micros(m), chrono_day(m), "{m}");
                    assert_eq!(days.of(m), chrono_day(m), "{m}");
                }
                t += day_us;
            }
        }
        for m in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
            assert_eq!(day_of_micros(m), chrono_day(m), "{m}");
            assert_eq!(days.of(m), chrono_day(m), "{m}");
        }
        assert_eq!(day_of_micros(253_402_300_800_000_000), "+10000-01-01");
    }

    /// Days met out of order come back from the kept ones, and a day pushed out by newer ones
    /// is written again, right.
    #[test]
    fn days_kept_out_of_order() {
        let day_us = 86_400_000_000_i64;
        let mut days = DayOf::default();
        let order: Vec<i64> = (0..200).map(|i| (i * 7919) % 41 - 20).collect();
        for d in order {
            let t = d * day_us + d.rem_euclid(3) * 3_600_000_000;
            assert_eq!(days.of(t), day_of_micros(t), "{t}");
        }
    }

    fn chrono_micros(s: &str) -> Option<i64> {
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_micros())
    }

    #[test]
    fn common_timestamps_take_the_fast_path() {
        for (text, micros) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2025-11-22T10:00:00.250Z", 1_763_805_600_250_000),
            ("2024-02-29T23:59:59.999999999Z", 1_709_251_199_999_999),
            ("1969-12-31T23:59:59.9Z", -100_000),
            ("0000-03-01T00:00:00Z", -62_162_035_200_000_000),
            ("9999-12-31T23:59:59.123456Z", 253_402_300_799_123_456),
        ] {
            assert_eq!(utc_micros_fast(text.as_bytes()), Some(micros), "{text}");
            assert_eq!(chrono_micros(text), Some(micros), "{text}");
        }
        // Left to chrono: offsets, leap seconds, ten fraction digits, other separators.
        for text in [
            "2026-11-22T10:00:00+01:00",
            "2016-12-31T23:59:60Z",
            "2026-11-22T10:00:00.1234567890Z",
            "2026-11-22t10:00:00z",
            "2026-11-22 10:00:00Z",
        ] {
            assert_eq!(utc_micros_fast(text.as_bytes()), None, "{text}");
            assert_eq!(parse_rfc3339_micros(text), chrono_micros(text), "{text}");
            assert!(parse_rfc3339_micros(text).is_some(), "{text}");
        }
        for bad in [
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T10:00:00.Z",
        ] {
            assert_eq!(utc_micros_fast(bad.as_bytes()), None, "{bad}");
            assert_eq!(parse_rfc3339_micros(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 4000, ..Default::default() })]
        /// Wherever the fast path gives a value, chrono gives the same: on text built from the
        /// layout's pieces, in range or not, with the odd byte changed.
        #[test]
        fn fast_timestamps_agree_with_chrono(
            y in 0u32..10_000, mo in 0u32..14, d in 0u32..33, h in 0u32..26, mi in 0u32..62, s in 0u32..62,
            frac in proptest::option::of("[0-9]{0,11}"),
            zone in proptest::sample::select(vec!["Z", "z", "+00:00", "", "ZZ"]),
            poke in proptest::option::of((0usize..32, proptest::sample::select(vec![b'-', b'T', b'0', b'9', b':', b'.', b'a']))),
        ) {
            let mut text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
            if let Some(f) = frac {
                text.push('.');
                text.push_str(&f);
            }
            text.push_str(zone);
            let mut bytes = text.into_bytes();
            if let Some((slot, b)) = poke.and_then(|(at, b)| Some((bytes.get_mut(at)?, b))) {
                *slot = b;
            }
            let text = String::from_utf8(bytes).expect("ASCII");
            if let Some(v) = utc_micros_fast(text.as_bytes()) {
                proptest::prop_assert_eq!(Some(v), chrono_micros(&text), "{}", text);
            }
            proptest::prop_assert_eq!(parse_rfc3339_micros(&text), chrono_micros(&text), "{}", text);
        }
    }
}
