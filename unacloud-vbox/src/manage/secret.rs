//! Guest passwords: held in a type whose `Debug` never shows them, and taken from a
//! file, an environment variable or memory.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// A secret string. `Debug` and `Display` print `<redacted>`; only
/// [`Secret::expose`] gives the value, and the runner uses it only to write the child's
/// standard input.
///
/// ```
/// use unacloud_vbox::manage::Secret;
/// let s = Secret::new("hunter2");
/// assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: overwrite the bytes before the allocation is freed.
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        for b in bytes.iter_mut() {
            // A volatile-free overwrite may be optimised away; this is hygiene, not a
            // guarantee.
            *b = 0;
        }
        drop(std::hint::black_box(bytes));
    }
}

/// Where a guest password comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// A file on the host whose first line is the password; passed to VBoxManage as
    /// `--passwordfile <file>`, so the password never passes through this process.
    File(PathBuf),
    /// An environment variable of this process, read when the command is built.
    Env(String),
    /// A value already in memory.
    Value(Secret),
}

impl PasswordSource {
    /// Reads the password now. A [`PasswordSource::File`] is read too (first line,
    /// without the line ending), for callers that need the value itself.
    pub fn resolve(&self) -> Result<Secret> {
        match self {
            PasswordSource::Value(s) => Ok(s.clone()),
            PasswordSource::Env(var) => match std::env::var(var) {
                Ok(v) => Ok(Secret::new(v)),
                Err(_) => Err(Error::Core(unacloud_core::Error::InvalidInput(format!(
                    "guest password variable {var} is not set (or not valid UTF-8); export it or use a password file"
                )))),
            },
            PasswordSource::File(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                let first = text.lines().next().unwrap_or("");
                Ok(Secret::new(first))
            }
        }
    }
}
