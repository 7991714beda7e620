//! `tarn plan`: the difference between a folder of descriptors and what runs. Pure: the
//! declared contracts, the live ones and the producers that hold a key in, steps out. `tarn
//! apply` carries the steps out; applying the same folder twice leaves nothing to do.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tarn_core::DatasetSpec;
use tarn_core::evolution::{self, Change};

/// One thing `tarn apply` would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// A new dataset: its catalog entry, stream and table.
    Create { dataset: String, fields: usize },
    /// Changes under the same major version (additive columns, metadata).
    Change { dataset: String, changes: Vec<Change> },
    /// The next major version: the current table is kept as `<dataset>__v<from>`.
    NewMajor {
        dataset: String,
        from: u32,
        to: u32,
        changes: Vec<Change>,
    },
    /// A write key for a producer named in a descriptor that has none yet.
    ProducerKey { producer: String },
    /// A change that may not apply (the evolution rules refuse it).
    Refused { dataset: String, reason: String },
}

/// What a folder would change, and what it leaves alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Datasets whose descriptor matches what runs.
    pub unchanged: Vec<String>,
    /// Datasets that run but are not in the folder: apply never removes a dataset.
    pub untracked: Vec<String>,
}

impl Plan {
    /// True when applying changes nothing.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn refused(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| matches!(s, Step::Refused { .. }))
    }
}

/// Plans `declared` against the `live` catalog; `has_key` tells whether a producer holds a key.
pub fn plan(declared: &[DatasetSpec], live: &[Arc<DatasetSpec>], has_key: &dyn Fn(&str) -> bool) -> Plan {
    let mut out = Plan::default();
    let declared_names: HashSet<&str> = declared.iter().map(|s| s.name.as_str()).collect();
    for spec in declared {
        let Some(old) = live.iter().find(|l| l.name == spec.name) else {
            out.steps.push(Step::Create {
                dataset: spec.name.clone(),
                fields: spec.fields.len(),
            });
            continue;
        };
        if old.external.is_some() {
            out.steps.push(Step::Refused {
                dataset: spec.name.clone(),
                reason: "registered data read in place; only `tarn register` changes it".into(),
            });
            continue;
        }
        match evolution::check(old, spec) {
            Ok(ev) if ev.changes.is_empty() => out.unchanged.push(spec.name.clone()),
            Ok(ev) if ev.new_major => out.steps.push(Step::NewMajor {
                dataset: spec.name.clone(),
                from: old.major,
                to: spec.major,
                changes: ev.changes,
            }),
            Ok(ev) => out.steps.push(Step::Change {
                dataset: spec.name.clone(),
                changes: ev.changes,
            }),
            Err(r) => out.steps.push(Step::Refused {
                dataset: spec.name.clone(),
                reason: r.to_string(),
            }),
        }
    }
    let producers: BTreeSet<&str> = declared
        .iter()
        .flat_map(|s| s.producers.iter().map(|p| p.name.as_str()))
        .collect();
    for p in producers {
        if !has_key(p) {
            out.steps.push(Step::ProducerKey {
                producer: p.to_string(),
            });
        }
    }
    out.untracked = live
        .iter()
        .filter(|l| !l.system && l.external.is_none() && !declared_names.contains(l.name.as_str()))
        .map(|l| l.name.clone())
        .collect();
    out
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Create { dataset, fields } => write!(f, "+ create {dataset} ({fields} fields)"),
            Step::Change { dataset, changes } => {
                write!(f, "~ change {dataset}")?;
                for c in changes {
                    write!(f, "\n    {c}")?;
                }
                Ok(())
            }
            Step::NewMajor {
                dataset,
                from,
                to,
                changes,
            } => {
                write!(
                    f,
                    "! new major version of {dataset}: {from} -> {to} (the current table stays readable as {dataset}__v{from})"
                )?;
                for c in changes {
                    write!(f, "\n    {c}")?;
                }
                Ok(())
            }
            Step::ProducerKey { producer } => write!(f, "+ write key for producer {producer}"),
            Step::Refused { dataset, reason } => write!(f, "x {dataset}: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::spec;

    #[test]
    fn plans_each_kind_of_step() {
        let live = vec![
            Arc::new(spec("same", "")),
            Arc::new(spec("grows", "")),
            Arc::new(spec("breaks", "  - { name: n, type: int64 }\n")),
            Arc::new(spec("bumps", "  - { name: n, type: int64 }\n")),
            Arc::new(spec("other", "")),
        ];
        let declared = vec![
            spec("same", ""),
            spec("grows", "  - { name: n, type: int64 }\n"),
            spec("breaks", "  - { name: n, type: string }\n"),
            spec("bumps", "  - { name: n, type: string }\nmajor: 2\n"),
            spec("fresh", "producers: [app-b, app-a]\n"),
            spec("fresh2", "producers: [app-a]\n"),
        ];
        let p = plan(&declared, &live, &|k| k == "app-b");
        assert_eq!(p.unchanged, ["same"]);
        assert_eq!(p.untracked, ["other"]);
        let kinds: Vec<String> = p
            .steps
            .iter()
            .map(|s| s.to_string().split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            kinds,
            [
                "~ change grows",
                "x breaks: breaking",
                "! new major",
                "+ create fresh",
                "+ create fresh2",
                "+ write key"
            ]
        );
        assert!(matches!(&p.steps[5], Step::ProducerKey { producer } if producer == "app-a"));
        assert_eq!(p.refused().count(), 1);
    }

    #[test]
    fn a_plan_of_what_runs_is_empty() {
        let live: Vec<_> = ["a", "b"].iter().map(|n| Arc::new(spec(n, ""))).collect();
        let declared: Vec<_> = live.iter().map(|s| (**s).clone()).collect();
        let p = plan(&declared, &live, &|_| true);
        assert!(p.is_empty());
        assert_eq!(p.unchanged, ["a", "b"]);
    }
}
