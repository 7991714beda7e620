//! The common event without serde: one flat JSON object whose strings hold no escapes and
//! whose values are the scalars their fields' types take. Anything else (an escape, a nested
//! value, a value its field's type refuses, malformed text) makes [`parse_flat`] give up, and
//! the caller parses the event again with serde_json, which gives the same cells or the error.
//! So this parser never decides that an event is wrong; it only makes the right ones cheaper.

use std::borrow::Cow;

use tarn_core::FieldType;
use tarn_core::contract::parse_rfc3339_micros;

use crate::parse::{Cell, Shape, Slots};

/// Fills `slots` from `text` when it is the common case; false when it is not (with `slots`
/// partly filled, for the caller to clear).
pub(crate) fn parse_flat<'a>(text: &'a str, shape: &Shape<'_>, slots: &mut Slots<'a>) -> bool {
    let mut s = Scan { text, i: 0 };
    s.object(shape, slots).is_some()
}

struct Scan<'a> {
    text: &'a str,
    i: usize,
}

impl<'a> Scan<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.i += 1)
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.bytes()[self.i..]
            .starts_with(word.as_bytes())
            .then(|| self.i += word.len())
    }

    fn object(&mut self, shape: &Shape<'_>, slots: &mut Slots<'a>) -> Option<()> {
        self.ws();
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_none() {
            let mut next = 0;
            loop {
                self.eat(b'"')?;
                // Producers mostly write the fields in the contract's order: the expected name
                // and its closing quote, compared in place, are the key (a name holds no quote,
                // escape or control character), with no scan for its end.
                let found = match shape.expected(next).and_then(|k| k.at(self.bytes(), self.i)) {
                    Some(len) => {
                        self.i += len;
                        Some(next)
                    }
                    None => None,
                };
                let key = match found {
                    Some(_) => "",
                    None => self.string()?,
                };
                self.ws();
                self.eat(b':')?;
                self.ws();
                match found.or_else(|| shape.position(key, next)) {
                    Some(i) => {
                        slots.cells[i] = Some(Ok(self.value(shape.types[i])?));
                        next = i + 1;
                    }
                    None => {
                        if shape.track_unknown && slots.unknown.is_none() {
                            slots.unknown = Some(key.to_string());
                        }
                        self.value(FieldType::Json)?;
                    }
                }
                self.ws();
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        self.ws();
                    }
                    b'}' => {
                        self.i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.ws();
        (self.i == self.text.len()).then_some(())
    }

    /// A string's text, after its opening quote; none when it holds an escape or a control
    /// character (which JSON forbids raw), or is not closed.
    fn string(&mut self) -> Option<&'a str> {
        let start = self.i;
        let end = start + special(&self.bytes()[start..])?;
        if self.bytes()[end] != b'"' {
            return None;
        }
        self.i = end + 1;
        // Both ends are ASCII quotes, so this is on character boundaries.
        self.text.get(start..end)
    }

    /// A number of the JSON grammar.
    fn number(&mut self) -> Option<Number<'a>> {
        let start = self.i;
        let b = self.bytes();
        // The digits from `i` on, and their value while it stays exact: up to 15 of them
        // (across the integer and fraction parts), which every f64 holds.
        let mut digits_total = 0usize;
        let mut value = 0u64;
        let mut digits = |mut i: usize| {
            while let Some(d) = b.get(i).filter(|c| c.is_ascii_digit()) {
                if digits_total < 15 {
                    value = value * 10 + u64::from(d - b'0');
                }
                digits_total += 1;
                i += 1;
            }
            i
        };
        let negative = b[start] == b'-';
        let mut i = start + usize::from(negative);
        let int_end = digits(i);
        // One digit, or several without a leading zero.
        if int_end == i || (b[i] == b'0' && int_end > i + 1) {
            return None;
        }
        i = int_end;
        let mut fraction = None;
        if b.get(i) == Some(&b'.') {
            let frac_end = digits(i + 1);
            if frac_end == i + 1 {
                return None;
            }
            fraction = Some(frac_end - i - 1);
            i = frac_end;
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            let exp_end = digits(i);
            if exp_end == i {
                return None;
            }
            i = exp_end;
            exponent = true;
        }
        self.i = i;
        Some(Number {
            text: &self.text[start..i],
            integer: fraction.is_none() && !exponent,
            small: (digits_total <= 15 && !exponent).then(|| Small {
                negative,
                value,
                scale: fraction.unwrap_or(0),
            }),
        })
    }

    /// A value converted to `ty`, as `parse::CellVisitor` converts it; `Json` takes any scalar
    /// as its text (and skips an undeclared field's value).
    fn value(&mut self, ty: FieldType) -> Option<Cell<'a>> {
        let start = self.i;
        match self.peek()? {
            b'"' => {
                self.i += 1;
                let s = self.string()?;
                match ty {
                    FieldType::String => Some(Cell::Str(Cow::Borrowed(s))),
                    FieldType::Timestamp => parse_rfc3339_micros(s).map(Cell::Ts),
                    FieldType::Json => Some(Cell::Str(Cow::Borrowed(&self.text[start..self.i]))),
                    _ => None,
                }
            }
            b'n' => {
                self.literal("null")?;
                Some(Cell::Null)
            }
            c @ (b't' | b'f') => {
                let v = c == b't';
                self.literal(if v { "true" } else { "false" })?;
                match ty {
                    FieldType::Bool => Some(Cell::Bool(v)),
                    FieldType::Json => Some(Cell::Str(Cow::Borrowed(&self.text[start..self.i]))),
                    _ => None,
                }
            }
            b'-' | b'0'..=b'9' => {
                let n = self.number()?;
                // serde_json reads `-0` as a float (-0.0), which an int64 field refuses.
                if n.text == "-0" {
                    return None;
                }
                let int = || match n.small {
                    Some(s) => Some(if s.negative { -(s.value as i64) } else { s.value as i64 }),
                    None => n.text.parse::<i64>().ok(),
                };
                match ty {
                    FieldType::Int64 if n.integer => int().map(Cell::I64),
                    FieldType::Timestamp if n.integer => int()?.checked_mul(1000).map(Cell::Ts),
                    FieldType::Float64 if n.integer => int().map(|v| Cell::F64(v as f64)),
                    // Up to 15 digits and no exponent, the digits' integer divided by a power
                    // of ten is exact before the one rounding, as serde_json computes it; past
                    // that the two may round differently, so serde_json decides.
                    FieldType::Float64 => n.small.map(|s| {
                        let v = s.value as f64 / POW10[s.scale];
                        Cell::F64(if s.negative { -v } else { v })
                    }),
                    FieldType::Json => Some(Cell::Str(Cow::Borrowed(n.text))),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// A number's text, and its value when that is exact in an f64.
struct Number<'a> {
    text: &'a str,
    /// No fraction and no exponent.
    integer: bool,
    /// At most 15 digits and no exponent: the digits as one integer and how many of them are
    /// after the point.
    small: Option<Small>,
}

#[derive(Clone, Copy)]
struct Small {
    negative: bool,
    value: u64,
    scale: usize,
}

/// The powers of ten an f64 holds exactly, up to the most a [`Small`] number scales by.
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// A field's name and its closing quote, to find in place as an event's key: zero-padded to
/// whole words of eight bytes, compared a word at a time (names are a few bytes, where a call
/// to `memcmp` costs more than the comparison).
pub(crate) struct NameKey {
    padded: Vec<u8>,
    len: usize,
}

impl NameKey {
    /// The key of field `name`, when a key that is its bytes can only be that name: it holds
    /// no quote, escape or control character.
    pub fn new(name: &str) -> Option<Self> {
        if special(name.as_bytes()).is_some() {
            return None;
        }
        let mut padded = [name.as_bytes(), b"\""].concat();
        let len = padded.len();
        padded.resize(len.div_ceil(8) * 8, 0);
        Some(Self { padded, len })
    }

    /// Whether `text` holds this key at `at`; if so, its length.
    fn at(&self, text: &[u8], at: usize) -> Option<usize> {
        let here = text.get(at..)?;
        if here.len() < self.padded.len() {
            return (here.get(..self.len)? == &self.padded[..self.len]).then_some(self.len);
        }
        let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().expect("eight bytes"));
        let mut i = 0;
        while i < self.len {
            let left = self.len - i;
            let mask = if left >= 8 {
                u64::MAX
            } else {
                u64::MAX >> (8 * (8 - left))
            };
            if word(here, i) & mask != word(&self.padded, i) {
                return None;
            }
            i += 8;
        }
        Some(self.len)
    }
}

/// The position of the first quote, backslash or control character in `b`: where a JSON
/// string's plain text ends. Eight bytes at a time (most strings of events are short, where a
/// vector search's set-up costs more than it saves), one pass for all three.
fn special(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTE: u64 = u64::from_ne_bytes([b'"'; 8]);
    const SLASH: u64 = u64::from_ne_bytes([b'\\'; 8]);
    const SPACE: u64 = u64::from_ne_bytes([0x20; 8]);
    // The high bit of each byte below `n`, exact up to and including the first such byte
    // (a borrow may mark bytes after it, never before).
    let below = |w: u64, n: u64| w.wrapping_sub(n) & !w & HIGH;
    let mut chunks = b.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("eight bytes"));
        let hit = below(w ^ QUOTE, ONES) | below(w ^ SLASH, ONES) | below(w, SPACE);
        if hit != 0 {
            return Some(at + hit.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::parse::parse_event_serde;

    /// The fields of `parse::test_shape`, in order.
    const NAMES: [&str; 6] = ["s", "i", "f", "b", "t", "j"];

    fn shape(track_unknown: bool) -> Shape<'static> {
        crate::parse::test_shape(track_unknown)
    }

    /// What a parse gave: the outcome and every slot, owned, to compare two parses.
    fn outcome(text: &str, shape: &Shape<'_>, serde_only: bool) -> String {
        let mut slots = Slots::new(NAMES.len());
        let res = if serde_only {
            parse_event_serde(text, shape, &mut slots)
        } else {
            crate::parse::parse_event(text, shape, &mut slots)
        };
        // Debug output shows a float's sign and every digit needed to tell two apart.
        format!("{:?} {:?} {:?}", res.is_ok(), slots.cells, slots.unknown)
    }

    #[test]
    fn takes_the_common_event() {
        let sh = shape(true);
        let mut slots = Slots::new(NAMES.len());
        let text = r#" {"s":"plain text","i":-42,"f":16.2933,"b":false,"t":"2025-11-22T10:00:00.250Z","j":7} "#;
        assert!(parse_flat(text, &sh, &mut slots));
        assert_eq!(slots.cells[0], Some(Ok(Cell::Str(Cow::Borrowed("plain text")))));
        assert_eq!(slots.cells[1], Some(Ok(Cell::I64(-42))));
        assert_eq!(slots.cells[2], Some(Ok(Cell::F64(16.2933))));
        assert_eq!(slots.cells[3], Some(Ok(Cell::Bool(false))));
        assert_eq!(slots.cells[4], Some(Ok(Cell::Ts(1_763_805_600_250_000))));
        assert_eq!(slots.cells[5], Some(Ok(Cell::Str(Cow::Borrowed("7")))));
        assert_eq!(slots.unknown, None);
        // Out of order, with an undeclared scalar and epoch milliseconds.
        let mut slots = Slots::new(NAMES.len());
        let text = r#"{"t":1763805600250,"zz":null,"s":null,"j":"x","f":3}"#;
        assert!(parse_flat(text, &sh, &mut slots));
        assert_eq!(slots.cells[4], Some(Ok(Cell::Ts(1_763_805_600_250_000))));
        assert_eq!(slots.cells[0], Some(Ok(Cell::Null)));
        assert_eq!(slots.cells[5], Some(Ok(Cell::Str(Cow::Borrowed("\"x\"")))));
        assert_eq!(slots.cells[2], Some(Ok(Cell::F64(3.0))));
        assert_eq!(slots.unknown.as_deref(), Some("zz"));
    }

    #[test]
    fn leaves_the_rest_to_serde() {
        let sh = shape(true);
        for text in [
            r#"{"s":"a\"b"}"#,
            r#"{"s\u0061":"x"}"#,
            "{\"s\":\"tab\there\"}",
            "{\"zz\":\"\u{1}\"}",
            r#"{"i":-0}"#,
            r#"{"f":-0}"#,
            r#"{"i":1.0}"#,
            r#"{"i":9223372036854775808}"#,
            r#"{"f":1e3}"#,
            r#"{"f":0.1234567890123456}"#,
            r#"{"i":01}"#,
            r#"{"i":1.}"#,
            r#"{"s":1}"#,
            r#"{"b":"true"}"#,
            r#"{"t":"yesterday"}"#,
            r#"{"t":1.5}"#,
            r#"{"j":{"a":1}}"#,
            r#"{"zz":[1]}"#,
            r#"{"s":"a",}"#,
            r#"{"s":"a"} x"#,
            r#"{"s":"a""#,
            r#"{"s" "a"}"#,
            "[1]",
            "",
        ] {
            let mut slots = Slots::new(NAMES.len());
            assert!(!parse_flat(text, &sh, &mut slots), "{text}");
            assert_eq!(outcome(text, &sh, false), outcome(text, &sh, true), "{text}");
        }
    }

    /// Pieces of events, valid and not, that the two parsers must agree on.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("tru".to_string()),
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| v.to_string()),
            (any::<i32>(), 0u32..100_000_000).prop_map(|(a, b)| format!("{a}.{b}")),
            (-30i32..30, 0u32..1000).prop_map(|(e, m)| format!("{m}e{e}")),
            prop::sample::select(vec![
                "-0",
                "0",
                "-",
                "01",
                "1.",
                ".5",
                "1e",
                "-0.0",
                "1E+2",
                "12345678901234567890123"
            ])
            .prop_map(str::to_string),
            "[a-z \\\\\"\u{1}\u{e9}]{0,12}".prop_map(|s| format!("\"{s}\"")),
            (0i64..4_000_000_000, 0u32..1000).prop_map(|(s, ms)| {
                let t = chrono::DateTime::from_timestamp(s, ms * 1_000_000).unwrap_or_default();
                format!("\"{}\"", t.format("%Y-%m-%dT%H:%M:%S%.3fZ"))
            }),
            Just("{\"a\":[1,{}]}".to_string()),
            Just("[]".to_string()),
        ]
    }

    fn event() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            prop::sample::select(NAMES.to_vec()).prop_map(|k| format!("\"{k}\"")),
            Just("\"zz\"".to_string()),
            Just("\"\\u0073\"".to_string()),
        ];
        let ws = prop::sample::select(vec!["", " ", "\n", "\t ", "\r\n"]);
        (
            prop::collection::vec((key, value(), ws.clone(), ws.clone()), 0..8),
            ws,
            prop::sample::select(vec!["", "", "", "x", ",", "}"]),
            0usize..3,
        )
            .prop_map(|(members, pad, tail, cut)| {
                let body: Vec<String> = members
                    .into_iter()
                    .map(|(k, v, a, b)| format!("{a}{k}{b}:{a}{v}{b}"))
                    .collect();
                let text = format!("{pad}{{{}}}{pad}{tail}", body.join(","));
                // Sometimes cut short, anywhere.
                let keep = text.len().saturating_sub(cut * 3);
                let mut end = keep;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text[..end].to_string()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// The eight-at-a-time search finds what a byte-by-byte one finds, wherever it is and
        /// whatever surrounds it (bytes above 0x7f, and several hits in one word).
        #[test]
        fn finds_the_end_of_plain_text(text in prop::collection::vec(
            prop_oneof![
                12 => prop::sample::select(vec![b'a', b' ', 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xe9, 0xff]),
                1 => prop::sample::select(vec![b'"', b'\\', 0x00, 0x1f]),
            ],
            0..40,
        )) {
            let naive = text.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
            prop_assert_eq!(special(&text), naive);
        }

        /// A field's key is found in place exactly where its name and a quote are, whatever
        /// the name's length against the eight-byte words and however little text follows.
        #[test]
        fn finds_keys_in_place(
            name in "[a-z_]{1,20}",
            before in "[a-z_\"]{0,3}",
            cut in 0usize..24,
            flip in proptest::option::of(0usize..24),
            after in "[a-z_\":]{0,12}",
        ) {
            let key = NameKey::new(&name).expect("a plain name");
            let mut text = format!("{before}{name}\"{after}").into_bytes();
            if let Some(b) = flip.and_then(|at| text.get_mut(before.len() + at)) {
                *b = b'x';
            }
            text.truncate(text.len().saturating_sub(cut));
            let want = text[before.len().min(text.len())..].starts_with(format!("{name}\"").as_bytes());
            prop_assert_eq!(key.at(&text, before.len()), want.then_some(name.len() + 1));
        }

        /// The parser in front of serde_json never changes what an event becomes: the same
        /// outcome, the same cells and the same undeclared key as serde_json alone.
        #[test]
        fn agrees_with_serde_json(text in event(), track in any::<bool>()) {
            let sh = shape(track);
            prop_assert_eq!(outcome(&text, &sh, false), outcome(&text, &sh, true), "{}", text);
        }
    }
}
