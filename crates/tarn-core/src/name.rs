//! Name rules for datasets, fields and tenant values. Dataset names and tenant values become
//! path components in the data directory, so these checks are what keeps every input inside it.

use crate::error::{Error, Result};

/// Dataset names: lowercase snake case, 1 to 64 characters, starting with a letter, no double
/// underscore (reserved for system tables such as `x__rejected`).
pub fn check_dataset(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            what: "dataset",
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return bad("must start with a lowercase letter");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return bad("may hold only a-z, 0-9 and _");
    }
    if name.contains("__") {
        return bad("double underscore is reserved for system tables");
    }
    Ok(())
}

/// The names of the datasets tarn keeps itself: `<dataset>__rejected` (dead letters) and
/// `<dataset>__v<N>` (the table of an earlier major version). Returns the parent dataset.
pub fn check_system_dataset(name: &str) -> Result<&str> {
    let bad = || {
        Err(Error::InvalidName {
            what: "system dataset",
            name: name.to_string(),
            reason: "must be <dataset>__rejected or <dataset>__v<N>",
        })
    };
    let Some((parent, suffix)) = name.split_once("__") else {
        return bad();
    };
    let versioned = suffix
        .strip_prefix('v')
        .is_some_and(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0'));
    if suffix != "rejected" && !versioned {
        return bad();
    }
    check_dataset(parent)?;
    Ok(parent)
}

/// Checks a dataset name that may be a system dataset's.
pub fn check_any_dataset(name: &str) -> Result<()> {
    if name.contains("__") {
        check_system_dataset(name).map(|_| ())
    } else {
        check_dataset(name)
    }
}

/// Field names: 1 to 128 characters of ASCII letters, digits and `_`, not starting with a digit;
/// names starting with `_` are reserved for fields tarn adds (`_received_at`).
pub fn check_field(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            what: "field",
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if name.starts_with('_') {
        return bad("names starting with _ are reserved for tarn");
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return bad("must not start with a digit");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return bad("may hold only A-Z, a-z, 0-9 and _");
    }
    if name == "day" {
        return bad("`day` is the partition column tarn derives from the event time");
    }
    Ok(())
}

/// Application names (producers and consumers in descriptors, and the write keys tarn issues
/// them): 1 to 64 characters of lowercase ASCII letters, digits, `_` and `-`, starting with a
/// letter.
pub fn check_app(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        return Ok(());
    }
    Err(Error::InvalidName {
        what: "application",
        name: name.to_string(),
        reason: "must be 1 to 64 characters of a-z, 0-9, _ and -, starting with a letter",
    })
}

/// Tenant values (for example a `client_id`) name a partition folder: 1 to 128 characters of
/// ASCII letters, digits, `_`, `-` and `.`, not starting with `.`.
pub fn check_tenant_value(value: &str) -> std::result::Result<(), &'static str> {
    if value.is_empty() || value.len() > 128 {
        return Err("tenant value must be 1 to 128 characters");
    }
    if value.starts_with('.') {
        return Err("tenant value must not start with '.'");
    }
    // By bytes: a character outside ASCII has none that passes.
    if !value
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.')
    {
        return Err("tenant value may hold only A-Z, a-z, 0-9, _, - and .");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_names() {
        for ok in ["auctions", "a", "page_views_2", "x1"] {
            assert!(check_dataset(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Auctions",
            "1abc",
            "_x",
            "a/b",
            "..",
            "a.b",
            "a b",
            "a__rejected",
            "é",
            &"a".repeat(65),
        ] {
            assert!(check_dataset(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn system_dataset_names() {
        for ok in ["auctions__rejected", "auctions__v1", "a__v9999"] {
            assert!(check_any_dataset(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a__v0",
            "a__v01",
            "a__v",
            "a__v12345",
            "a__x",
            "a__v1/..",
            "__v1",
            "A__v1",
            "a__rejected__v1",
        ] {
            assert!(check_any_dataset(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn field_names() {
        for ok in ["client_id", "ts", "CPM", "a1"] {
            assert!(check_field(ok).is_ok(), "{ok}");
        }
        for bad in ["", "_received_at", "1a", "a-b", "a.b", "day", "a b"] {
            assert!(check_field(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn tenant_values() {
        for ok in ["acme", "client-42", "a.b", "A_1"] {
            assert!(check_tenant_value(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "../etc", "a/b", "a b", "%2e", &"x".repeat(129)] {
            assert!(check_tenant_value(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
