//! The in-memory state of one rollup: per grain, per tenant, per bucket, three cuboids of
//! accumulators: the bucket's total, one map per dimension alone, and one map over all
//! dimensions together. A read with no group-by uses the total, a group-by on one dimension
//! without filters uses that dimension's map, anything else the full map; so the common
//! dashboard reads touch one accumulator per bucket (or one per group), never every row.
//!
//! A raw batch is first folded into a small cube of its own (`Cube::from_batch`, no lock
//! held), which is then merged into the live cube; merging is the only way state grows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use deltalake::arrow::array::{
    Array, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, TimeUnit};
use serde_json::Value;
use tarn_core::{DatasetSpec, FieldType, Grain, MetricFn, Rollup};

use super::codec::{Reader, Writer};
use super::sketch::{DdSketch, Hll, hash64};

/// A dimension value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Null,
    Bool(bool),
    Int(i64),
    Str(Box<str>),
}

impl Dim {
    pub fn to_json(&self) -> Value {
        match self {
            Dim::Null => Value::Null,
            Dim::Bool(b) => Value::Bool(*b),
            Dim::Int(i) => Value::from(*i),
            Dim::Str(s) => Value::from(s.as_ref()),
        }
    }

    /// Parses a filter value given as text for a dimension of this type.
    pub fn parse(ty: FieldType, text: &str) -> Option<Dim> {
        if text == "null" {
            return Some(Dim::Null);
        }
        match ty {
            FieldType::Bool => text.parse().ok().map(Dim::Bool),
            FieldType::Int64 => text.parse().ok().map(Dim::Int),
            _ => Some(Dim::Str(text.into())),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            Dim::Null => w.u8(0),
            Dim::Bool(b) => w.u8(if *b { 2 } else { 1 }),
            Dim::Int(i) => {
                w.u8(3);
                w.zigzag(*i);
            }
            Dim::Str(s) => {
                w.u8(4);
                w.str(s);
            }
        }
    }

    fn decode(r: &mut Reader) -> Result<Dim, String> {
        Ok(match r.u8()? {
            0 => Dim::Null,
            1 => Dim::Bool(false),
            2 => Dim::Bool(true),
            3 => Dim::Int(r.zigzag()?),
            4 => Dim::Str(r.str()?.into()),
            t => return Err(format!("dimension tag {t}")),
        })
    }
}

/// How one metric is kept, from its function and its field's type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kind {
    pub func: MetricFn,
    /// The field is int64 (sums and extremes stay exact integers).
    pub int: bool,
}

/// The state of one metric in one accumulator.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Count,
    SumI { sum: i128, n: u64 },
    SumF { sum: f64, n: u64 },
    MinI(Option<i64>),
    MaxI(Option<i64>),
    MinF(Option<f64>),
    MaxF(Option<f64>),
    Mean { sum: f64, n: u64 },
    MeanI { sum: i128, n: u64 },
    // Boxed: most accumulators are small, and the enum stays the size of a sum.
    Distinct(Box<Hll>),
    Pct(Box<DdSketch>),
}

impl State {
    fn new(k: Kind) -> State {
        match (k.func, k.int) {
            (MetricFn::Count, _) => State::Count,
            (MetricFn::Sum, true) => State::SumI { sum: 0, n: 0 },
            (MetricFn::Sum, false) => State::SumF { sum: 0.0, n: 0 },
            (MetricFn::Min, true) => State::MinI(None),
            (MetricFn::Max, true) => State::MaxI(None),
            (MetricFn::Min, false) => State::MinF(None),
            (MetricFn::Max, false) => State::MaxF(None),
            (MetricFn::Mean, true) => State::MeanI { sum: 0, n: 0 },
            (MetricFn::Mean, false) => State::Mean { sum: 0.0, n: 0 },
            (MetricFn::Distinct, _) => State::Distinct(Box::default()),
            (MetricFn::Percentiles, _) => State::Pct(Box::default()),
        }
    }

