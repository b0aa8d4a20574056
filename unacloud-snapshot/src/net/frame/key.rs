//! The cluster key, HMAC-SHA-256 and hex text.

use super::*;

/// A shared secret of one deployment. Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct ClusterKey(pub(super) Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

impl ClusterKey {
    /// A key from raw bytes (at least 16).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < 16 {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "the cluster key has {} bytes; use at least 16 random bytes (for example `head -c 32 /dev/urandom | xxd -p -c 64`)",
                    bytes.len()
                ),
            });
        }
        Ok(Self(bytes))
    }

    /// A key from hexadecimal text (whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self> {
        let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = hex_decode(&clean).map_err(|reason| Error::InvalidConfig {
            reason: format!("the cluster key {reason}; write it as hexadecimal digits"),
        })?;
        Self::new(bytes)
    }

    /// Reads a hexadecimal key from a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ResultsIo {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hex(&text)
    }
}

pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail.
    let mut m = match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; MAC_LEN],
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of two MACs.
pub(super) fn same_mac(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hexadecimal.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Decodes hexadecimal digits (either case).
pub fn hex_decode(text: &str) -> std::result::Result<Vec<u8>, String> {
    if text.len() % 2 != 0 {
        return Err("has an odd number of hexadecimal digits".to_string());
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(format!("is not hexadecimal near position {}", 2 * i)),
        })
        .collect()
}
