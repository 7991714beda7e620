//! Leases and membership, for processes that share one stream and split its work.
//!
//! On NATS both live in the offsets bucket, next to the consumer groups' offsets, under keys no
//! topic can take (`=lease/<name>`, `=members/<group>`), and every change is a compare-and-set
//! on the key's revision. A lease is a holder and an expiry time: it is taken when free or
//! expired, renewed by its holder, and lost when another holder takes it after it expired.
//! Expiry compares wall clocks of different machines, so a lease is a way to split work, never
//! what keeps data correct: two holders of one unit for a moment only do the same work twice,
//! which the stages downstream already absorb (curate skips sequences a table holds, Delta
//! refuses a second compaction of one bin).
//!
//! The embedded log belongs to one process (its data directory is locked), so there every lease
//! is granted and the only member is the caller.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A lease's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaseValue {
    pub holder: String,
    /// Milliseconds since the Unix epoch.
    pub expires_ms: i64,
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2)
}

/// The new value of a lease `holder` asks for, given the current one: `None` when another
/// holder has it and it has not expired.
pub(crate) fn take(current: Option<&[u8]>, holder: &str, ttl: Duration, now: i64) -> Option<Vec<u8>> {
    let cur: Option<LeaseValue> = current.and_then(|v| serde_json::from_slice(v).ok());
    if let Some(c) = cur
        && c.holder != holder
        && c.expires_ms > now
    {
        return None;
    }
    let v = LeaseValue {
        holder: holder.to_string(),
        expires_ms: now.saturating_add(ttl_ms(ttl)),
    };
    serde_json::to_vec(&v).ok()
}

/// The value that gives a lease up, if `holder` has it.
pub(crate) fn give_up(current: Option<&[u8]>, holder: &str) -> Option<Vec<u8>> {
    let cur: LeaseValue = current.and_then(|v| serde_json::from_slice(v).ok())?;
    if cur.holder != holder {
        return None;
    }
    serde_json::to_vec(&LeaseValue {
        holder: String::new(),
        expires_ms: 0,
    })
    .ok()
}

/// A group's members with their expiry; `join` adds or renews `holder` and drops expired ones,
/// `leave` removes `holder`. Returns the new value and the live members, sorted.
pub(crate) fn members(
    current: Option<&[u8]>,
    holder: &str,
    ttl: Option<Duration>,
    now: i64,
) -> (Option<Vec<u8>>, Vec<String>) {
    let mut map: BTreeMap<String, i64> = current.and_then(|v| serde_json::from_slice(v).ok()).unwrap_or_default();
    map.retain(|_, exp| *exp > now);
    match ttl {
        Some(ttl) => {
            map.insert(holder.to_string(), now.saturating_add(ttl_ms(ttl)));
        }
        None => {
            map.remove(holder);
        }
    }
    let live = map.keys().cloned().collect();
    (serde_json::to_vec(&map).ok(), live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_when_free_or_expired_and_only_by_its_holder_otherwise() {
        let ttl = Duration::from_secs(10);
        let a = take(None, "a", ttl, 1_000).expect("free");
        assert!(take(Some(&a), "b", ttl, 5_000).is_none(), "held by a until 11 000");
        let renewed = take(Some(&a), "a", ttl, 5_000).expect("renewal");
        let v: LeaseValue = serde_json::from_slice(&renewed).expect("json");
        assert_eq!(v.expires_ms, 15_000);
        assert!(take(Some(&renewed), "b", ttl, 15_001).is_some(), "expired");
        assert!(give_up(Some(&renewed), "b").is_none(), "only the holder gives it up");
        let given = give_up(Some(&renewed), "a").expect("given up");
        assert!(take(Some(&given), "b", ttl, 6_000).is_some());
        assert!(
            take(Some(b"not json"), "b", ttl, 6_000).is_some(),
            "a broken value is free"
        );
    }

    #[test]
    fn members_expire_and_leave() {
        let ttl = Some(Duration::from_secs(10));
        let (v, live) = members(None, "a", ttl, 0);
        assert_eq!(live, ["a"]);
        let (v, live) = members(v.as_deref(), "b", ttl, 5_000);
        assert_eq!(live, ["a", "b"]);
        let (v, live) = members(v.as_deref(), "b", ttl, 12_000);
        assert_eq!(live, ["b"], "a expired at 10 000");
        let (_, live) = members(v.as_deref(), "b", None, 12_000);
        assert!(live.is_empty());
    }
}
