//! The compaction planner: pure. Given the files of a table (their partition, size and rows) and
//! the rules, it returns which files to merge into which new files. It does no IO; the executor
//! (to come) reads each bin, writes one file and commits the swap in one Delta transaction.
//!
//! Rules: per partition, only files smaller than `small_file_bytes` are candidates; candidates
//! are packed first-fit by decreasing size into bins of at most `target_bytes`; a bin of one file
//! is dropped (rewriting a file alone gains nothing). A partition whose small files cannot be
//! combined yields no work, so a compacted partition is not rewritten again.

use std::collections::BTreeMap;

/// Partition values in partition-column order, for example `[("day", "2026-11-22"),
/// ("client_id", "acme")]`.
pub type Partition = Vec<(String, String)>;

/// One data file of a table, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub path: String,
    pub partition: Partition,
    pub size_bytes: u64,
    pub rows: u64,
    /// When the file was written, in milliseconds since the epoch (the Delta log's
    /// `modificationTime`).
    pub modified_ms: i64,
}

/// Compaction rules of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionRules {
    /// Size of the files compaction writes (default 128 MiB).
    pub target_bytes: u64,
    /// Files below this size are candidates (default three quarters of the target).
    pub small_file_bytes: u64,
    /// Most bins in one plan, so a run over a huge backlog stays bounded.
    pub bins_max: usize,
    /// A partition is planned only when it holds at least this many small files (never fewer
    /// than 2). Runs by hand and on the schedule use 2; the automatic trigger uses more, so
    /// that a partition still being written is not rewritten after every append.
    pub min_small_files: usize,
    /// A partition with no file written after this time (milliseconds since the epoch) has gone
    /// quiet: below `min_small_files`, its small files are merged by size tier. Taken from the
    /// smallest up, a file joins the merge while it is at most four times the files before it
    /// together; the merge happens when two or more joined. So a file is only ever merged into
    /// one at least a quarter larger, which bounds how often a byte is rewritten: a partition
    /// that gets a few rows every couple of minutes is not rewritten whole after each write.
    /// `None`: no partition counts as quiet.
    pub quiet_before_ms: Option<i64>,
}

impl CompactionRules {
    /// The rules of a dataset's contract: its target size, small files below three quarters
    /// of it, and `min_small_files` per partition.
    pub fn for_spec(spec: &tarn_core::DatasetSpec, min_small_files: usize) -> Self {
        let target = spec.compaction.target_bytes();
        Self {
            target_bytes: target,
            small_file_bytes: target / 4 * 3,
            min_small_files,
            ..Self::default()
        }
    }
}

impl Default for CompactionRules {
    fn default() -> Self {
        Self {
            target_bytes: 128 << 20,
            small_file_bytes: 96 << 20,
            bins_max: 1_000,
            min_small_files: 2,
            quiet_before_ms: None,
        }
    }
}

/// Files to merge into one new file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bin {
    pub partition: Partition,
    pub files: Vec<String>,
    pub bytes: u64,
    pub rows: u64,
}

