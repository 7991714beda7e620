//! Parsing one event straight into typed cells: keys are matched against the contract as they
//! are read, values are converted to the declared type on the spot, and nothing else is kept
//! (no intermediate JSON tree), which roughly halves the cost of the collector's parse.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tarn_core::FieldType;
use tarn_core::contract::parse_rfc3339_micros;

use crate::flat::{NameKey, parse_flat};

/// A value converted to its field's type; a string borrows the request's text unless it held
/// escapes.
#[derive(Debug, PartialEq)]
pub(crate) enum Cell<'a> {
    Null,
    Str(Cow<'a, str>),
    I64(i64),
    F64(f64),
    Bool(bool),
    Ts(i64),
}

/// Per-event parse output: for each declared field, nothing (absent), a cell, or why the value
/// does not fit its type; and the first undeclared key.
pub(crate) struct Slots<'a> {
    pub cells: Vec<Option<Result<Cell<'a>, String>>>,
    pub unknown: Option<String>,
}

impl Slots<'_> {
    pub fn new(fields: usize) -> Self {
        Self {
            cells: (0..fields).map(|_| None).collect(),
            unknown: None,
        }
    }

    fn clear(&mut self) {
        for c in &mut self.cells {
            *c = None;
        }
        self.unknown = None;
    }
}

/// The contract as the parser needs it.
pub(crate) struct Shape<'a> {
    pub types: Vec<FieldType>,
    /// The fields' names, in the contract's order.
    names: Vec<&'a str>,
    index: HashMap<&'a str, usize>,
    /// Each name as a key to find in place, when it is plain.
    plain: Vec<Option<NameKey>>,
    pub track_unknown: bool,
}

impl<'a> Shape<'a> {
    /// The shape of fields given by name and type, in the contract's order.
    pub fn new(fields: impl IntoIterator<Item = (&'a str, FieldType)>, track_unknown: bool) -> Self {
        let (names, types): (Vec<&'a str>, Vec<FieldType>) = fields.into_iter().unzip();
        let index = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let plain = names.iter().map(|n| NameKey::new(n)).collect();
        Self {
            types,
            names,
            index,
            plain,
            track_unknown,
        }
    }

    /// The key of field `i`, when there is a field `i` and its name is plain.
    pub fn expected(&self, i: usize) -> Option<&NameKey> {
        self.plain.get(i)?.as_ref()
    }

    /// The position of field `key`; `next` is tried first, as producers mostly write the
    /// fields in the contract's order, and a comparison is cheaper than hashing the key.
    pub fn position(&self, key: &str, next: usize) -> Option<usize> {
        match self.names.get(next) {
            Some(name) if *name == key => Some(next),
            _ => self.index.get(key).copied(),
        }
    }
}

/// Parses one event's JSON text into `slots`. An error means the text is not a JSON object.
/// The common event takes [`parse_flat`]; the rest, and every error, serde_json.
pub(crate) fn parse_event<'a>(text: &'a str, shape: &Shape<'_>, slots: &mut Slots<'a>) -> Result<(), String> {
    slots.clear();
    if parse_flat(text, shape, slots) {
        return Ok(());
    }
    parse_event_serde(text, shape, slots)
}

/// Parses one event with serde_json alone.
pub(crate) fn parse_event_serde<'a>(text: &'a str, shape: &Shape<'_>, slots: &mut Slots<'a>) -> Result<(), String> {
    slots.clear();
    let mut de = serde_json::Deserializer::from_str(text);
    EventSeed { shape, slots }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| e.to_string())
}

struct EventSeed<'s, 'a, 'de> {
    shape: &'s Shape<'a>,
    slots: &'s mut Slots<'de>,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut next = 0;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match self.shape.position(&key, next) {
                Some(i) => {
                    let cell = map.next_value_seed(CellSeed(self.shape.types[i]))?;
                    self.slots.cells[i] = Some(cell);
                    next = i + 1;
                }
                None => {
                    if self.shape.track_unknown && self.slots.unknown.is_none() {
                        self.slots.unknown = Some(key.into_owned());
                    }
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

struct CellSeed(FieldType);

impl<'de> DeserializeSeed<'de> for CellSeed {
    type Value = Result<Cell<'de>, String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        if self.0 == FieldType::Json {
            let raw: &'de serde_json::value::RawValue = de::Deserialize::deserialize(d)?;
            let text = raw.get();
            return Ok(Ok(if text == "null" {
                Cell::Null
            } else {
                Cell::Str(Cow::Borrowed(text))
            }));
        }
        d.deserialize_any(CellVisitor(self.0))
    }
}

struct CellVisitor(FieldType);

impl CellVisitor {
    fn wrong<'de>(&self, got: &str) -> Result<Cell<'de>, String> {
        Err(format!("expected {}, got {got}", self.0.as_str()))
    }
}