    fn merge(&mut self, o: &State) {
        fn opt<T: Copy>(a: &mut Option<T>, b: Option<T>, pick: fn(T, T) -> T) {
            *a = match (*a, b) {
                (Some(x), Some(y)) => Some(pick(x, y)),
                (x, y) => x.or(y),
            };
        }
        match (self, o) {
            (State::Count, State::Count) => {}
            (State::SumI { sum, n }, State::SumI { sum: s, n: m })
            | (State::MeanI { sum, n }, State::MeanI { sum: s, n: m }) => {
                *sum += s;
                *n += m;
            }
            (State::SumF { sum, n }, State::SumF { sum: s, n: m })
            | (State::Mean { sum, n }, State::Mean { sum: s, n: m }) => {
                *sum += s;
                *n += m;
            }
            (State::MinI(a), State::MinI(b)) => opt(a, *b, i64::min),
            (State::MaxI(a), State::MaxI(b)) => opt(a, *b, i64::max),
            (State::MinF(a), State::MinF(b)) => opt(a, *b, f64::min),
            (State::MaxF(a), State::MaxF(b)) => opt(a, *b, f64::max),
            (State::Distinct(a), State::Distinct(b)) => a.merge(b),
            (State::Pct(a), State::Pct(b)) => a.merge(b),
            // Accumulators of one rollup always hold the same kinds in the same order.
            _ => {}
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            State::Count => {}
            State::SumI { sum, n } | State::MeanI { sum, n } => {
                w.bytes(&sum.to_le_bytes());
                w.varint(*n);
            }
            State::SumF { sum, n } | State::Mean { sum, n } => {
                w.f64(*sum);
                w.varint(*n);
            }
            State::MinI(v) | State::MaxI(v) => match v {
                None => w.u8(0),
                Some(x) => {
                    w.u8(1);
                    w.zigzag(*x);
                }
            },
            State::MinF(v) | State::MaxF(v) => match v {
                None => w.u8(0),
                Some(x) => {
                    w.u8(1);
                    w.f64(*x);
                }
            },
            State::Distinct(h) => h.encode(w),
            State::Pct(p) => p.encode(w),
        }
    }

    fn decode(k: Kind, r: &mut Reader) -> Result<State, String> {
        let int = |r: &mut Reader| -> Result<(i128, u64), String> {
            let b = r.take(16)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Ok((i128::from_le_bytes(a), r.varint()?))
        };
        let opt_i =
            |r: &mut Reader| -> Result<Option<i64>, String> { Ok(if r.u8()? == 0 { None } else { Some(r.zigzag()?) }) };
        let opt_f =
            |r: &mut Reader| -> Result<Option<f64>, String> { Ok(if r.u8()? == 0 { None } else { Some(r.f64()?) }) };
        Ok(match State::new(k) {
            State::Count => State::Count,
            State::SumI { .. } => {
                let (sum, n) = int(r)?;
                State::SumI { sum, n }
            }
            State::MeanI { .. } => {
                let (sum, n) = int(r)?;
                State::MeanI { sum, n }
            }
            State::SumF { .. } => State::SumF {
                sum: r.f64()?,
                n: r.varint()?,
            },
            State::Mean { .. } => State::Mean {
                sum: r.f64()?,
                n: r.varint()?,
            },
            State::MinI(_) => State::MinI(opt_i(r)?),
            State::MaxI(_) => State::MaxI(opt_i(r)?),
            State::MinF(_) => State::MinF(opt_f(r)?),
            State::MaxF(_) => State::MaxF(opt_f(r)?),
            State::Distinct(_) => State::Distinct(Box::new(Hll::decode(r)?)),
            State::Pct(_) => State::Pct(Box::new(DdSketch::decode(r)?)),
        })
    }

    /// The metric's value as JSON; `quantiles` applies to percentiles.
    pub fn value(&self, events: u64, quantiles: &[f64]) -> Value {
        let num = |x: f64| {
            serde_json::Number::from_f64(x)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        };
        let int = |x: i128| match i64::try_from(x) {
            Ok(v) => Value::from(v),
            Err(_) => num(x as f64),
        };
        match self {
            State::Count => Value::from(events),
            State::SumI { n: 0, .. } | State::MeanI { n: 0, .. } => Value::Null,
            State::SumF { n: 0, .. } | State::Mean { n: 0, .. } => Value::Null,
            State::SumI { sum, .. } => int(*sum),
            State::SumF { sum, .. } => num(*sum),
            State::MeanI { sum, n } => num(*sum as f64 / *n as f64),
            State::Mean { sum, n } => num(*sum / *n as f64),
            State::MinI(v) | State::MaxI(v) => v.map(Value::from).unwrap_or(Value::Null),
            State::MinF(v) | State::MaxF(v) => v.map(num).unwrap_or(Value::Null),
            State::Distinct(h) => Value::from(h.estimate().round() as u64),
            State::Pct(p) => {
                if p.count() == 0 {
                    return Value::Null;
                }
                let mut m = serde_json::Map::new();
                for q in quantiles {
                    let v = p.quantile(*q).map(num).unwrap_or(Value::Null);
                    m.insert(quantile_name(*q), v);
                }
                Value::Object(m)
            }
        }
    }