/// Plans compaction over `files`. Bins come out ordered by partition, then by size, largest
/// first; the result is the same for the same input in any order.
pub fn plan(files: &[FileInfo], rules: &CompactionRules) -> Vec<Bin> {
    let mut by_partition: BTreeMap<&[(String, String)], Vec<&FileInfo>> = BTreeMap::new();
    let mut newest: BTreeMap<&[(String, String)], i64> = BTreeMap::new();
    for f in files {
        let n = newest.entry(f.partition.as_slice()).or_insert(i64::MIN);
        *n = (*n).max(f.modified_ms);
        if f.size_bytes < rules.small_file_bytes && f.size_bytes < rules.target_bytes {
            by_partition.entry(f.partition.as_slice()).or_default().push(f);
        }
    }
    let mut out = Vec::new();
    for (partition, mut small) in by_partition {
        small.sort_by(|a, b| b.size_bytes.cmp(&a.size_bytes).then_with(|| a.path.cmp(&b.path)));
        if small.len() < rules.min_small_files.max(2) {
            let quiet = rules
                .quiet_before_ms
                .is_some_and(|q| newest.get(partition).is_some_and(|&n| n <= q));
            if !quiet {
                continue;
            }
            // The tier fits one new file, so that every file in it is merged into one file.
            let mut below: Option<u64> = None;
            let tier = small
                .iter()
                .rev()
                .take_while(|f| {
                    let joins = match below {
                        None => true,
                        Some(b) => f.size_bytes <= b.saturating_mul(4) && b + f.size_bytes <= rules.target_bytes,
                    };
                    below = Some(below.unwrap_or(0) + f.size_bytes);
                    joins
                })
                .count();
            if tier < 2 {
                continue;
            }
            small.drain(..small.len() - tier);
        }
        let mut bins: Vec<Bin> = Vec::new();
        for f in small {
            match bins.iter_mut().find(|b| b.bytes + f.size_bytes <= rules.target_bytes) {
                Some(b) => {
                    b.files.push(f.path.clone());
                    b.bytes += f.size_bytes;
                    b.rows += f.rows;
                }
                None => bins.push(Bin {
                    partition: partition.to_vec(),
                    files: vec![f.path.clone()],
                    bytes: f.size_bytes,
                    rows: f.rows,
                }),
            }
        }
        out.extend(bins.into_iter().filter(|b| b.files.len() > 1));
        if out.len() >= rules.bins_max {
            out.truncate(rules.bins_max);
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn file(path: &str, day: &str, size: u64) -> FileInfo {
        FileInfo {
            path: path.into(),
            partition: vec![("day".into(), day.into())],
            size_bytes: size,
            rows: size / 10,
            modified_ms: 1_000,
        }
    }

    fn rules(target: u64) -> CompactionRules {
        CompactionRules {
            target_bytes: target,
            small_file_bytes: target * 3 / 4,
            bins_max: 1000,
            min_small_files: 2,
            quiet_before_ms: None,
        }
    }

    #[test]
    fn table_of_cases() {
        let r = rules(100);
        // (files, expected bins as lists of paths)
        let cases: Vec<(Vec<FileInfo>, Vec<Vec<&str>>)> = vec![
            (vec![], vec![]),
            (vec![file("a", "d1", 10)], vec![]),
            (vec![file("a", "d1", 10), file("b", "d1", 20)], vec![vec!["b", "a"]]),
            // Different partitions never mix.
            (vec![file("a", "d1", 10), file("b", "d2", 20)], vec![]),
            // Large files are left alone.
            (
                vec![file("a", "d1", 80), file("b", "d1", 90), file("c", "d1", 10)],
                vec![],
            ),
            // First fit decreasing: 60+40, 50+30+20.
            (
                vec![
                    file("a", "d1", 40),
                    file("b", "d1", 60),
                    file("c", "d1", 50),
                    file("d", "d1", 30),
                    file("e", "d1", 20),
                ],
                vec![vec!["b", "a"], vec!["c", "d", "e"]],
            ),
            // A lone leftover is not rewritten.
            (
                vec![file("a", "d1", 70), file("b", "d1", 70), file("c", "d1", 5)],
                vec![vec!["a", "c"]],
            ),
        ];
        for (files, want) in cases {
            let got: Vec<Vec<String>> = plan(&files, &r).into_iter().map(|b| b.files).collect();
            let want: Vec<Vec<String>> = want
                .into_iter()
                .map(|b| b.into_iter().map(String::from).collect())
                .collect();
            assert_eq!(got, want, "{files:?}");
        }
    }

    #[test]
    fn the_plan_is_bounded() {
        let files: Vec<_> = (0..100)
            .map(|i| file(&format!("f{i}"), &format!("d{}", i % 50), 1))
            .collect();
        let r = CompactionRules {
            bins_max: 7,
            ..rules(100)
        };
        assert_eq!(plan(&files, &r).len(), 7);
    }

    #[test]
    fn the_trigger_waits_for_enough_small_files() {
        let r = CompactionRules {
            min_small_files: 4,
            ..rules(100)
        };
        let three: Vec<_> = (0..3).map(|i| file(&format!("f{i}"), "d1", 5)).collect();
        assert!(plan(&three, &r).is_empty());
        let mut four = three.clone();
        four.push(file("f3", "d1", 5));
        // Large files do not count towards the trigger.
        four.push(file("big", "d1", 90));
        assert_eq!(plan(&four, &r).len(), 1);
        assert!(
            plan(
                &three,
                &CompactionRules {
                    min_small_files: 0,
                    ..r
                }
            )
            .len()
                == 1,
            "never fewer than 2"
        );
    }

    #[test]
    fn a_quiet_partition_is_merged_by_size_tier() {
        let r = CompactionRules {
            min_small_files: 32,
            ..rules(100)
        };
        let at = |mut f: FileInfo, ms: i64| {
            f.modified_ms = ms;
            f
        };
        // Two days of three small files each; d1 last written at 1,000 ms, d2 at 5,000 ms.
        let files = vec![
            at(file("a", "d1", 10), 900),
            at(file("b", "d1", 8), 1_000),
            at(file("c", "d1", 6), 800),
            at(file("x", "d2", 10), 900),
            at(file("y", "d2", 8), 5_000),
            at(file("z", "d2", 6), 800),
        ];
        assert!(plan(&files, &r).is_empty(), "below the trigger and not quiet");
        let quiet = |q| CompactionRules {
            quiet_before_ms: Some(q),
            ..r.clone()
        };
        let got = plan(&files, &quiet(2_000));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].files, vec!["a", "b", "c"]);
        assert_eq!(plan(&files, &quiet(5_000)).len(), 2, "both days quiet");
        assert!(plan(&files, &quiet(999)).is_empty(), "d1 was written after 999 ms");
        // A large file (not small) still counts as a write: the partition is not quiet.
        let mut with_big = files.clone();
        with_big.push(at(file("big", "d1", 90), 3_000));
        assert_eq!(plan(&with_big, &quiet(2_000)).len(), 0);
        // Size tiers: a file joins while it is at most four times the smaller ones together.
        let shaped = |sizes: &[u64]| -> Vec<FileInfo> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| at(file(&format!("s{i}"), "d3", n), 100))
                .collect()
        };
        let merged = |sizes: &[u64]| -> Vec<Vec<String>> {
            plan(&shaped(sizes), &quiet(1_000))
                .into_iter()
                .map(|b| b.files)
                .collect()
        };
        // 60 is over four times 14: a small file beside a compacted one is left alone, and so
        // is one much larger than the smaller ones together...
        assert!(merged(&[60, 14]).is_empty());
        assert!(merged(&[60, 14, 1]).is_empty());
        // ...until enough small files have come that each tier is at most four times the rest.
        assert_eq!(merged(&[60, 14, 1, 1, 1, 1]), [["s0", "s1", "s2", "s3", "s4", "s5"]]);
        // A partition whose last commit dominates keeps it and merges the rest.
        assert_eq!(merged(&[2, 3, 5, 60]), [["s2", "s1", "s0"]]);
        assert_eq!(merged(&[5, 15, 30, 50]), [["s3", "s2", "s1", "s0"]]);
        // A tier never spills over the target into a second bin: with a target of 100, 70 would
        // join 2+2+3+5+40 by size but not fit with them, so it stays and the rest become one
        // file (packed together, 70 would take in only 5+3+2+2 and 40 would be left alone).
        assert_eq!(merged(&[70, 40, 5, 3, 2, 2]), [["s1", "s2", "s3", "s4", "s5"]]);
        // A file of no bytes does not let any file join after it.
        assert!(merged(&[0, 50]).is_empty());
        // A lone small file is never rewritten.
        assert!(plan(&[at(file("p", "d4", 5), 1)], &quiet(1_000)).is_empty());
    }

    fn files_strategy() -> impl Strategy<Value = Vec<FileInfo>> {
        proptest::collection::vec((0u8..4, 1u64..200), 0..60).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (d, size))| file(&format!("f{i}"), &format!("d{d}"), size))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Every bin: at least two small files of one partition, at most the target in all; no
        /// file in two bins; and merging the bins, then planning again, ends within a few rounds.
        #[test]
        fn plans_are_sound_and_converge(
            files in files_strategy(),
            target in 50u64..400,
            quiet in proptest::option::of(0i64..3_000),
        ) {
            let r = CompactionRules { quiet_before_ms: quiet, ..rules(target) };
            let mut current = files;
            for round in 0..20 {
                let bins = plan(&current, &r);
                if bins.is_empty() {
                    break;
                }
                prop_assert!(round < 19, "compaction did not converge");
                let mut seen = HashSet::new();
                let by_path: std::collections::HashMap<_, _> = current.iter().map(|f| (f.path.clone(), f.clone())).collect();
                for b in &bins {
                    prop_assert!(b.files.len() >= 2);
                    prop_assert!(b.bytes <= r.target_bytes);
                    let mut sum = 0;
                    for p in &b.files {
                        prop_assert!(seen.insert(p.clone()), "file {} in two bins", p);
                        let f = &by_path[p];
                        prop_assert_eq!(&f.partition, &b.partition);
                        prop_assert!(f.size_bytes < r.small_file_bytes);
                        sum += f.size_bytes;
                    }
                    prop_assert_eq!(sum, b.bytes);
                }
                // Apply: the bins' files are replaced by one file each of the summed size.
                let total_before: u64 = current.iter().map(|f| f.size_bytes).sum();
                current.retain(|f| !seen.contains(&f.path));
                for (i, b) in bins.iter().enumerate() {
                    current.push(FileInfo { path: format!("r{round}-{i}"), partition: b.partition.clone(), size_bytes: b.bytes, rows: b.rows, modified_ms: 2_000 });
                }
                let total_after: u64 = current.iter().map(|f| f.size_bytes).sum();
                prop_assert_eq!(total_before, total_after, "bytes are conserved");
            }
        }
    }
}
