//! The two mergeable sketches behind approximate rollup metrics: HyperLogLog for distinct counts
//! and DDSketch for quantiles. Both merge exactly (the sketch of a union is the merge of the
//! sketches), which is what lets a rollup combine buckets, groups and replays of pre-aggregated
//! batches. Both have a stable binary form (`encode` / `decode`) that rollup chunks persist.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::codec::{Reader, Writer};

/// Index bits of the HyperLogLog: 4096 registers, standard error 1.04 / sqrt(4096) = 1.6%.
pub const HLL_P: u32 = 12;
const HLL_M: usize = 1 << HLL_P;
/// Rank bits left after the index; ranks run from 1 to Q + 1.
const HLL_Q: u32 = 64 - HLL_P;
/// A sparse HyperLogLog turns dense past this many non-zero registers (at 3 bytes each in the
/// sparse form, about where the dense 4 KiB array becomes smaller).
const HLL_SPARSE_MAX: usize = 1024;

/// The 64-bit hash of a value fed to the HyperLogLog. Stable across versions and machines,
/// since sketches are persisted.
pub fn hash64(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

/// A HyperLogLog sketch with sparse storage for small cardinalities.
#[derive(Debug)]
pub struct Hll {
    regs: Regs,
    /// The last estimate (f64 bits), or `u64::MAX` when it must be computed again; reads of a
    /// bucket that did not change cost nothing.
    cached: AtomicU64,
}

#[derive(Debug, Clone, PartialEq)]
enum Regs {
    /// Sorted by register index: (index, rank).
    Sparse(Vec<(u16, u8)>),
    Dense(Box<[u8]>),
}

impl Clone for Hll {
    fn clone(&self) -> Self {
        Self {
            regs: self.regs.clone(),
            cached: AtomicU64::new(self.cached.load(Relaxed)),
        }
    }
}

impl PartialEq for Hll {
    fn eq(&self, other: &Self) -> bool {
        self.registers() == other.registers()
    }
}

impl Default for Hll {
    fn default() -> Self {
        Self {
            regs: Regs::Sparse(Vec::new()),
            cached: AtomicU64::new(u64::MAX),
        }
    }
}

impl Hll {
    pub fn insert_hash(&mut self, h: u64) {
        let idx = (h >> HLL_Q) as u16;
        let rest = (h << HLL_P) | (1 << (HLL_P - 1));
        let rank = (rest.leading_zeros() + 1).min(HLL_Q + 1) as u8;
        self.set_max(idx, rank);
    }

    fn set_max(&mut self, idx: u16, rank: u8) {
        match &mut self.regs {
            Regs::Dense(r) => {
                let slot = &mut r[idx as usize];
                if *slot < rank {
                    *slot = rank;
                    self.cached.store(u64::MAX, Relaxed);
                }
            }
            Regs::Sparse(v) => {
                match v.binary_search_by_key(&idx, |e| e.0) {
                    Ok(i) => {
                        if v[i].1 < rank {
                            v[i].1 = rank;
                            self.cached.store(u64::MAX, Relaxed);
                        }
                    }
                    Err(i) => {
                        v.insert(i, (idx, rank));
                        self.cached.store(u64::MAX, Relaxed);
                    }
                }
                if v.len() > HLL_SPARSE_MAX {
                    self.regs = Regs::Dense(self.registers().into_boxed_slice());
                }
            }
        }
    }

    /// Every register, dense.
    fn registers(&self) -> Vec<u8> {
        match &self.regs {
            Regs::Dense(r) => r.to_vec(),
            Regs::Sparse(v) => {
                let mut r = vec![0u8; HLL_M];
                for (i, k) in v {
                    r[*i as usize] = *k;
                }
                r
            }
        }
    }

    pub fn merge(&mut self, other: &Hll) {
        match &other.regs {
            Regs::Sparse(v) => {
                for (i, k) in v {
                    self.set_max(*i, *k);
                }
            }
            Regs::Dense(o) => {
                let mut mine = match std::mem::replace(&mut self.regs, Regs::Sparse(Vec::new())) {
                    Regs::Dense(r) => r,
                    sparse => {
                        self.regs = sparse;
                        self.registers().into_boxed_slice()
                    }
                };
                for (a, b) in mine.iter_mut().zip(o.iter()) {
                    *a = (*a).max(*b);
                }
                self.regs = Regs::Dense(mine);
                self.cached.store(u64::MAX, Relaxed);
            }
        }
    }

    /// The estimated number of distinct values, by Ertl's improved estimator ("New cardinality
    /// estimation algorithms for HyperLogLog sketches", 2017), which needs no bias tables and
    /// holds its error across the whole range, small cardinalities included.
    pub fn estimate(&self) -> f64 {
        let c = self.cached.load(Relaxed);
        if c != u64::MAX {
            return f64::from_bits(c);
        }
        let mut counts = [0u32; HLL_Q as usize + 2];
        match &self.regs {
            Regs::Dense(r) => {
                for k in r.iter() {
                    counts[*k as usize] += 1;
                }
            }
            Regs::Sparse(v) => {
                counts[0] = (HLL_M - v.len()) as u32;
                for (_, k) in v {
                    counts[*k as usize] += 1;
                }
            }
        }
        let m = HLL_M as f64;
        let q = HLL_Q as usize;
        let mut z = m * tau(1.0 - f64::from(counts[q + 1]) / m);
        for k in (1..=q).rev() {
            z = 0.5 * (z + f64::from(counts[k]));
        }
        z += m * sigma(f64::from(counts[0]) / m);
        let e = if z.is_infinite() {
            0.0
        } else {
            m * m / (2.0 * std::f64::consts::LN_2 * z)
        };
        self.cached.store(e.to_bits(), Relaxed);
        e
    }

    pub fn encode(&self, w: &mut Writer) {
        match &self.regs {
            Regs::Sparse(v) => {
                w.u8(0);
                w.varint(v.len() as u64);
                for (i, k) in v {
                    w.bytes(&i.to_le_bytes());
                    w.u8(*k);
                }
            }
            Regs::Dense(r) => {
                w.u8(1);
                w.bytes(r);
            }
        }
    }

    pub fn decode(r: &mut Reader) -> Result<Hll, String> {
        let regs = match r.u8()? {
            0 => {
                let n = r.varint()? as usize;
                if n > HLL_SPARSE_MAX {
                    return Err(format!("sparse hyperloglog with {n} registers"));
                }
                let mut v = Vec::with_capacity(n);
                let mut last = None;
                for _ in 0..n {
                    let b = r.take(2)?;
                    let i = u16::from_le_bytes([b[0], b[1]]);
                    let k = r.u8()?;
                    if usize::from(i) >= HLL_M || k == 0 || u32::from(k) > HLL_Q + 1 || last >= Some(i) {
                        return Err("hyperloglog register out of range or order".into());
                    }
                    last = Some(i);
                    v.push((i, k));
                }
                Regs::Sparse(v)
            }
            1 => {
                let b = r.take(HLL_M)?;
                if b.iter().any(|k| u32::from(*k) > HLL_Q + 1) {
                    return Err("hyperloglog register out of range".into());
                }
                Regs::Dense(b.to_vec().into_boxed_slice())
            }
            t => return Err(format!("hyperloglog form {t}")),
        };
        Ok(Hll {
            regs,
            cached: AtomicU64::new(u64::MAX),
        })
    }
}

fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let before = z;
        z += x * y;
        y += y;
        if z == before {
            return z;
        }
    }
}

fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let before = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if z == before {
            return z / 3.0;
        }
    }
}

/// Relative accuracy of the DDSketch: a quantile it returns is within 1% of the magnitude of
/// a value whose rank is the requested one.
pub const DD_ALPHA: f64 = 0.01;
/// Bins kept per sign; past it the bins nearest zero are merged (their quantiles lose the
/// guarantee first). With 1% accuracy, 2048 bins span values over 17 orders of magnitude.
const DD_BINS_MAX: usize = 2048;
/// Magnitudes below this count as zero.
const DD_MIN: f64 = 1e-9;

/// A DDSketch: values bucketed by the logarithm of their magnitude, base (1 + a) / (1 - a).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DdSketch {
    pos: Bins,
    neg: Bins,
    zeros: u64,
    count: u64,
    min: f64,
    max: f64,
}

/// Sorted (bin key, count) pairs.
#[derive(Debug, Clone, PartialEq, Default)]
struct Bins(Vec<(i32, u64)>);

impl Bins {
    fn add(&mut self, key: i32, n: u64) {
        match self.0.binary_search_by_key(&key, |e| e.0) {
            Ok(i) => self.0[i].1 += n,
            Err(i) => {
                self.0.insert(i, (key, n));
                if self.0.len() > DD_BINS_MAX {
                    // Merge the two lowest keys (the magnitudes nearest zero).
                    let (_, c) = self.0.remove(0);
                    self.0[0].1 += c;
                }
            }
        }
    }