    /// A number to order groups by (top-N); None sorts last.
    pub fn order_key(&self, events: u64) -> Option<f64> {
        match self {
            State::Count => Some(events as f64),
            State::SumI { sum, n } if *n > 0 => Some(*sum as f64),
            State::SumF { sum, n } if *n > 0 => Some(*sum),
            State::MeanI { sum, n } if *n > 0 => Some(*sum as f64 / *n as f64),
            State::Mean { sum, n } if *n > 0 => Some(*sum / *n as f64),
            State::MinI(v) | State::MaxI(v) => v.map(|x| x as f64),
            State::MinF(v) | State::MaxF(v) => *v,
            State::Distinct(h) => Some(h.estimate()),
            State::Pct(p) => p.quantile(0.5),
            _ => None,
        }
    }
}

/// `0.5` -> `p50`, `0.999` -> `p99.9`.
pub fn quantile_name(q: f64) -> String {
    let pct = (q * 100_000.0).round() / 1000.0;
    format!("p{pct}")
}

/// The events of one group in one bucket and their metric states.
#[derive(Debug, Clone, PartialEq)]
pub struct Acc {
    pub events: u64,
    pub states: Vec<State>,
}

impl Acc {
    fn new(kinds: &[Kind]) -> Acc {
        Acc {
            events: 0,
            states: kinds.iter().map(|k| State::new(*k)).collect(),
        }
    }

    pub fn merge(&mut self, o: &Acc) {
        self.events += o.events;
        for (a, b) in self.states.iter_mut().zip(&o.states) {
            a.merge(b);
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.varint(self.events);
        for s in &self.states {
            s.encode(w);
        }
    }

    fn decode(kinds: &[Kind], r: &mut Reader) -> Result<Acc, String> {
        let events = r.varint()?;
        let states = kinds.iter().map(|k| State::decode(*k, r)).collect::<Result<_, _>>()?;
        Ok(Acc { events, states })
    }
}

/// One bucket of one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub total: Acc,
    /// One map per dimension, by that dimension's value.
    pub by_dim: Vec<HashMap<Dim, Acc>>,
    /// By every dimension's value, in declaration order; kept only with two or more dimensions
    /// (with one it is `by_dim[0]`).
    pub full: HashMap<Box<[Dim]>, Acc>,
}

impl Bucket {
    fn new(def: &Def) -> Bucket {
        Bucket {
            total: Acc::new(&def.kinds),
            by_dim: vec![HashMap::new(); def.dims.len()],
            full: HashMap::new(),
        }
    }

    /// Accumulators held: the unit of the groups limit.
    pub fn groups(&self) -> usize {
        1 + self.by_dim.iter().map(HashMap::len).sum::<usize>() + self.full.len()
    }

    fn merge(&mut self, o: &Bucket) -> usize {
        let before = self.groups();
        self.total.merge(&o.total);
        for (mine, theirs) in self.by_dim.iter_mut().zip(&o.by_dim) {
            for (k, a) in theirs {
                match mine.get_mut(k) {
                    Some(m) => m.merge(a),
                    None => {
                        mine.insert(k.clone(), a.clone());
                    }
                }
            }
        }
        for (k, a) in &o.full {
            match self.full.get_mut(k) {
                Some(m) => m.merge(a),
                None => {
                    self.full.insert(k.clone(), a.clone());
                }
            }
        }
        self.groups() - before
    }
}

/// A rollup definition compiled against its dataset's contract.
#[derive(Debug, Clone, PartialEq)]
pub struct Def {
    pub spec: Rollup,
    pub dataset: String,
    pub tenant: String,
    /// The timestamp column whose value places an event in a bucket.
    pub time: String,
    /// The dimensions and their types.
    pub dims: Vec<(String, FieldType)>,
    pub kinds: Vec<Kind>,
    /// The dataset's major version: batches written under another are not folded (a new
    /// major version starts the rollup afresh, as it starts the table).
    pub major: u32,
}