impl<'de> Visitor<'de> for CellVisitor {
    type Value = Result<Cell<'de>, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(match self.0 {
            FieldType::Bool => Ok(Cell::Bool(v)),
            _ => self.wrong("a boolean"),
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(match self.0 {
            FieldType::Int64 => Ok(Cell::I64(v)),
            FieldType::Float64 => Ok(Cell::F64(v as f64)),
            FieldType::Timestamp => match v.checked_mul(1000) {
                Some(t) => Ok(Cell::Ts(t)),
                None => Err(format!("epoch milliseconds {v} are out of range")),
            },
            _ => self.wrong("a number"),
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        match i64::try_from(v) {
            Ok(i) => self.visit_i64(i),
            Err(_) => Ok(match self.0 {
                FieldType::Float64 => Ok(Cell::F64(v as f64)),
                FieldType::Int64 => Err(format!("expected a 64-bit integer, got {v}")),
                FieldType::Timestamp => Err(format!("epoch milliseconds {v} are out of range")),
                _ => self.wrong("a number"),
            }),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(match self.0 {
            FieldType::Float64 => Ok(Cell::F64(v)),
            FieldType::Int64 => Err(format!("expected a 64-bit integer, got {v}")),
            FieldType::Timestamp => Err(format!("expected epoch milliseconds as an integer, got {v}")),
            _ => self.wrong("a number"),
        })
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        match self.0 {
            FieldType::String => Ok(Ok(Cell::Str(Cow::Borrowed(v)))),
            _ => self.visit_str(v),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(match self.0 {
            FieldType::String => Ok(Cell::Str(Cow::Owned(v.to_string()))),
            FieldType::Timestamp => match parse_rfc3339_micros(v) {
                Some(t) => Ok(Cell::Ts(t)),
                None => Err(format!("expected an RFC 3339 timestamp, got {v:?}")),
            },
            _ => self.wrong("a string"),
        })
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        match self.0 {
            FieldType::String => Ok(Ok(Cell::Str(Cow::Owned(v)))),
            _ => self.visit_str(&v),
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(Cell::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(Cell::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.wrong("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(self.wrong("an object"))
    }
}

/// The test contract of the parsers: one field of each type, `s i f b t j`.
#[cfg(test)]
pub(crate) fn test_shape(track_unknown: bool) -> Shape<'static> {
    let fields = [
        ("s", FieldType::String),
        ("i", FieldType::Int64),
        ("f", FieldType::Float64),
        ("b", FieldType::Bool),
        ("t", FieldType::Timestamp),
        ("j", FieldType::Json),
    ];
    Shape::new(fields, track_unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape<'static> {
        test_shape(true)
    }

    #[test]
    fn converts_each_type_and_reports_mismatches() {
        let sh = shape();
        let mut s = Slots::new(6);
        parse_event(
            r#"{"s":"a\"b","i":-3,"f":2,"b":true,"t":"1970-01-01T00:00:01Z","j":{"x":[1, 2]},"zz":1,"yy":[]}"#,
            &sh,
            &mut s,
        )
        .expect("parses");
        assert_eq!(s.cells[0], Some(Ok(Cell::Str("a\"b".into()))));
        assert_eq!(s.cells[1], Some(Ok(Cell::I64(-3))));
        assert_eq!(s.cells[2], Some(Ok(Cell::F64(2.0))));
        assert_eq!(s.cells[3], Some(Ok(Cell::Bool(true))));
        assert_eq!(s.cells[4], Some(Ok(Cell::Ts(1_000_000))));
        assert_eq!(s.cells[5], Some(Ok(Cell::Str(r#"{"x":[1, 2]}"#.into()))));
        assert_eq!(s.unknown.as_deref(), Some("zz"));

        parse_event(r#"{"s":1,"i":1.5,"f":"x","b":null,"t":1000,"j":null}"#, &sh, &mut s).expect("parses");
        assert!(matches!(&s.cells[0], Some(Err(r)) if r.contains("expected string")));
        assert!(matches!(&s.cells[1], Some(Err(r)) if r.contains("64-bit integer")));
        assert!(matches!(&s.cells[2], Some(Err(_))));
        assert_eq!(s.cells[3], Some(Ok(Cell::Null)));
        assert_eq!(s.cells[4], Some(Ok(Cell::Ts(1_000_000))));
        assert_eq!(s.cells[5], Some(Ok(Cell::Null)));
        assert_eq!(s.unknown, None);

        parse_event(r#"{"i":18446744073709551615,"s":{"deep":[1]}}"#, &sh, &mut s).expect("parses");
        assert!(matches!(&s.cells[1], Some(Err(_))));
        assert!(matches!(&s.cells[0], Some(Err(r)) if r.contains("object")));
        assert_eq!(s.cells[2], None);
    }

    #[test]
    fn refuses_what_is_not_one_object() {
        let sh = shape();
        let mut s = Slots::new(6);
        for bad in ["[1]", "1", "\"x\"", "{\"s\":", "{} {}", "{\"s\":\"a\"} x", ""] {
            assert!(parse_event(bad, &sh, &mut s).is_err(), "{bad:?}");
        }
        parse_event(" {} ", &sh, &mut s).expect("whitespace is fine");
    }
}
