//! [`Secret`]: a config value that no output may show (passwords), and the
//! reading of a secret from a file of its own.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A secret of the config (a password). `Debug`, `Display` and `Serialize` print
/// `<redacted>`, and a value of the wrong type is refused without being echoed,
/// so no output shows it; the code that needs the value reads it through `Deref`
/// (`&secret` is a `&str`) or [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret {
    value: String,
    /// Read from a `*_file`: `config check` names the file instead.
    from_file: bool,
}

impl Secret {
    pub const REDACTED: &'static str = "<redacted>";

    pub fn new(value: impl Into<String>) -> Secret {
        Secret {
            value: value.into(),
            from_file: false,
        }
    }

    /// Reads a secret file: its content without trailing line ends. The error
    /// names `key` and the file, never the content.
    pub fn read_file(key: &str, path: &Path) -> Result<Secret> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{key}: cannot read {}", path.display()))?;
        Ok(Secret {
            value: text.trim_end_matches(['\r', '\n']).to_string(),
            from_file: true,
        })
    }

    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Left out of `config check`: unset, or shown as its file.
    pub(super) fn not_shown(&self) -> bool {
        self.value.is_empty() || self.from_file
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.value
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Secret::REDACTED)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Secret::REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(Secret::REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            // The default messages quote the value: say only what it is not.
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom("a secret must be a string (in quotes)"))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom("a secret must be a string (in quotes)"))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom("a secret must be a string (in quotes)"))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom("a secret must be a string (in quotes)"))
            }
        }
        d.deserialize_str(Visitor)
    }
}
