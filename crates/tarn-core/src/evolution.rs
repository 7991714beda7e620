//! Schema evolution: what changed between two contracts of one dataset and whether the change
//! may apply live.
//!
//! - **Additive** changes (a new optional field) apply live: producers that do not send the
//!   field keep working and the table gains a nullable column.
//! - **Breaking** changes (a field removed or retyped, a field made required, a new required
//!   field, another event id, event time or tenant, unknown fields no longer dropped) would
//!   refuse events that were accepted before or change what a column means; they are refused
//!   unless the contract declares the next major version.
//! - **Metadata** changes (descriptions, owner, tags, rules, rollups, ...) touch no column.

use serde::{Deserialize, Serialize};

use crate::contract::{DatasetSpec, UnknownFields};

/// How a change affects producers and readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compat {
    Additive,
    Breaking,
    Metadata,
}

/// One difference between two contracts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub compat: Compat,
    pub what: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = match self.compat {
            Compat::Additive => "additive",
            Compat::Breaking => "breaking",
            Compat::Metadata => "metadata",
        };
        write!(f, "{c}: {}", self.what)
    }
}

/// Every difference from `old` to `new`, fields first, in declaration order.
pub fn diff(old: &DatasetSpec, new: &DatasetSpec) -> Vec<Change> {
    let mut out = Vec::new();
    let mut push = |compat, what: String| out.push(Change { compat, what });
    for f in &old.fields {
        match new.field(&f.name) {
            None => push(Compat::Breaking, format!("field {} is removed", f.name)),
            Some(n) => {
                if n.ty != f.ty {
                    push(
                        Compat::Breaking,
                        format!(
                            "field {} changes type from {} to {}",
                            f.name,
                            f.ty.as_str(),
                            n.ty.as_str()
                        ),
                    );
                }
                if n.required && !f.required {
                    push(Compat::Breaking, format!("field {} becomes required", f.name));
                }
                if !n.required && f.required {
                    push(
                        Compat::Breaking,
                        format!("field {} becomes optional (readers relying on it see nulls)", f.name),
                    );
                }
                if n.description != f.description {
                    push(Compat::Metadata, format!("field {} gets a new description", f.name));
                }
                if n.pii != f.pii {
                    push(
                        Compat::Metadata,
                        format!("field {} pii: {} -> {}", f.name, f.pii.as_str(), n.pii.as_str()),
                    );
                }
            }
        }
    }
    for n in &new.fields {
        if old.field(&n.name).is_some() {
            continue;
        }
        if n.required {
            push(
                Compat::Breaking,
                format!(
                    "new field {} is required (producers that do not send it would be refused)",
                    n.name
                ),
            );
        } else {
            push(
                Compat::Additive,
                format!("new optional field {} ({})", n.name, n.ty.as_str()),
            );
        }
    }
    let same_order = old
        .fields
        .iter()
        .map(|f| &f.name)
        .filter(|n| new.field(n).is_some())
        .eq(new.fields.iter().map(|f| &f.name).filter(|n| old.field(n).is_some()));
    if !same_order {
        push(Compat::Metadata, "fields are declared in another order".into());
    }
    if old.event_id != new.event_id {
        push(
            Compat::Breaking,
            format!("event_id moves from {} to {}", old.event_id, new.event_id),
        );
    }
    if old.event_time != new.event_time {
        push(
            Compat::Breaking,
            format!(
                "event_time moves from {} to {} (days would be cut differently)",
                old.event_time.as_deref().unwrap_or("the receive time"),
                new.event_time.as_deref().unwrap_or("the receive time")
            ),
        );
    }
    if old.tenant() != new.tenant() {
        push(
            Compat::Breaking,
            format!(
                "tenant partition moves from {} to {}",
                old.tenant().unwrap_or("none"),
                new.tenant().unwrap_or("none")
            ),
        );
    }
    if old.unknown_fields != new.unknown_fields {
        let compat = if new.unknown_fields == UnknownFields::Reject {
            Compat::Breaking
        } else {
            Compat::Metadata
        };
        push(
            compat,
            format!("unknown_fields: {:?} -> {:?}", old.unknown_fields, new.unknown_fields).to_lowercase(),
        );
    }
    if old.major != new.major {
        push(
            Compat::Metadata,
            format!("major version {} -> {}", old.major, new.major),
        );
    }
    let meta: [(&str, bool); 16] = [
        ("description", old.description != new.description),
        ("domain", old.domain != new.domain),
        ("owner", old.owner != new.owner),
        ("tags", old.tags != new.tags),
        ("scope", old.scope != new.scope),
        ("size", old.size != new.size),
        ("encoding", old.encoding != new.encoding),
        ("producers", old.producers != new.producers),
        ("consumers", old.consumers != new.consumers),
        ("compaction", old.compaction != new.compaction),
        ("lifecycle", old.lifecycle != new.lifecycle),
        ("query", old.query != new.query),
        ("rollups", old.rollups != new.rollups),
        ("quality", old.quality != new.quality),
        ("inferred", old.inferred != new.inferred),
        ("external", old.external != new.external),
    ];
    for (what, changed) in meta {
        if changed {
            push(Compat::Metadata, format!("{what} changes"));
        }
    }
    out
}

