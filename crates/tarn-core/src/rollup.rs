//! Rollup declarations: aggregations (dimensions x metrics x time grains) that a dataset's
//! descriptor asks tarn to keep current from every raw batch, for dashboards that need answers
//! in milliseconds. The executor lives in tarn-query (`rollup/`); this is the contract only.

use serde::{Deserialize, Serialize};

use crate::contract::{DatasetSpec, FieldType};
use crate::name;

/// The time grain of a rollup bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grain {
    Minute,
    Hour,
    Day,
}

impl Grain {
    pub const ALL: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

    /// Bucket width in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Grain::Minute => 60,
            Grain::Hour => 3_600,
            Grain::Day => 86_400,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Grain::Minute => "minute",
            Grain::Hour => "hour",
            Grain::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Grain> {
        Grain::ALL.into_iter().find(|g| g.as_str() == s)
    }

    /// The start (epoch seconds) of the bucket holding `secs`.
    pub fn bucket_of(self, secs: i64) -> i64 {
        secs - secs.rem_euclid(self.seconds())
    }
}

/// What a metric computes over the events of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricFn {
    /// Number of events; takes no field.
    Count,
    /// Sum of a numeric field (nulls skipped).
    Sum,
    Min,
    Max,
    /// Sum divided by the number of non-null values.
    Mean,
    /// Approximate number of distinct values (HyperLogLog, 4096 registers: standard error
    /// 1.6%).
    Distinct,
    /// Approximate quantiles of a numeric field (DDSketch: every quantile within 1% of the
    /// true value's magnitude); the quantiles are chosen when reading.
    Percentiles,
}

impl MetricFn {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricFn::Count => "count",
            MetricFn::Sum => "sum",
            MetricFn::Min => "min",
            MetricFn::Max => "max",
            MetricFn::Mean => "mean",
            MetricFn::Distinct => "distinct",
            MetricFn::Percentiles => "percentiles",
        }
    }
}

/// One metric of a rollup: its output name, function and input field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    pub name: String,
    #[serde(rename = "fn")]
    pub func: MetricFn,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A declared rollup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollup {
    /// Unique among all datasets' rollups; the API addresses it as `/v1/rollups/{name}`.
    pub name: String,
    /// Fields to group by besides the tenant (always the first dimension), at most 8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<String>,
    pub metrics: Vec<Metric>,
    /// Grains kept; default hour and day.
    #[serde(default = "default_grains")]
    pub grains: Vec<Grain>,
    /// Days a bucket is kept after the day it starts in (default 93, from 1 to 3660).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
}

fn default_grains() -> Vec<Grain> {
    vec![Grain::Hour, Grain::Day]
}

impl Rollup {
    pub const RETENTION_DAYS_DEFAULT: u32 = 93;
    pub const DIMENSIONS_MAX: usize = 8;
    pub const METRICS_MAX: usize = 32;

    pub fn retention_days(&self) -> u32 {
        self.retention_days.unwrap_or(Self::RETENTION_DAYS_DEFAULT)
    }

    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.name == name)
    }

    /// Checks the rollup against its dataset's contract.
    pub fn check(&self, spec: &DatasetSpec) -> std::result::Result<(), String> {
        name::check_dataset(&self.name).map_err(|e| format!("rollup: {e}"))?;
        let r = &self.name;
        if spec.tenant().is_none() {
            return Err(format!(
                "rollup {r:?} needs a tenant: declare partitioning.tenant in the dataset"
            ));
        }
        if self.dimensions.len() > Self::DIMENSIONS_MAX {
            return Err(format!(
                "rollup {r:?} has {} dimensions; at most {}",
                self.dimensions.len(),
                Self::DIMENSIONS_MAX
            ));
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.dimensions {
            if Some(d.as_str()) == spec.tenant() {
                return Err(format!(
                    "rollup {r:?}: dimension {d:?} is the tenant, which every rollup groups by already"
                ));
            }
            match spec.field(d).map(|f| f.ty) {
                Some(FieldType::String | FieldType::Int64 | FieldType::Bool) => {}
                Some(t) => {
                    return Err(format!(
                        "rollup {r:?}: dimension {d:?} is {}; dimensions must be string, int64 or bool",
                        t.as_str()
                    ));
                }
                None => return Err(format!("rollup {r:?}: dimension {d:?} is not declared")),
            }
            if !names.insert(d.as_str()) {
                return Err(format!("rollup {r:?}: dimension {d:?} is named twice"));
            }
        }
        if self.metrics.is_empty() || self.metrics.len() > Self::METRICS_MAX {
            return Err(format!(
                "rollup {r:?} has {} metrics; it needs 1 to {}",
                self.metrics.len(),
                Self::METRICS_MAX
            ));
        }
        for m in &self.metrics {
            name::check_field(&m.name).map_err(|e| format!("rollup {r:?}: metric {e}"))?;
            if m.name == "bucket" || Some(m.name.as_str()) == spec.tenant() || !names.insert(m.name.as_str()) {
                return Err(format!(
                    "rollup {r:?}: metric name {:?} is taken (by a dimension, another metric, the tenant or bucket)",
                    m.name
                ));
            }
            let ty = m.field.as_deref().map(|f| (f, spec.field(f).map(|x| x.ty)));
            let numeric = matches!(ty, Some((_, Some(FieldType::Int64 | FieldType::Float64))));
            match (m.func, ty) {
                (MetricFn::Count, None) => {}
                (MetricFn::Count, Some(_)) => {
                    return Err(format!("rollup {r:?}: metric {:?} (count) takes no field", m.name));
                }
                (f, None) => {
                    return Err(format!(
                        "rollup {r:?}: metric {:?} ({}) needs a field",
                        m.name,
                        f.as_str()
                    ));
                }
                (_, Some((f, None))) => {
                    return Err(format!(
                        "rollup {r:?}: metric {:?} reads {f:?}, which is not declared",
                        m.name
                    ));
                }
                (MetricFn::Distinct, Some((_, Some(FieldType::String | FieldType::Int64)))) => {}
                (MetricFn::Distinct, Some((f, Some(t)))) => {
                    return Err(format!(
                        "rollup {r:?}: metric {:?} counts distinct {f:?}, which is {}; it must be string or int64",
                        m.name,
                        t.as_str()
                    ));
                }
                (_, Some(_)) if numeric => {}
                (func, Some((f, Some(t)))) => {
                    return Err(format!(
                        "rollup {r:?}: metric {:?} ({}) reads {f:?}, which is {}; it must be int64 or float64",
                        m.name,
                        func.as_str(),
                        t.as_str()
                    ));
                }
            }
        }
        if self.grains.is_empty() {
            return Err(format!("rollup {r:?} needs at least one grain"));
        }
        let mut grains = self.grains.clone();
        grains.sort();
        grains.dedup();
        if grains.len() != self.grains.len() {
            return Err(format!("rollup {r:?} names a grain twice"));
        }
        if !(1..=3660).contains(&self.retention_days()) {
            return Err(format!(
                "rollup {r:?}: retention_days is {}; it must be from 1 to 3660",
                self.retention_days()
            ));
        }
        Ok(())
    }
}