impl Def {
    pub fn new(spec: &DatasetSpec, rollup: &Rollup) -> Result<Def, String> {
        rollup.check(spec)?;
        let tenant = spec.tenant().ok_or("rollup needs a tenant")?.to_string();
        let ty = |f: &str| spec.field(f).map(|x| x.ty);
        Ok(Def {
            spec: rollup.clone(),
            dataset: spec.name.clone(),
            tenant,
            time: spec
                .event_time
                .clone()
                .unwrap_or_else(|| tarn_core::contract::RECEIVED_AT.to_string()),
            dims: rollup
                .dimensions
                .iter()
                .map(|d| (d.clone(), ty(d).unwrap_or(FieldType::String)))
                .collect(),
            kinds: rollup
                .metrics
                .iter()
                .map(|m| Kind {
                    func: m.func,
                    int: m.field.as_deref().and_then(ty) == Some(FieldType::Int64),
                })
                .collect(),
            major: spec.major,
        })
    }

    /// What must match for persisted state to be read with this definition: everything but
    /// the retention.
    pub fn fingerprint(&self) -> String {
        let mut r = self.spec.clone();
        r.retention_days = None;
        let major = if self.major > 1 {
            format!("|major {}", self.major)
        } else {
            String::new()
        };
        format!(
            "{}|{}|{}|{:?}|{}{major}",
            self.dataset,
            self.tenant,
            self.time,
            self.dims,
            serde_json::to_string(&r).unwrap_or_default()
        )
    }
}

/// A column read for a rollup, cast to the one type the rollup reads it as.
enum Col {
    Str(StringArray),
    Int(Int64Array),
    Float(Float64Array),
    Bool(BooleanArray),
}

impl Col {
    fn read(batch: &RecordBatch, name: &str, ty: FieldType) -> Result<Col, String> {
        let Some(c) = batch.column_by_name(name) else {
            // A batch written before the field was added to the contract: nulls.
            let n = batch.num_rows();
            return Ok(match ty {
                FieldType::Int64 | FieldType::Timestamp => Col::Int(Int64Array::new_null(n)),
                FieldType::Float64 => Col::Float(Float64Array::new_null(n)),
                FieldType::Bool => Col::Bool(BooleanArray::new_null(n)),
                _ => Col::Str(StringArray::new_null(n)),
            });
        };
        if ty == FieldType::Timestamp {
            let t = cast(c, &DataType::Timestamp(TimeUnit::Microsecond, None))
                .map_err(|e| format!("column {name}: {e}"))?;
            let t = t
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .ok_or_else(|| format!("column {name} did not cast to a timestamp"))?
                .reinterpret_cast::<deltalake::arrow::datatypes::Int64Type>();
            return Ok(Col::Int(t));
        }
        let to = match ty {
            FieldType::Int64 => DataType::Int64,
            FieldType::Float64 => DataType::Float64,
            FieldType::Bool => DataType::Boolean,
            _ => DataType::Utf8,
        };
        let c = cast(c, &to).map_err(|e| format!("column {name}: {e}"))?;
        let any = c.as_any();
        let bad = || format!("column {name} did not cast to {to}");
        Ok(match to {
            DataType::Int64 => Col::Int(any.downcast_ref::<Int64Array>().ok_or_else(bad)?.clone()),
            DataType::Float64 => Col::Float(any.downcast_ref::<Float64Array>().ok_or_else(bad)?.clone()),
            DataType::Boolean => Col::Bool(any.downcast_ref::<BooleanArray>().ok_or_else(bad)?.clone()),
            _ => Col::Str(any.downcast_ref::<StringArray>().ok_or_else(bad)?.clone()),
        })
    }

    fn dim(&self, i: usize) -> Dim {
        match self {
            Col::Str(a) if a.is_valid(i) => Dim::Str(a.value(i).into()),
            Col::Int(a) if a.is_valid(i) => Dim::Int(a.value(i)),
            Col::Bool(a) if a.is_valid(i) => Dim::Bool(a.value(i)),
            Col::Float(a) if a.is_valid(i) => Dim::Int(a.value(i) as i64),
            _ => Dim::Null,
        }
    }
}

/// Per grain, per tenant, per bucket start (epoch seconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cube {
    pub grains: BTreeMap<Grain, HashMap<Arc<str>, BTreeMap<i64, Bucket>>>,
    /// Accumulators held, over every grain.
    pub groups: usize,
}