/// Why a contract may not replace another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Breaking changes under the same major version.
    Breaking { major: u32, changes: Vec<Change> },
    /// The major version went down, or up by more than one.
    MajorStep { from: u32, to: u32 },
    /// Another dataset's contract.
    OtherName,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Breaking { major, changes } => {
                let list: Vec<String> = changes.iter().map(|c| c.what.clone()).collect();
                write!(
                    f,
                    "breaking changes under major version {major}: {}; declare `major: {}` to make them (the current table is kept, readable, as the previous version)",
                    list.join("; "),
                    major + 1
                )
            }
            Refusal::MajorStep { from, to } => {
                write!(
                    f,
                    "major version goes from {from} to {to}; it may only stay or go up by one"
                )
            }
            Refusal::OtherName => write!(f, "the contracts are of two datasets"),
        }
    }
}

/// What replacing `old` by `new` does, or why it may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evolution {
    pub changes: Vec<Change>,
    /// True when `new` declares the next major version.
    pub new_major: bool,
}

/// Checks that `new` may replace `old`: the same dataset, the same or the next major version,
/// and breaking changes only with the next major version.
pub fn check(old: &DatasetSpec, new: &DatasetSpec) -> Result<Evolution, Refusal> {
    if old.name != new.name {
        return Err(Refusal::OtherName);
    }
    if new.major != old.major && new.major != old.major + 1 {
        return Err(Refusal::MajorStep {
            from: old.major,
            to: new.major,
        });
    }
    let changes = diff(old, new);
    let new_major = new.major == old.major + 1;
    let breaking: Vec<Change> = changes
        .iter()
        .filter(|c| c.compat == Compat::Breaking)
        .cloned()
        .collect();
    if !new_major && !breaking.is_empty() {
        return Err(Refusal::Breaking {
            major: old.major,
            changes: breaking,
        });
    }
    Ok(Evolution { changes, new_major })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name: auctions
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: client_id, type: string, required: true }
  - { name: cpm, type: float64 }
  - { name: site, type: string }
