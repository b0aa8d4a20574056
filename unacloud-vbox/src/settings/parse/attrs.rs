//! Attributes: the one pass over a start tag's attributes, and the typed readers
//! (uuid, number, boolean) with the errors that name the element and attribute.

use quick_xml::events::BytesStart;
use uuid::Uuid;

use super::{shorten, Parser};
use crate::error::{Error, Result};
use crate::settings::unbraced;

impl Parser<'_> {
    /// Calls `f(local_key, unescaped_value, self)` for every attribute except
    /// namespace declarations.
    pub(super) fn attrs<F>(&self, e: &BytesStart<'_>, mut f: F) -> Result<()>
    where
        F: FnMut(&[u8], std::borrow::Cow<'_, str>, &Self) -> Result<()>,
    {
        self.attrs_full(e, |k, v, p| {
            if k == b"xmlns" {
                return Ok(());
            }
            f(k, v, p)
        })
    }

    /// Scans the start tag's attributes directly (`S Name Eq AttValue`, strict XML
    /// syntax, no HTML leniency). Only values whose key some handler reads are
    /// UTF-8-checked and unescaped; duplicates are not diagnosed (the last one wins).
    ///
    /// One pass: the key loop also notes the last `:` (for the local name), and one
    /// `memchr2` search finds the closing quote and whether the value holds a `&`.
    pub(super) fn attrs_full<F>(&self, e: &BytesStart<'_>, mut f: F) -> Result<()>
    where
        F: FnMut(&[u8], std::borrow::Cow<'_, str>, &Self) -> Result<()>,
    {
        use quick_xml::events::attributes::AttrError;
        let raw = e.attributes_raw();
        let n = raw.len();
        let err = |a: AttrError| {
            let at = match a {
                AttrError::ExpectedEq(p)
                | AttrError::ExpectedValue(p)
                | AttrError::UnquotedValue(p)
                | AttrError::ExpectedQuote(p, _)
                | AttrError::Duplicated(p, _) => p,
            };
            self.xml_error_in(raw, at, quick_xml::Error::InvalidAttr(a))
        };
        let mut i = 0;
        loop {
            while i < n && raw[i].is_ascii_whitespace() {
                i += 1;
            }
            // A trailing `/` of an empty element may remain in the raw attributes.
            if i >= n || (raw[i] == b'/' && i + 1 == n) {
                return Ok(());
            }
            let key_start = i;
            let mut colon = None;
            while i < n {
                let c = raw[i];
                if c == b'=' || c.is_ascii_whitespace() {
                    break;
                }
                if c == b':' {
                    colon = Some(i);
                }
                i += 1;
            }
            let key = &raw[key_start..i];
            while i < n && raw[i].is_ascii_whitespace() {
                i += 1;
            }
            if i >= n || raw[i] != b'=' || key.is_empty() {
                return Err(err(AttrError::ExpectedEq(i)));
            }
            i += 1;
            while i < n && raw[i].is_ascii_whitespace() {
                i += 1;
            }
            if i >= n {
                return Err(err(AttrError::ExpectedValue(i)));
            }
            let quote = raw[i];
            if quote != b'"' && quote != b'\'' {
                return Err(err(AttrError::UnquotedValue(i)));
            }
            let value_start = i + 1;
            let rest = &raw[value_start..];
            let (len, has_amp) = match memchr::memchr2(quote, b'&', rest) {
                Some(p) if rest[p] == quote => (p, false),
                Some(p) => match memchr::memchr(quote, &rest[p + 1..]) {
                    Some(q) => (p + 1 + q, true),
                    None => return Err(err(AttrError::ExpectedQuote(n, quote))),
                },
                None => return Err(err(AttrError::ExpectedQuote(n, quote))),
            };
            let value = &rest[..len];
            i = value_start + len + 1;
            let local = match colon {
                None => key,
                Some(c) => {
                    if key.starts_with(b"xmlns:") {
                        continue;
                    }
                    &key[c - key_start + 1..]
                }
            };
            if !is_kept_attribute(local) {
                continue;
            }
            let text = match self.input_slice(value) {
                Some(t) => t,
                None => std::str::from_utf8(value).map_err(|u| {
                    self.xml_error_in(
                        value,
                        u.valid_up_to(),
                        quick_xml::encoding::EncodingError::from(u).into(),
                    )
                })?,
            };
            let v = if has_amp {
                quick_xml::escape::unescape(text).map_err(|x| {
                    let at = match &x {
                        quick_xml::escape::EscapeError::UnrecognizedEntity(r, _)
                        | quick_xml::escape::EscapeError::UnterminatedEntity(r) => r.start,
                        _ => 0,
                    };
                    self.xml_error_in(value, at, x.into())
                })?
            } else {
                std::borrow::Cow::Borrowed(text)
            };
            f(local, v, self)?;
        }
    }

    pub(super) fn missing(&self, element: &'static str, attribute: &'static str) -> Error {
        Error::MissingAttribute {
            element,
            attribute,
            line: self.line(),
        }
    }

    pub(super) fn invalid(
        &self,
        element: &'static str,
        attribute: &'static str,
        value: &str,
        reason: &str,
    ) -> Error {
        Error::InvalidAttribute {
            element,
            attribute,
            value: shorten(value),
            reason: reason.to_owned(),
            line: self.line(),
        }
    }

    pub(super) fn uuid_attr(
        &self,
        element: &'static str,
        attribute: &'static str,
        v: &str,
    ) -> Result<Uuid> {
        let inner = unbraced(v);
        if let Some(u) = parse_hyphenated_uuid(inner.as_bytes()) {
            return Ok(u);
        }
        // Every other form (and every error message) comes from the uuid crate.
        Uuid::try_parse(inner)
            .map_err(|e| self.invalid(element, attribute, v, &format!("not a uuid ({e})")))
    }

    pub(super) fn num_attr<T: std::str::FromStr>(
        &self,
        element: &'static str,
        attribute: &'static str,
        v: &str,
    ) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        v.trim().parse().map_err(|e: T::Err| {
            self.invalid(element, attribute, v, &format!("not a number ({e})"))
        })
    }

    pub(super) fn bool_attr(
        &self,
        element: &'static str,
        attribute: &'static str,
        v: &str,
    ) -> Result<bool> {
        match v.trim() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(self.invalid(element, attribute, v, "expected true or false")),
        }
    }
}

/// The common case of a uuid attribute, `8-4-4-4-12` hex digits (VirtualBox writes
/// it between braces, which the caller strips): decoded directly, `None` for anything
/// else so the caller can let [`Uuid::try_parse`] accept the other forms or explain
/// the error.
fn parse_hyphenated_uuid(s: &[u8]) -> Option<Uuid> {
    /// Start of each two-digit byte in the hyphenated form.
    const POS: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    /// Value of each ASCII hex digit, 0xff for every other byte.
    const HEX: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            t[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    if s.len() != 36 || s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
        return None;
    }
    let mut bytes = [0u8; 16];
    let mut bad = 0u8;
    for (b, &p) in bytes.iter_mut().zip(POS.iter()) {
        let (hi, lo) = (HEX[usize::from(s[p])], HEX[usize::from(s[p + 1])]);
        bad |= hi | lo;
        *b = (hi << 4) | lo;
    }
    // Every digit's value is below 16; 0xff marks a byte that is not a digit.
    (bad < 16).then(|| Uuid::from_bytes(bytes))
}

/// Every attribute name some element's handler reads; others are skipped without
/// being decoded.
fn is_kept_attribute(key: &[u8]) -> bool {
    matches!(
        key,
        b"uuid"
            | b"name"
            | b"location"
            | b"format"
            | b"type"
            | b"autoReset"
            | b"src"
            | b"OSType"
            | b"currentSnapshot"
            | b"snapshotFolder"
            | b"stateFile"
            | b"lastStateChange"
            | b"currentStateModified"
            | b"aborted"
            | b"timeStamp"
            | b"count"
            | b"RAMSize"
            | b"slot"
            | b"enabled"
            | b"MACAddress"
            | b"cable"
            | b"PortCount"
            | b"Bootable"
            | b"port"
            | b"device"
            | b"passthrough"
            | b"nonrotational"
            | b"hotpluggable"
            | b"driver"
            | b"version"
            | b"xmlns"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_hyphenated_uuid;
    use proptest::prelude::*;
    use uuid::Uuid;

    #[test]
    fn fast_uuid_path_matches_the_uuid_crate_on_known_forms() {
        for s in [
            "9e02142e-0923-41ba-9f5f-d41958f9f753",
            "9E02142E-0923-41BA-9F5F-D41958F9F753",
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert_eq!(parse_hyphenated_uuid(s.as_bytes()), Uuid::try_parse(s).ok());
        }
        // Forms the fast path leaves to the uuid crate.
        for s in [
            "9e02142e092341ba9f5fd41958f9f753",
            "{9e02142e-0923-41ba-9f5f-d41958f9f753}",
            "9e02142e-0923-41ba-9f5f-d41958f9f75g",
            "9e02142e+0923-41ba-9f5f-d41958f9f753",
            "9e02142e-0923-41ba-9f5f-d41958f9f7530",
            "",
        ] {
            assert_eq!(parse_hyphenated_uuid(s.as_bytes()), None, "{s}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whenever the fast path accepts, the uuid crate accepts the same value.
        #[test]
        fn fast_uuid_path_agrees_with_the_uuid_crate(s in "[0-9a-fA-FgG-]{30,40}") {
            if let Some(u) = parse_hyphenated_uuid(s.as_bytes()) {
                prop_assert_eq!(Some(u), Uuid::try_parse(&s).ok());
            }
            if s.len() == 36 {
                if let Ok(u) = Uuid::try_parse(&s) {
                    prop_assert_eq!(parse_hyphenated_uuid(s.as_bytes()), Some(u));
                }
            }
        }

        /// Every uuid's hyphenated text round-trips through the fast path.
        #[test]
        fn fast_uuid_path_round_trips(bytes in any::<[u8; 16]>(), upper in any::<bool>()) {
            let u = Uuid::from_bytes(bytes);
            let mut text = u.hyphenated().to_string();
            if upper {
                text = text.to_ascii_uppercase();
            }
            prop_assert_eq!(parse_hyphenated_uuid(text.as_bytes()), Some(u));
        }
    }
}
