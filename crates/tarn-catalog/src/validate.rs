//! `tarn validate`: checks a folder of descriptors before it is applied. Pure: descriptor
//! texts, the live contracts and the naming norms in, findings out.
//!
//! Each finding names the file, the dataset, the rule and what is wrong. Errors stop an apply
//! (and make `tarn validate` exit 1); warnings are reported and allowed.

use std::collections::HashMap;
use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Serialize};
use tarn_core::evolution::{self, Refusal};
use tarn_core::{DatasetSpec, Pii, Scope};

/// Naming and documentation norms, configurable per organisation (`--norms FILE`).
#[derive(Debug, Clone)]
pub struct Norms {
    /// What field, rollup and metric names must match.
    pub names: Regex,
    /// Every dataset needs an owner (datasets holding personal data always do).
    pub require_owner: bool,
    /// Every dataset needs a description (public datasets always do).
    pub require_description: bool,
}

/// Lowercase snake case: `client_id`, `p95_ms`.
pub const SNAKE_CASE: &str = "^[a-z][a-z0-9]*(_[a-z0-9]+)*$";

impl Default for Norms {
    fn default() -> Self {
        Self {
            names: Regex::new(SNAKE_CASE).expect("the default pattern compiles"),
            require_owner: false,
            require_description: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NormsFile {
    #[serde(default)]
    names: Option<String>,
    #[serde(default)]
    require_owner: bool,
    #[serde(default)]
    require_description: bool,
}

impl Norms {
    /// Reads norms from YAML: `names` (a regular expression, anchored by the author),
    /// `require_owner`, `require_description`. Omitted keys keep their defaults.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let f: NormsFile = serde_norway::from_str(text).map_err(|e| format!("norms are not valid: {e}"))?;
        let names = match f.names {
            Some(p) => Regex::new(&p).map_err(|e| format!("norms: names pattern {p:?}: {e}"))?,
            None => Self::default().names,
        };
        Ok(Self {
            names,
            require_owner: f.require_owner,
            require_description: f.require_description,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// A short stable name of the rule (`naming`, `pii-owner`, `breaking-change`, ...).
    pub rule: &'static str,
    pub severity: Severity,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match &self.dataset {
            Some(d) => write!(f, "{}: {sev}[{}] {d}: {}", self.file, self.rule, self.message),
            None => write!(f, "{}: {sev}[{}] {}", self.file, self.rule, self.message),
        }
    }
}

/// A descriptor file: where it came from and its text.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: String,
    pub text: String,
}

/// What validation found, and the contracts that parsed.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Every descriptor that parsed, with its file, in file order.
    pub specs: Vec<(String, DatasetSpec)>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }

    pub fn warnings(&self) -> usize {
        self.findings.len() - self.errors()
    }
}

/// Validates descriptors against the norms and, where a dataset runs already, against its
/// live contract (`live`).
pub fn validate(sources: &[Source], live: &dyn Fn(&str) -> Option<Arc<DatasetSpec>>, norms: &Norms) -> Report {
    let mut report = Report::default();
    let mut seen: HashMap<String, String> = HashMap::new();
    for src in sources {
        let mut find = |dataset: Option<&str>, rule, severity, message: String| {
            report.findings.push(Finding {
                file: src.file.clone(),
                dataset: dataset.map(str::to_string),
                rule,
                severity,
                message,
            })
        };
        let spec = match DatasetSpec::from_yaml(&src.text) {
            Ok(s) => s,
            Err(e) => {
                find(None, "contract", Severity::Error, e.to_string());
                continue;
            }
        };
        let ds = Some(spec.name.as_str());
        let stem = std::path::Path::new(&src.file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("");
        if stem != spec.name {
            find(
                ds,
                "file-name",
                Severity::Error,
                format!("the file of dataset {} must be named {}.yaml", spec.name, spec.name),
            );
        }
        if let Some(first) = seen.insert(spec.name.clone(), src.file.clone()) {
            find(
                ds,
                "duplicate",
                Severity::Error,
                format!("dataset {} is declared in {first} too", spec.name),
            );
        }
        let mut names: Vec<(&str, &str)> = spec.fields.iter().map(|f| ("field", f.name.as_str())).collect();
        names.extend(spec.quality.iter().map(|q| ("quality rule", q.name.as_str())));
        for r in &spec.rollups {
            names.push(("rollup", r.name.as_str()));
            names.extend(r.metrics.iter().map(|m| ("metric", m.name.as_str())));
        }
        for (what, name) in names {
            if !norms.names.is_match(name) {
                find(
                    ds,
                    "naming",
                    Severity::Error,
                    format!(
                        "{what} {name:?} does not match the naming norm {}",
                        norms.names.as_str()
                    ),
                );
            }
        }
        let pii: Vec<&str> = spec
            .fields
            .iter()
            .filter(|f| f.pii != Pii::None)
            .map(|f| f.name.as_str())
            .collect();
        if spec.owner.is_none() && !pii.is_empty() {
            find(
                ds,
                "pii-owner",
                Severity::Error,
                format!(
                    "fields {} hold personal data; the dataset needs an owner",
                    pii.join(", ")
                ),
            );
        } else if spec.owner.is_none() && norms.require_owner {
            find(ds, "owner", Severity::Error, "the dataset needs an owner".into());
        }
        for f in spec
            .fields
            .iter()
            .filter(|f| f.pii != Pii::None && f.description.is_none())
        {
            find(
                ds,
                "pii-description",
                Severity::Warning,
                format!("field {} holds personal data ({}); describe it", f.name, f.pii.as_str()),
            );
        }
        if spec.description.is_none() {
            if spec.scope == Scope::Public {
                find(
                    ds,
                    "public-description",
                    Severity::Error,
                    "a public dataset needs a description".into(),
                );
            } else if norms.require_description {
                find(
                    ds,
                    "description",
                    Severity::Error,
                    "the dataset needs a description".into(),
                );
            }
        }
        if let Some(old) = live(&spec.name) {
            if old.external.is_some() {
                find(
                    ds,
                    "registered",
                    Severity::Error,
                    "the name belongs to registered data read in place (`tarn register`)".into(),
                );
            } else if old.system {
                find(
                    ds,
                    "system",
                    Severity::Error,
                    "the name belongs to a dataset tarn keeps itself".into(),
                );
            } else {
                match evolution::check(&old, &spec) {
                    Ok(ev) if ev.new_major => find(
                        ds,
                        "new-major",
                        Severity::Warning,
                        format!(
                            "major version {} starts a new table; the current one stays readable as {}__v{}",
                            spec.major, spec.name, old.major
                        ),
                    ),
                    Ok(_) => {}
                    Err(r @ Refusal::Breaking { .. }) => find(ds, "breaking-change", Severity::Error, r.to_string()),
                    Err(r) => find(ds, "major-version", Severity::Error, r.to_string()),
                }
            }
        }
        report.specs.push((src.file.clone(), spec));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name: auctions
owner: ads
fields:
  - { name: event_id, type: string, required: true }
  - { name: ts, type: timestamp, required: true }
  - { name: cpm, type: float64 }
event_time: ts
event_id: event_id
";

    fn src(file: &str, text: &str) -> Source {
        Source {
            file: file.into(),
            text: text.into(),
        }
    }

    fn live_none(_: &str) -> Option<Arc<DatasetSpec>> {
        None
    }

    /// Each rule, one case each: the descriptor edit, the rule that must fire and its severity.
    #[test]
    fn each_rule_fires_on_its_case() {
        let cases: &[(&str, &str, &str, Severity)] = &[
            ("name: auctions", "name: Auctions", "contract", Severity::Error),
            ("type: float64", "type: money", "contract", Severity::Error),
            ("name: cpm", "name: CPM", "naming", Severity::Error),
            ("name: cpm", "name: cpm__x", "naming", Severity::Error),
            ("owner: ads\n", "", "pii-owner", Severity::Error),
            (
                "type: float64 }",
                "type: float64, pii: direct }",
                "pii-description",
                Severity::Warning,
            ),
            (
                "owner: ads\n",
                "owner: ads\nscope: public\n",
                "public-description",
                Severity::Error,
            ),
            ("name: auctions", "name: bids", "file-name", Severity::Error),
        ];
        for (from, to, rule, severity) in cases {
            assert!(BASE.contains(from), "{from:?}");
            let mut text = BASE.replacen(from, to, 1);
            if *rule == "pii-owner" {
                text = text.replace("type: float64 }", "type: float64, pii: indirect }");
            }
            let r = validate(&[src("auctions.yaml", &text)], &live_none, &Norms::default());
            assert!(
                r.findings.iter().any(|f| f.rule == *rule && f.severity == *severity),
                "{from:?} -> {to:?} should fire {rule}: {:?}",
                r.findings
            );
        }
        let clean = validate(&[src("auctions.yaml", BASE)], &live_none, &Norms::default());
        assert!(clean.findings.is_empty(), "{:?}", clean.findings);
        assert_eq!(clean.specs.len(), 1);
    }

    #[test]
    fn norms_are_configurable() {
        let strict = Norms::from_yaml("require_owner: true\nrequire_description: true\n").expect("norms");
        let text = BASE.replace("owner: ads\n", "");
        let r = validate(&[src("auctions.yaml", &text)], &live_none, &strict);
        let rules: Vec<_> = r.findings.iter().map(|f| f.rule).collect();
        assert_eq!(rules, ["owner", "description"]);
        let camel = Norms::from_yaml("names: '^[a-z][a-zA-Z0-9_]*$'").expect("norms");
        let text = BASE.replace("name: cpm", "name: cpmUsd");
        assert!(
            validate(&[src("auctions.yaml", &text)], &live_none, &camel)
                .findings
                .is_empty()
        );
        assert_eq!(
            validate(&[src("auctions.yaml", &text)], &live_none, &Norms::default()).errors(),
            1
        );
        assert!(Norms::from_yaml("names: '('").is_err());
        assert!(Norms::from_yaml("colour: red").is_err());
    }

    #[test]
    fn duplicates_and_live_contracts() {
        let r = validate(
            &[src("a/auctions.yaml", BASE), src("b/auctions.yaml", BASE)],
            &live_none,
            &Norms::default(),
        );
        assert_eq!(r.findings.iter().filter(|f| f.rule == "duplicate").count(), 1);
        let live = Arc::new(DatasetSpec::from_yaml(BASE).expect("spec"));
        let lookup = move |n: &str| (n == "auctions").then(|| live.clone());
        let additive = BASE.replace("  - { name: cpm", "  - { name: site, type: string }\n  - { name: cpm");
        assert!(
            validate(&[src("auctions.yaml", &additive)], &lookup, &Norms::default())
                .findings
                .is_empty()
        );
        let retyped = BASE.replace("type: float64", "type: string");
        let r = validate(&[src("auctions.yaml", &retyped)], &lookup, &Norms::default());
        assert_eq!(r.findings[0].rule, "breaking-change", "{:?}", r.findings);
        assert!(r.findings[0].message.contains("major: 2"));
        let bumped = format!("major: 2\n{retyped}");
        let r = validate(&[src("auctions.yaml", &bumped)], &lookup, &Norms::default());
        assert_eq!((r.errors(), r.findings[0].rule), (0, "new-major"));
        let jump = format!("major: 3\n{retyped}");
        let r = validate(&[src("auctions.yaml", &jump)], &lookup, &Norms::default());
        assert_eq!(r.findings[0].rule, "major-version");
    }
}
