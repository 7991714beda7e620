//! Discovery: ranks datasets for a free-text query by where its words appear (name, tags,
//! domain, owner, columns, descriptions). Pure: contracts in, ranked hits out.

use serde::Serialize;
use tarn_core::DatasetSpec;

/// One dataset found, with the places its query words matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub name: String,
    pub score: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Where the words matched, e.g. `name`, `column:cpm`, `tag`.
    pub matched: Vec<String>,
}

/// Words of a text: lowercase runs of letters and digits (`client_id` gives `client`, `id`
/// and the whole `client_id`).
fn words(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out: Vec<String> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    out.extend(
        lower
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| w.contains('_'))
            .map(str::to_string),
    );
    out
}

/// How well one query word matches one text's words: 2 for a whole word, 1 for a prefix.
fn strength(word: &str, text_words: &[String]) -> u32 {
    if text_words.iter().any(|w| w == word) {
        2
    } else if word.len() >= 3 && text_words.iter().any(|w| w.starts_with(word)) {
        1
    } else {
        0
    }
}

/// Ranks `specs` for `query`: every word of the query must match somewhere in a dataset;
/// a match weighs by where it is (name 8, tag 5, domain and owner 4, column name 3,
/// description 2, column description 1) times its strength. Best first, ties by name; at
/// most `limit` hits.
pub fn search(specs: &[std::sync::Arc<DatasetSpec>], query: &str, limit: usize) -> Vec<Hit> {
    let q = words(query);
    let q: Vec<&String> = q.iter().filter(|w| !w.contains('_') || q.len() == 1).collect();
    if q.is_empty() {
        return Vec::new();
    }
    let mut hits = Vec::new();
    for s in specs {
        let mut places: Vec<(String, u32, Vec<String>)> = vec![
            ("name".into(), 8, words(&s.name)),
            ("domain".into(), 4, s.domain.as_deref().map(words).unwrap_or_default()),
            ("owner".into(), 4, s.owner.as_deref().map(words).unwrap_or_default()),
            (
                "description".into(),
                2,
                s.description.as_deref().map(words).unwrap_or_default(),
            ),
        ];
        for t in &s.tags {
            places.push(("tag".into(), 5, words(t)));
        }
        for f in &s.fields {
            places.push((format!("column:{}", f.name), 3, words(&f.name)));
            if let Some(d) = &f.description {
                places.push((format!("column description:{}", f.name), 1, words(d)));
            }
        }
        let mut score = 0;
        let mut matched: Vec<String> = Vec::new();
        let mut every_word = true;
        for w in &q {
            let mut best = 0;
            for (place, weight, text) in &places {
                let m = strength(w, text) * weight;
                if m > 0 && !matched.contains(place) {
                    matched.push(place.clone());
                }
                best = best.max(m);
                score += m;
            }
            every_word &= best > 0;
        }
        if every_word {
            hits.push(Hit {
                name: s.name.clone(),
                score,
                description: s.description.clone(),
                domain: s.domain.clone(),
                owner: s.owner.clone(),
                matched,
            });
        }
    }
    hits.sort_by(|a, b| b.score.cmp(&a.score).then_with(|| a.name.cmp(&b.name)));
    hits.truncate(limit);
    hits
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn spec(name: &str, extra: &str, fields: &[(&str, &str)]) -> Arc<DatasetSpec> {
        let mut y = format!(
            "version: 1\nname: {name}\nevent_id: event_id\n{extra}fields:\n  - {{ name: event_id, type: string }}\n"
        );
        for (f, d) in fields {
            y.push_str(&format!("  - {{ name: {f}, type: string, description: \"{d}\" }}\n"));
        }
        Arc::new(DatasetSpec::from_yaml(&y).unwrap_or_else(|e| panic!("{y}: {e}")))
    }

    /// A catalog of a few hundred datasets: noise from several domains and teams, plus the
    /// few each query below is about.
    fn catalog() -> Vec<Arc<DatasetSpec>> {
        let domains = ["ads", "payments", "search", "logistics", "identity"];
        let teams = ["team-a", "team-b", "team-c", "growth", "platform"];
        let mut v = Vec::new();
        for i in 0..300 {
            let d = domains[i % domains.len()];
            v.push(spec(
                &format!("{d}_events_{i:03}"),
                &format!(
                    "domain: {d}\nowner: {}\ndescription: \"generic {d} events, batch {i}\"\n",
                    teams[i % teams.len()]
                ),
                &[("value", "a number"), ("kind", "what happened")],
            ));
        }
        v.push(spec(
            "auctions",
            "domain: ads\nowner: growth\ntags: [revenue, realtime]\ndescription: \"one event per ad auction\"\n",
            &[
                ("bidder", "the winning bidder"),
                ("cpm", "price per thousand impressions"),
            ],
        ));
        v.push(spec(
            "bid_requests",
            "domain: ads\nowner: platform\ndescription: \"requests sent to bidders\"\n",
            &[("bidder", "who was asked"), ("timeout_ms", "how long we waited")],
        ));
        v.push(spec(
            "invoices",
            "domain: payments\nowner: finance\ntags: [revenue]\ndescription: \"invoices sent to customers\"\n",
            &[("amount", "total billed, in cents"), ("customer_id", "the payer")],
        ));
        v
    }

    #[test]
    fn ranks_names_over_tags_over_columns_over_descriptions() {
        let c = catalog();
        let names = |q: &str| search(&c, q, 5).into_iter().map(|h| h.name).collect::<Vec<_>>();
        // A dataset's own name beats every other place.
        assert_eq!(names("auctions")[0], "auctions");
        // "bidder": a column of two datasets; the one whose description also says "bidders"
        // comes only after the exact column match with a stronger description.
        assert_eq!(names("bidder"), ["auctions", "bid_requests"]);
        // A tag shared by two datasets; the one that also matches the second word wins.
        assert_eq!(names("revenue"), ["auctions", "invoices"]);
        assert_eq!(names("revenue payments"), ["invoices"]);
        // Every word must match: "revenue" is nowhere in the noise.
        assert!(names("revenue logistics").is_empty());
        // Owners and domains find whole families, ranked and limited.
        let finance = search(&c, "finance", 10);
        assert_eq!(finance.len(), 1);
        assert_eq!(finance[0].matched, ["owner"]);
        assert_eq!(search(&c, "logistics", 1000).len(), 60);
        assert_eq!(search(&c, "logistics", 7).len(), 7);
        // Prefixes of three letters or more count, less than whole words.
        assert_eq!(names("invoi"), ["invoices"]);
        assert!(names("iv").is_empty(), "two letters are not a prefix match");
        // A column's description is searched too.
        assert_eq!(names("cents"), ["invoices"]);
        let hit = &search(&c, "cents", 1)[0];
        assert_eq!(hit.matched, ["column description:amount"]);
        assert!(search(&c, "  ", 10).is_empty());
    }
}