event_time: ts
event_id: event_id
partitioning: { tenant: client_id }
";

    fn spec(text: &str) -> DatasetSpec {
        DatasetSpec::from_yaml(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// Each rule: an edit of the base descriptor, the kind of change it must be classified as,
    /// and words the change must name.
    #[test]
    fn classifies_each_change() {
        let cases: &[(&str, &str, Compat, &str)] = &[
            (
                "  - { name: site, type: string }\n",
                "  - { name: site, type: string }\n  - { name: country, type: string }\n",
                Compat::Additive,
                "new optional field country",
            ),
            (
                "  - { name: site, type: string }\n",
                "  - { name: site, type: string }\n  - { name: country, type: string, required: true }\n",
                Compat::Breaking,
                "new field country is required",
            ),
            (
                "  - { name: site, type: string }\n",
                "",
                Compat::Breaking,
                "field site is removed",
            ),
            (
                "{ name: cpm, type: float64 }",
                "{ name: cpm, type: string }",
                Compat::Breaking,
                "changes type from float64 to string",
            ),
            (
                "{ name: cpm, type: float64 }",
                "{ name: cpm, type: float64, required: true }",
                Compat::Breaking,
                "cpm becomes required",
            ),
            (
                "{ name: client_id, type: string, required: true }",
                "{ name: client_id, type: string, required: true }\n  - { name: other, type: string, required: true }",
                Compat::Breaking,
                "new field other is required",
            ),
            (
                "partitioning: { tenant: client_id }",
                "partitioning: {}",
                Compat::Breaking,
                "tenant partition moves from client_id to none",
            ),
            ("event_time: ts\n", "", Compat::Breaking, "event_time moves from ts"),
            (
                "event_id: event_id",
                "event_id: event_id\nunknown_fields: drop",
                Compat::Metadata,
                "unknown_fields: reject -> drop",
            ),
            (
                "{ name: cpm, type: float64 }",
                "{ name: cpm, type: float64, description: price, pii: none }",
                Compat::Metadata,
                "cpm gets a new description",
            ),
            (
                "{ name: site, type: string }",
                "{ name: site, type: string, pii: indirect }",
                Compat::Metadata,
                "pii: none -> indirect",
            ),
            (
                "name: auctions\n",
                "name: auctions\nowner: ads\n",
                Compat::Metadata,
                "owner",
            ),
            (
                "name: auctions\n",
                "name: auctions\nsize: L\n",
                Compat::Metadata,
                "size",
            ),
            (
                "name: auctions\n",
                "name: auctions\nscope: public\ndescription: x\n",
                Compat::Metadata,
                "scope",
            ),
            (
                "name: auctions\n",
                "name: auctions\nproducers: [bid-service]\n",
                Compat::Metadata,
                "producers",
            ),
            (
                "  - { name: cpm, type: float64 }\n  - { name: site, type: string }\n",
                "  - { name: site, type: string }\n  - { name: cpm, type: float64 }\n",
                Compat::Metadata,
                "another order",
            ),
        ];
        let old = spec(BASE);
        for (from, to, compat, words) in cases {
            assert!(BASE.contains(from), "{from:?} is not in the base");
            let new = spec(&BASE.replacen(from, to, 1));
            let changes = diff(&old, &new);
            assert!(
                changes.iter().any(|c| c.compat == *compat && c.what.contains(words)),
                "{from:?} -> {to:?}: {changes:?} should hold a {compat:?} change naming {words:?}"
            );
            let breaking = changes.iter().any(|c| c.compat == Compat::Breaking);
            assert_eq!(check(&old, &new).is_err(), breaking, "{changes:?}");
            // The same change under the next major version is allowed.
            let bumped = spec(&format!("major: 2\n{}", BASE.replacen(from, to, 1)));
            let ev = check(&old, &bumped).expect("a major version allows it");
            assert!(ev.new_major);
        }
        assert!(diff(&old, &old).is_empty());
        // Reject -> drop relaxes; drop -> reject refuses events that were accepted.
        let drop = spec(&format!("{BASE}unknown_fields: drop\n"));
        assert!(check(&drop, &old).is_err());
    }

    #[test]
    fn major_versions_step_by_one() {
        let old = spec(BASE);
        // A new major version alone is a change (the table starts afresh).
        let two = spec(&format!("major: 2\n{BASE}"));
        let ev = check(&old, &two).expect("next major");
        assert!(ev.new_major && ev.changes.iter().any(|c| c.what == "major version 1 -> 2"));
        let three = spec(&format!("major: 3\n{BASE}"));
        assert_eq!(check(&old, &three), Err(Refusal::MajorStep { from: 1, to: 3 }));
        assert_eq!(check(&three, &old), Err(Refusal::MajorStep { from: 3, to: 1 }));
        let other = spec(&BASE.replace("name: auctions", "name: bids"));
        assert_eq!(check(&old, &other), Err(Refusal::OtherName));
        let err = check(&old, &spec(&BASE.replace("  - { name: site, type: string }\n", "")))
            .expect_err("breaking")
            .to_string();
        assert!(
            err.contains("field site is removed") && err.contains("major: 2"),
            "{err}"
        );
    }
}