    fn merge(&mut self, other: &Bins) {
        if self.0.is_empty() {
            self.0 = other.0.clone();
            return;
        }
        for (k, c) in &other.0 {
            self.add(*k, *c);
        }
    }
}

fn gamma_ln() -> f64 {
    ((1.0 + DD_ALPHA) / (1.0 - DD_ALPHA)).ln()
}

impl DdSketch {
    pub fn insert(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if self.count == 0 {
            self.min = x;
            self.max = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.count += 1;
        let a = x.abs();
        if a < DD_MIN {
            self.zeros += 1;
            return;
        }
        let key = (a.ln() / gamma_ln()).ceil() as i32;
        if x > 0.0 {
            self.pos.add(key, 1);
        } else {
            self.neg.add(key, 1);
        }
    }

    pub fn merge(&mut self, other: &DdSketch) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            self.min = other.min;
            self.max = other.max;
        } else {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
        self.count += other.count;
        self.zeros += other.zeros;
        self.pos.merge(&other.pos);
        self.neg.merge(&other.neg);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0 to 1), or None when the sketch is empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = (q * (self.count - 1) as f64).floor() as u64;
        let g = gamma_ln().exp();
        let value = |key: i32| 2.0 * g.powi(key) / (g + 1.0);
        let mut seen = 0u64;
        let mut out = None;
        for (k, c) in self.neg.0.iter().rev() {
            seen += c;
            if seen > rank {
                out = Some(-value(*k));
                break;
            }
        }
        if out.is_none() {
            seen += self.zeros;
            if seen > rank {
                out = Some(0.0);
            }
        }
        if out.is_none() {
            for (k, c) in &self.pos.0 {
                seen += c;
                if seen > rank {
                    out = Some(value(*k));
                    break;
                }
            }
        }
        out.map(|v| v.clamp(self.min, self.max))
    }

    pub fn encode(&self, w: &mut Writer) {
        w.varint(self.count);
        if self.count == 0 {
            return;
        }
        w.varint(self.zeros);
        w.f64(self.min);
        w.f64(self.max);
        for bins in [&self.pos, &self.neg] {
            w.varint(bins.0.len() as u64);
            let mut last = 0i64;
            for (k, c) in &bins.0 {
                w.zigzag(i64::from(*k) - last);
                last = i64::from(*k);
                w.varint(*c);
            }
        }
    }

    pub fn decode(r: &mut Reader) -> Result<DdSketch, String> {
        let count = r.varint()?;
        if count == 0 {
            return Ok(DdSketch::default());
        }
        let zeros = r.varint()?;
        let min = r.f64()?;
        let max = r.f64()?;
        if !(min.is_finite() && max.is_finite() && min <= max) {
            return Err(format!("ddsketch bounds {min}..{max}"));
        }
        let mut total = zeros;
        let mut stores = [Bins::default(), Bins::default()];
        for bins in &mut stores {
            let n = r.varint()? as usize;
            if n > DD_BINS_MAX {
                return Err(format!("ddsketch with {n} bins"));
            }
            let mut last = 0i64;
            for i in 0..n {
                let k = last.checked_add(r.zigzag()?).ok_or("ddsketch bin key overflows")?;
                if (i > 0 && k <= last) || i32::try_from(k).is_err() {
                    return Err("ddsketch bins out of order".into());
                }
                last = k;
                let c = r.varint()?;
                total = total.saturating_add(c);
                bins.0.push((k as i32, c));
            }
        }
        if total != count {
            return Err(format!("ddsketch counts {total} of {count} values"));
        }
        let [pos, neg] = stores;
        Ok(DdSketch {
            pos,
            neg,
            zeros,
            count,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hll_of(range: std::ops::Range<u64>) -> Hll {
        let mut h = Hll::default();
        for i in range {
            h.insert_hash(hash64(&i.to_le_bytes()));
        }
        h
    }

    #[test]
    fn hll_error_stays_within_three_standard_errors() {
        // 1.6% standard error; 5% is three of them. Sizes cover the sparse form, the switch
        // to dense and the range where raw HyperLogLog is biased.
        for n in [1u64, 10, 100, 1_000, 3_000, 10_000, 20_000, 100_000, 1_000_000] {
            let h = hll_of(0..n);
            let e = h.estimate();
            let err = (e - n as f64).abs() / n as f64;
            assert!(err < 0.05, "n = {n}: estimate {e:.0}, error {:.2}%", err * 100.0);
        }
        assert_eq!(Hll::default().estimate(), 0.0);
    }

    #[test]
    fn hll_merge_equals_union_and_survives_encoding() {
        let a = hll_of(0..30_000);
        let b = hll_of(20_000..50_000);
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m, hll_of(0..50_000));
        let mut s = hll_of(0..10);
        s.merge(&hll_of(5..20));
        assert_eq!(s, hll_of(0..20));
        for h in [hll_of(0..0), hll_of(0..50), m] {
            let mut w = Writer::default();
            h.encode(&mut w);
            let bytes = w.into_bytes();
            let back = Hll::decode(&mut Reader::new(&bytes)).expect("decodes");
            assert_eq!(back, h);
            assert_eq!(back.estimate(), h.estimate());
        }
        assert!(Hll::decode(&mut Reader::new(&[7])).is_err());
        assert!(
            Hll::decode(&mut Reader::new(&[0, 2, 5, 0, 1, 5, 0, 1])).is_err(),
            "order"
        );
    }

    fn exact_quantile(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    #[test]
    fn ddsketch_quantiles_are_within_relative_accuracy() {
        let mut values: Vec<f64> = Vec::new();
        let mut x = 0.37f64;
        for i in 0..20_000 {
            // A spread over six orders of magnitude, with negatives and zeros.
            x = (x * 9301.0 + 49297.0) % 233280.0;
            let v = match i % 10 {
                0 => 0.0,
                1 => -(x / 1000.0),
                _ => x / 100.0 + 0.001,
            };
            values.push(v);
        }
        let mut s = DdSketch::default();
        for v in &values {
            s.insert(*v);
        }
        values.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0] {
            let want = exact_quantile(&values, q);
            let got = s.quantile(q).expect("non-empty");
            assert!(
                (got - want).abs() <= DD_ALPHA * want.abs() + 1e-12,
                "q {q}: got {got}, want {want}"
            );
        }
        assert_eq!(DdSketch::default().quantile(0.5), None);
    }

    #[test]
    fn ddsketch_merge_equals_union_and_survives_encoding() {
        let mut a = DdSketch::default();
        let mut b = DdSketch::default();
        let mut all = DdSketch::default();
        for i in 0..5_000 {
            let v = (i as f64) * 0.37 - 100.0;
            if i % 3 == 0 {
                a.insert(v)
            } else {
                b.insert(v)
            }
            all.insert(v);
        }
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.count(), all.count());
        for q in [0.0, 0.3, 0.5, 0.99, 1.0] {
            assert_eq!(m.quantile(q), all.quantile(q));
        }
        let mut w = Writer::default();
        m.encode(&mut w);
        let bytes = w.into_bytes();
        assert_eq!(DdSketch::decode(&mut Reader::new(&bytes)).expect("decodes"), m);
        let mut cut = bytes.clone();
        cut.truncate(bytes.len() - 1);
        assert!(DdSketch::decode(&mut Reader::new(&cut)).is_err());
    }
}