impl Cube {
    /// Folds the rows of a batch that `keep` accepts into a new cube, leaving out rows whose
    /// day starts before `cutoff_secs` (or without a time or tenant). Returns the cube, the
    /// rows folded in and the rows left out.
    pub fn from_batch(
        def: &Def,
        batch: &RecordBatch,
        cutoff_secs: i64,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<(Cube, u64, u64), String> {
        let mut cube = Cube::default();
        let (applied, skipped) = cube.fold(def, batch, cutoff_secs, keep)?;
        Ok((cube, applied, skipped))
    }

    /// Folds the rows of a batch into this cube, as `from_batch` does (the batches of one raw
    /// object go into one cube this way, without a merge per batch).
    pub fn fold(
        &mut self,
        def: &Def,
        batch: &RecordBatch,
        cutoff_secs: i64,
        keep: &dyn Fn(usize) -> bool,
    ) -> Result<(u64, u64), String> {
        let cube = self;
        let time = Col::read(batch, &def.time, FieldType::Timestamp)?;
        let Col::Int(time) = time else {
            return Err("time column".into());
        };
        let tenant = match Col::read(batch, &def.tenant, FieldType::String)? {
            Col::Str(s) => s,
            _ => return Err("tenant column".into()),
        };
        let dims = def
            .dims
            .iter()
            .map(|(n, t)| Col::read(batch, n, *t))
            .collect::<Result<Vec<_>, _>>()?;
        let fields = def
            .spec
            .metrics
            .iter()
            .zip(&def.kinds)
            .map(|(m, k)| match &m.field {
                None => Ok(None),
                Some(f) => {
                    let ty = if k.int {
                        FieldType::Int64
                    } else if k.func == MetricFn::Distinct {
                        FieldType::String
                    } else {
                        FieldType::Float64
                    };
                    Col::read(batch, f, ty).map(Some)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut skipped = 0u64;
        let mut applied = 0u64;
        let mut row_dims: Vec<Dim> = Vec::with_capacity(dims.len());
        for i in 0..batch.num_rows() {
            if !keep(i) {
                continue;
            }
            if time.is_null(i) || tenant.is_null(i) {
                skipped += 1;
                continue;
            }
            let secs = time.value(i).div_euclid(1_000_000);
            if Grain::Day.bucket_of(secs) < cutoff_secs {
                skipped += 1;
                continue;
            }
            applied += 1;
            row_dims.clear();
            row_dims.extend(dims.iter().map(|c| c.dim(i)));
            let t = tenant.value(i);
            for g in &def.spec.grains {
                let bucket = g.bucket_of(secs);
                let tenants = cube.grains.entry(*g).or_default();
                let buckets = match tenants.get_mut(t) {
                    Some(b) => b,
                    None => tenants.entry(Arc::from(t)).or_default(),
                };
                let b = buckets.entry(bucket).or_insert_with(|| {
                    cube.groups += 1;
                    Bucket::new(def)
                });
                update(&mut b.total, &fields, i);
                for (d, v) in row_dims.iter().enumerate() {
                    let m = &mut b.by_dim[d];
                    let acc = match m.get_mut(v) {
                        Some(a) => a,
                        None => {
                            cube.groups += 1;
                            m.entry(v.clone()).or_insert_with(|| Acc::new(&def.kinds))
                        }
                    };
                    update(acc, &fields, i);
                }
                if row_dims.len() > 1 {
                    let acc = match b.full.get_mut(row_dims.as_slice()) {
                        Some(a) => a,
                        None => {
                            cube.groups += 1;
                            b.full
                                .entry(row_dims.clone().into_boxed_slice())
                                .or_insert_with(|| Acc::new(&def.kinds))
                        }
                    };
                    update(acc, &fields, i);
                }
            }
        }
        Ok((applied, skipped))
    }

    fn count_groups(&self) -> usize {
        self.grains
            .values()
            .flat_map(|t| t.values())
            .flat_map(|b| b.values())
            .map(Bucket::groups)
            .sum()
    }

    /// Merges `other` into this cube, moving its buckets (no copy); returns the (grain,
    /// bucket) pairs touched.
    pub fn absorb(&mut self, other: Cube) -> Vec<(Grain, i64)> {
        let mut touched = Vec::new();
        for (g, tenants) in other.grains {
            let mine = self.grains.entry(g).or_default();
            for (t, buckets) in tenants {
                let mb = mine.entry(t).or_default();
                for (start, b) in buckets {
                    touched.push((g, start));
                    match mb.get_mut(&start) {
                        Some(m) => self.groups += m.merge(&b),
                        None => {
                            self.groups += b.groups();
                            mb.insert(start, b);
                        }
                    }
                }
            }
        }
        touched
    }

    /// Cuts this cube into parts of at most `buckets_max` buckets of one grain and tenant, so
    /// that each can be merged under a short hold of the lock that readers wait on.
    pub fn into_parts(self, buckets_max: usize) -> Vec<Cube> {
        let mut parts = Vec::new();
        for (g, tenants) in self.grains {
            for (t, buckets) in tenants {
                let mut part = BTreeMap::new();
                for (start, b) in buckets {
                    part.insert(start, b);
                    if part.len() >= buckets_max.max(1) {
                        parts.push(Cube::of(g, t.clone(), std::mem::take(&mut part)));
                    }
                }
                if !part.is_empty() {
                    parts.push(Cube::of(g, t, part));
                }
            }
        }
        parts
    }

    fn of(g: Grain, tenant: Arc<str>, buckets: BTreeMap<i64, Bucket>) -> Cube {
        let groups = buckets.values().map(Bucket::groups).sum();
        let mut grains = BTreeMap::new();
        grains.insert(g, HashMap::from([(tenant, buckets)]));
        Cube { grains, groups }
    }

    /// The accumulators merging `other` would add (those it holds that this cube lacks).
    pub fn new_groups(&self, other: &Cube) -> usize {
        let mut n = 0;
        for (g, tenants) in &other.grains {
            let mine = self.grains.get(g);
            for (t, buckets) in tenants {
                let mb = mine.and_then(|m| m.get(t));
                for (start, b) in buckets {
                    match mb.and_then(|m| m.get(start)) {
                        None => n += b.groups(),
                        Some(m) => {
                            n += b
                                .by_dim
                                .iter()
                                .zip(&m.by_dim)
                                .map(|(o, mine)| o.keys().filter(|k| !mine.contains_key(*k)).count())
                                .sum::<usize>();
                            n += b.full.keys().filter(|k| !m.full.contains_key(*k)).count();
                        }
                    }
                }
            }
        }
        n
    }

    /// Drops every bucket starting before `cutoff_secs`; returns the (grain, bucket) pairs
    /// dropped.
    pub fn expire(&mut self, cutoff_secs: i64) -> Vec<(Grain, i64)> {
        let mut dropped = Vec::new();
        let mut freed = 0;
        for (g, tenants) in &mut self.grains {
            for buckets in tenants.values_mut() {
                if buckets.first_key_value().is_none_or(|(k, _)| *k >= cutoff_secs) {
                    continue;
                }
                let keep = buckets.split_off(&cutoff_secs);
                for (start, b) in std::mem::replace(buckets, keep) {
                    freed += b.groups();
                    dropped.push((*g, start));
                }
            }
            tenants.retain(|_, b| !b.is_empty());
        }
        self.groups -= freed;
        dropped.sort_unstable();
        dropped.dedup();
        dropped
    }

    /// Removes the buckets of one grain in `[from, to)`, for every tenant.
    pub fn clear_range(&mut self, grain: Grain, from: i64, to: i64) {
        let mut freed = 0;
        if let Some(tenants) = self.grains.get_mut(&grain) {
            for buckets in tenants.values_mut() {
                let doomed: Vec<i64> = buckets.range(from..to).map(|(k, _)| *k).collect();
                for k in doomed {
                    if let Some(b) = buckets.remove(&k) {
                        freed += b.groups();
                    }
                }
            }
            tenants.retain(|_, b| !b.is_empty());
        }
        self.groups -= freed;
    }

    /// Encodes the buckets of one grain in `[from, to)`.
    pub fn encode_range(&self, grain: Grain, from: i64, to: i64) -> Vec<u8> {
        let mut w = Writer::default();
        let empty = HashMap::new();
        let tenants = self.grains.get(&grain).unwrap_or(&empty);
        let mut names: Vec<&Arc<str>> = tenants
            .iter()
            .filter(|(_, b)| b.range(from..to).next().is_some())
            .map(|(t, _)| t)
            .collect();
        names.sort();
        w.varint(names.len() as u64);
        for t in names {
            w.str(t);
            let buckets: Vec<(&i64, &Bucket)> = tenants[t].range(from..to).collect();
            w.varint(buckets.len() as u64);
            for (start, b) in buckets {
                w.zigzag(*start);
                b.total.encode(&mut w);
                for m in &b.by_dim {
                    w.varint(m.len() as u64);
                    for (k, a) in m {
                        k.encode(&mut w);
                        a.encode(&mut w);
                    }
                }
                w.varint(b.full.len() as u64);
                for (k, a) in &b.full {
                    for d in k.iter() {
                        d.encode(&mut w);
                    }
                    a.encode(&mut w);
                }
            }
        }
        w.into_bytes()
    }

    /// Decodes what `encode_range` wrote into this cube (merging with what is there).
    pub fn decode_into(&mut self, grain: Grain, def: &Def, bytes: &[u8]) -> Result<(), String> {
        let mut r = Reader::new(bytes);
        let mut part = Cube::default();
        let tenants = part.grains.entry(grain).or_default();
        for _ in 0..r.varint()? {
            let t: Arc<str> = Arc::from(r.str()?);
            let buckets = tenants.entry(t).or_default();
            for _ in 0..r.varint()? {
                let start = r.zigzag()?;
                let total = Acc::decode(&def.kinds, &mut r)?;
                let mut b = Bucket::new(def);
                b.total = total;
                for m in &mut b.by_dim {
                    for _ in 0..r.varint()? {
                        let k = Dim::decode(&mut r)?;
                        m.insert(k, Acc::decode(&def.kinds, &mut r)?);
                    }
                }
                for _ in 0..r.varint()? {
                    let k = (0..def.dims.len())
                        .map(|_| Dim::decode(&mut r))
                        .collect::<Result<Vec<_>, _>>()?;
                    b.full.insert(k.into_boxed_slice(), Acc::decode(&def.kinds, &mut r)?);
                }
                buckets.insert(start, b);
            }
        }
        if !r.done() {
            return Err("trailing bytes".into());
        }
        part.groups = part.count_groups();
        self.absorb(part);
        Ok(())
    }
}

fn update(acc: &mut Acc, fields: &[Option<Col>], i: usize) {
    acc.events += 1;
    for (s, c) in acc.states.iter_mut().zip(fields) {
        let Some(c) = c else { continue };
        match (s, c) {
            (State::SumI { sum, n } | State::MeanI { sum, n }, Col::Int(a)) if a.is_valid(i) => {
                *sum += i128::from(a.value(i));
                *n += 1;
            }
            (State::SumF { sum, n } | State::Mean { sum, n }, Col::Float(a)) if a.is_valid(i) => {
                let v = a.value(i);
                if !v.is_nan() {
                    *sum += v;
                    *n += 1;
                }
            }
            (State::MinI(m), Col::Int(a)) if a.is_valid(i) => *m = Some(m.map_or(a.value(i), |x| x.min(a.value(i)))),
            (State::MaxI(m), Col::Int(a)) if a.is_valid(i) => *m = Some(m.map_or(a.value(i), |x| x.max(a.value(i)))),
            (State::MinF(m), Col::Float(a)) if a.is_valid(i) && !a.value(i).is_nan() => {
                *m = Some(m.map_or(a.value(i), |x| x.min(a.value(i))))
            }
            (State::MaxF(m), Col::Float(a)) if a.is_valid(i) && !a.value(i).is_nan() => {
                *m = Some(m.map_or(a.value(i), |x| x.max(a.value(i))))
            }
            (State::Distinct(h), Col::Str(a)) if a.is_valid(i) => h.insert_hash(hash64(a.value(i).as_bytes())),
            (State::Distinct(h), Col::Int(a)) if a.is_valid(i) => h.insert_hash(hash64(&a.value(i).to_le_bytes())),
            (State::Pct(p), Col::Float(a)) if a.is_valid(i) => p.insert(a.value(i)),
            (State::Pct(p), Col::Int(a)) if a.is_valid(i) => p.insert(a.value(i) as f64),
            _ => {}
        }
    }
}

/// Each row's event time in epoch seconds (None when null).
pub fn event_secs(def: &Def, batch: &RecordBatch) -> Result<Vec<Option<i64>>, String> {
    let Col::Int(t) = Col::read(batch, &def.time, FieldType::Timestamp)? else {
        return Err(format!("column {} is not a timestamp", def.time));
    };
    Ok((0..t.len())
        .map(|i| t.is_valid(i).then(|| t.value(i).div_euclid(1_000_000)))
        .collect())
}
