//! `Secret`: a string that never prints and is wiped from memory when dropped.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A token, refresh token, client secret, password or key.
///
/// `Debug` and `Display` print `[redacted]`, so a secret that reaches a log
/// line, an error message or a panic by accident shows nothing. The only way
/// to the value is [`Secret::expose`], which is easy to grep for.
#[derive(Clone, Default, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Call sites are the only places a secret is used.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

// Serialisation writes the real value: it is used only for the sealed store
// records and for outgoing token-endpoint forms, never for responses.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Replaces every occurrence of each secret in `text` with `[redacted]`.
///
/// Error chains from the HTTP client can quote a URL, and a Telegram-style
/// URL carries the bot token in its path; such text goes through here before
/// it reaches a log line.
pub fn scrub(text: &str, secrets: &[&Secret]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if s.0.len() >= 4 {
            out = out.replace(s.expose(), "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("xoxb-very-secret");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            token: Secret,
        }
        let h = Holder { token: s.clone() };
        assert!(!format!("{h:?}").contains("xoxb"));
        assert_eq!(s.expose(), "xoxb-very-secret");
    }

    #[test]
    fn scrub_removes_values() {
        let s = Secret::new("123456:ABCDEF");
        let text = "error connecting to https://api.telegram.org/bot123456:ABCDEF/getMe";
        let out = scrub(text, &[&s]);
        assert!(!out.contains("ABCDEF"));
        assert!(out.contains("[redacted]"));
    }
}
