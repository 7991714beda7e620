//! Body decoding: content-encoding with a capped decompressed size, then splitting into one
//! JSON text per event (a JSON array, or newline-delimited JSON).

use std::borrow::Cow;
use std::io::Read;

use tarn_core::Limits;

use crate::{Error, Result};

/// The body's content encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    /// Parses a `Content-Encoding` header value.
    pub fn from_header(v: Option<&str>) -> Result<Self> {
        match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("identity") => Ok(Encoding::Identity),
            Some("gzip") | Some("x-gzip") => Ok(Encoding::Gzip),
            Some("zstd") => Ok(Encoding::Zstd),
            Some(other) => Err(Error::UnsupportedEncoding(other.to_string())),
        }
    }
}

/// Decompresses `body`, refusing output past `decompressed_bytes_max`.
pub(crate) fn decompress<'a>(body: &'a [u8], enc: Encoding, limits: &Limits) -> Result<Cow<'a, [u8]>> {
    let cap = limits.decompressed_bytes_max;
    let read_capped = |r: &mut dyn Read, what: &str| -> Result<Cow<'a, [u8]>> {
        let mut out = Vec::new();
        let n = r
            .take(cap as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::BadRequest(format!("body is not valid {what}: {e}")))?;
        if n > cap {
            return Err(Error::TooLarge(format!(
                "decompressed body is larger than the limit of {cap} bytes"
            )));
        }
        Ok(Cow::Owned(out))
    };
    match enc {
        Encoding::Identity => Ok(Cow::Borrowed(body)),
        Encoding::Gzip => read_capped(&mut flate2::read::MultiGzDecoder::new(body), "gzip"),
        Encoding::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(body)
                .map_err(|e| Error::BadRequest(format!("body is not valid zstd: {e}")))?;
            read_capped(&mut d, "zstd")
        }
    }
}

/// One event's JSON text, or why it could not be cut out of the body.
pub(crate) struct RawEvent<'a> {
    pub text: &'a str,
}

/// Splits a body into events. A body whose first non-blank byte is `[` is a JSON array;
/// anything else is NDJSON, one event per non-blank line.
pub(crate) fn split_events<'a>(body: &'a [u8], limits: &Limits) -> Result<Vec<RawEvent<'a>>> {
    let text = std::str::from_utf8(body)
        .map_err(|e| Error::BadRequest(format!("body is not UTF-8: invalid byte at offset {}", e.valid_up_to())))?;
    let trimmed = text.trim_start();
    let events: Vec<RawEvent<'a>> = if trimmed.starts_with('[') {
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(text)
            .map_err(|e| Error::BadRequest(format!("body is not a valid JSON array: {e}")))?;
        items.into_iter().map(|r| RawEvent { text: r.get() }).collect()
    } else {
        // memchr's vector search for the line ends: a request is megabytes of text.
        let mut from = 0;
        let ends = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len()));
        ends.filter_map(|end| {
            // Both ends are at ASCII bytes (a newline, or the text's ends): char boundaries.
            let line = &text[from..end];
            from = end + 1;
            let line = line.strip_suffix('\r').unwrap_or(line);
            (!line.trim().is_empty()).then_some(RawEvent { text: line })
        })
        .collect()
    };
    if events.is_empty() {
        return Err(Error::BadRequest("body holds no events".into()));
    }
    if events.len() > limits.batch_events_max {
        return Err(Error::TooLarge(format!(
            "{} events in one request; the limit is {}",
            events.len(),
            limits.batch_events_max
        )));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
        /// NDJSON is cut where `str::split` on newlines cuts it: one event per non-blank line,
        /// a carriage return before the newline dropped, blank lines and a last newline skipped.
        #[test]
        fn ndjson_lines_are_the_events(text in "[a{} \r\n\t\u{e9}\u{2028}]{0,60}") {
            let want: Vec<&str> = text
                .split('\n')
                .map(|l| l.strip_suffix('\r').unwrap_or(l))
                .filter(|l| !l.trim().is_empty())
                .collect();
            match split_events(text.as_bytes(), &Limits::default()) {
                Ok(got) => {
                    let got: Vec<&str> = got.iter().map(|e| e.text).collect();
                    prop_assert_eq!(got, want);
                }
                Err(Error::BadRequest(m)) => prop_assert!(want.is_empty() && m.contains("no events"), "{}", m),
                Err(e) => prop_assert!(false, "{}", e),
            }
        }
    }
}
